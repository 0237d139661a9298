"""Child processes: one configuration each, so that peak memory is its own (`python -m mctlib.bench --child`)."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import available_cores
from .common import (_RESULT_TAG, _count_flops, _cpu_seconds, _peak_rss_bytes, _reset_peak_rss, _rss_bytes, _sync,
                     _then, stats)


def run_child(spec: dict, timeout: float = 3600.0) -> dict:
    """Run `spec` in a fresh `python -m mctlib.bench --child` process and return its result dict."""
    env = _child_env(spec)
    cmd = [sys.executable, "-m", "mctlib.bench", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    return {"error": f"child exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def _child_env(spec: dict) -> dict:
    """This process's environment, this checkout first on PYTHONPATH, and spec["env"] applied
    (a value None unsets the variable: e.g. the OMP_WAIT_POLICY that `python -m mctlib` sets)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the checkout holding mctlib/
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key, value in (spec.get("env") or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


class _Budget(Exception):
    """Raised inside a child when its time budget is spent; the timings so far are kept."""


def _child(spec: dict) -> dict:
    from ..device import configure_threads, resolve_device, tune_glibc_allocator

    if spec.get("threads") == "default":  # torch's own thread count, as a program that sets none gets
        tuned = tune_glibc_allocator() if spec.get("tune_allocator", True) else False
        settings = {"threads": torch.get_num_threads(), "cores": available_cores(), "allocator_tuned": tuned,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    else:
        settings = configure_threads(spec.get("threads"), tune_allocator=spec.get("tune_allocator", True))
    device = resolve_device(spec.get("device", "cpu"))
    kind = spec["kind"]
    out = {"settings": settings, "device": str(device),
           "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if kind == "distill":
        out.update(_child_distill(spec, device))
    elif kind == "match":
        out.update(_child_match(spec, device))
    elif kind == "reference":
        out.update(_child_reference(spec, device))
    else:
        raise ValueError(f"unknown child kind {kind!r}")
    return out


def _memory_probe(device: torch.device):
    """Start a peak-memory measurement; call the returned function at the end for the rise in MB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        return lambda: {"peak_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20,
                        "memory_kind": "cuda max_memory_allocated"}
    reset = _reset_peak_rss()
    base = _rss_bytes() or 0
    return lambda: {"peak_mb": (_peak_rss_bytes() - base) / 2**20,
                    "memory_kind": "peak RSS rise (VmHWM reset)" if reset else "ru_maxrss rise"}


def _timed_match(device: torch.device, budget_s: float | None, min_calls: int):
    """A wrapper of matching.match recording wall and CPU seconds per call."""
    from .. import matching

    calls: list[tuple[float, float]] = []
    start = time.perf_counter()

    def timed(*args, **kwargs):
        _sync(device)
        w, c = time.perf_counter(), _cpu_seconds()
        result = matching.match(*args, **kwargs)
        _sync(device)
        calls.append((time.perf_counter() - w, _cpu_seconds() - c))
        if budget_s is not None and len(calls) >= min_calls and time.perf_counter() - start > budget_s:
            raise _Budget
        return result

    return timed, calls


def _child_distill(spec: dict, device: torch.device) -> dict:
    """`distill()` with the digits bench preset for one (method, mode, syn_steps)."""
    from .. import distill as distill_module
    from ..config import get_preset
    from ..data import load_dataset
    from ..storage import load_store

    dataset = load_dataset("digits")
    store = load_store(spec["store"])
    epochs = store.records[0].epochs
    preset = get_preset(f"{spec['method']}-digits-ipc10")
    cfg = preset.distill
    warmup, iterations = spec["warmup"], spec["iterations"]
    cfg = cfg.replace(gradient_mode=spec["mode"], syn_steps=spec["syn_steps"], iterations=warmup + iterations,
                      eval_every=0, checkpoint_every=10**6, seed=spec.get("seed", 0),
                      max_start_epoch=float(min(cfg.max_start_epoch, epochs - cfg.expert_epochs)))
    timed, calls = _timed_match(device, spec.get("budget_s"), warmup + spec.get("min_iterations", 3))
    distill_module.match = timed  # this child process only
    probe = _memory_probe(device)
    log = None
    try:
        result = distill_module.distill(cfg, store, dataset, None, None, device=device, progress=False)
        log = result.log
    except _Budget:
        pass
    memory = probe()
    timed_calls = calls[warmup:]
    out = {"match_seconds": stats([w for w, _ in timed_calls]),
           "match_cpu_seconds": stats([c for _, c in timed_calls]), "completed": log is not None,
           "config": {**{k: cfg.to_dict()[k] for k in ("method", "gradient_mode", "ipc", "syn_steps", "batch_syn",
                                                        "expert_epochs", "max_start_epoch")},
                      "sampling": cfg.resolved_sampling, "record": store.kind, "expert_epochs_trained": epochs},
           **memory}
    if log is not None:
        out["iteration_seconds"] = stats([e["seconds"] for e in log[warmup:]])
        out["final_loss"] = log[-1]["loss"]
    return out


def _child_match(spec: dict, device: torch.device) -> dict:
    """`match()` on random inputs of a given network shape (the GPU section's CIFAR-10 shapes)."""
    from ..augment import make_augment
    from ..device import autocast, channels_last
    from ..matching import Student, match, plan_student
    from ..networks import FlatModel, NetConfig, build_network

    net = NetConfig(**spec["net"])
    model = FlatModel(build_network(net, seed=0)).to(device)
    augment = make_augment(True)
    if spec.get("channels_last"):
        augment = _then(augment, channels_last)
    student = Student(model, augment)
    gen = torch.Generator().manual_seed(0)
    n = spec["ipc"] * net.num_classes
    images = torch.randn(n, net.channels, net.image_size, net.image_size, generator=gen).to(device)
    labels = torch.arange(net.num_classes).repeat_interleave(spec["ipc"]).to(device)
    theta_start = model.flatten().to(device)
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=gen).to(device)
    alpha = torch.tensor(0.01, device=device)
    warmup, iterations = spec["warmup"], spec["iterations"]
    wall, cpu = [], []
    probe = _memory_probe(device)
    try:
        for i in range(warmup + iterations):
            plan = plan_student(n, spec["syn_steps"], spec.get("batch_syn"), gen, device)
            x = images.clone().requires_grad_(True)
            a = alpha.clone().requires_grad_(True)
            _sync(device)
            w, c = time.perf_counter(), _cpu_seconds()
            with autocast(spec.get("precision", "fp32"), device):
                match(student, x, labels, a, theta_start, theta_target, plan, spec["mode"])
            _sync(device)
            if i >= warmup:
                wall.append(time.perf_counter() - w)
                cpu.append(_cpu_seconds() - c)
    except torch.cuda.OutOfMemoryError as err:  # a configuration that does not fit is a result too
        return {"error": f"out of memory: {str(err).splitlines()[0]}", **probe()}
    memory = probe()
    out = {"match_seconds": stats(wall), "match_cpu_seconds": stats(cpu), **memory}
    if spec.get("count_flops"):
        out["flops_per_iteration"] = _count_flops(student, images, labels, alpha, theta_start, theta_target,
                                                  plan_student(n, spec["syn_steps"], spec.get("batch_syn"), gen),
                                                  spec["mode"], spec.get("precision", "fp32"), device)
        if wall:
            out["tflops"] = out["flops_per_iteration"] / statistics.median(wall) / 1e12
    return out


def _child_reference(spec: dict, device: torch.device) -> dict:
    """The original MTT iteration (`mctlib.bench.reference`) on random inputs of the same shapes as
    `_child_match`: a two-point trajectory (start, start + noise), images left unchanged (lr 0)
    so every iteration times the same work."""
    from . import reference
    from ..networks import NetConfig

    net = NetConfig(**spec["net"])
    net_args = {"channel": net.channels, "num_classes": net.num_classes, "width": net.width, "depth": net.depth,
                "im_size": net.image_size}
    torch.manual_seed(0)
    template = reference.ConvNet(**net_args)
    shapes = [p.shape for p in template.parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in template.parameters()])
    gen = torch.Generator().manual_seed(0)
    target = start + 0.01 * torch.randn(start.shape, generator=gen)
    trajectory = [reference.unflatten(start, shapes), reference.unflatten(target, shapes)]
    n = spec["ipc"] * net.num_classes
    images = torch.randn(n, net.channels, net.image_size, net.image_size, generator=gen).to(device)
    images.requires_grad_(True)
    labels = torch.arange(net.num_classes).repeat_interleave(spec["ipc"]).to(device)
    syn_lr = torch.tensor(0.01, device=device).requires_grad_(True)
    opt_img = torch.optim.SGD([images], lr=0.0, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=0.0, momentum=0.5)
    warmup, iterations = spec["warmup"], spec["iterations"]
    wall, cpu = [], []
    probe = _memory_probe(device)
    for i in range(warmup + iterations):
        _sync(device)
        w, c = time.perf_counter(), _cpu_seconds()
        reference.iteration(net_args, images, labels, syn_lr, trajectory, 0, 1, spec["syn_steps"],
                            spec.get("batch_syn") or n, opt_img, opt_lr)
        _sync(device)
        if i >= warmup:
            wall.append(time.perf_counter() - w)
            cpu.append(_cpu_seconds() - c)
    return {"match_seconds": stats(wall), "match_cpu_seconds": stats(cpu), **probe()}
