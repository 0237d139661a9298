"""Child processes: one configuration each, so that peak memory is its own (`python -m benchmarks --child`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mctlib import available_cores
from mctlib.check.timings import stats, time_match, time_original_loop
from mctlib.config import get_preset
from mctlib.data import load_dataset
from mctlib.device import configure_threads, resolve_device, tune_glibc_allocator
from mctlib.distill import distill
from mctlib.networks import NetConfig
from mctlib.storage import load_store

from .common import memory_probe

RESULT_TAG = "MCTLIB-BENCH-RESULT "
ROOT = Path(__file__).resolve().parents[1]  # the checkout holding mctlib/ and benchmarks/


def run_child(spec: dict, timeout: float = 3600.0) -> dict:
    """Run `spec` in a fresh `python -m benchmarks --child` process and return its result dict."""
    cmd = [sys.executable, "-m", "benchmarks", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=child_env(spec), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"error": f"child exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def child_env(spec: dict) -> dict:
    """This process's environment, this checkout first on PYTHONPATH, and spec["env"] applied
    (a value None unsets the variable: e.g. the OMP_WAIT_POLICY that `python -m mctlib` sets)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key, value in (spec.get("env") or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def child(spec: dict) -> dict:
    """What one child process measures: spec["kind"] is distill, match or reference."""
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
        out.update(_distill(spec, device))
    elif kind in ("match", "reference"):
        probe = memory_probe(device)
        net = NetConfig(**spec["net"])
        if kind == "match":
            res = time_match(net, spec["ipc"], spec["syn_steps"], spec.get("batch_syn"), spec["mode"], device,
                             spec.get("precision", "fp32"), spec["warmup"], spec["iterations"])
        else:
            res = time_original_loop(net, spec["ipc"], spec["syn_steps"], spec.get("batch_syn"), device,
                                     spec["warmup"], spec["iterations"])
        out.update(res)
        if device.type == "cpu":
            out.update(probe())
    else:
        raise ValueError(f"unknown child kind {kind!r}")
    return out


def _distill(spec: dict, device: torch.device) -> dict:
    """`distill()` with the digits bench preset for one (method, mode, syn_steps): wall seconds per
    iteration from its log, and CPU seconds per iteration as the process CPU time of the run less
    that of a run of its warm-up iterations alone, over the timed iterations."""
    dataset = load_dataset("digits")
    store = load_store(spec["store"])
    epochs = store.records[0].epochs
    cfg = get_preset(f"{spec['method']}-digits-ipc10").distill
    warmup, iterations = spec["warmup"], spec["iterations"]
    cfg = cfg.replace(gradient_mode=spec["mode"], syn_steps=spec["syn_steps"], iterations=warmup + iterations,
                      eval_every=0, checkpoint_every=10**6, seed=spec.get("seed", 0),
                      max_start_epoch=float(min(cfg.max_start_epoch, epochs - cfg.expert_epochs)))
    probe = memory_probe(device)
    cpu = time.process_time()
    result = distill(cfg, store, dataset, device=device, progress=False)
    cpu = time.process_time() - cpu
    memory = probe()
    if warmup:
        warm = time.process_time()
        distill(cfg.replace(iterations=warmup), store, dataset, device=device, progress=False)
        cpu -= time.process_time() - warm
    return {"iteration_seconds": stats([e["seconds"] for e in result.log[warmup:]]),
            "cpu_seconds_per_iteration": cpu / iterations, "final_loss": result.log[-1]["loss"],
            "config": {**{k: cfg.to_dict()[k] for k in ("method", "gradient_mode", "ipc", "syn_steps", "batch_syn",
                                                        "expert_epochs", "max_start_epoch")},
                       "sampling": cfg.resolved_sampling, "record": store.kind, "expert_epochs_trained": epochs},
            **memory}
