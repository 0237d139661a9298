"""`python -m mctlib bench`: the engine's speed and memory, measured with their spread.

Sections (`--sections`, all by default):

- experts: experts per minute, and bytes per expert for each record kind (full; convex K = 4,
  K = 2, K = 2 with theta_0 regenerated from its seed).
- distill: seconds per distillation iteration and peak memory, for mtt (FullBuffer, integer
  start) and mct (ConvexRecord K = 4, continuous tau) x the three gradient modes, with the digits
  bench config (ConvNet width 64, depth 3, 16x16, IPC 10, syn_steps 20, batch_syn = all,
  5 experts x 15 epochs). Each configuration runs `distill()` in a fresh process.
- memory: peak memory against syn_steps (10, 20, 40, 80) for the three gradient modes.
- eval: num_eval = 5 fresh networks trained on one synthetic set together (`train_networks` with
  M = 5) against one after another (M = 1), the forms the library used before (vmap; torch's
  pooling), and the compute floor: the FLOPs at the measured matmul rate.
- pool: one MTT-unrolled match with `networks.AvgPool2x2` against torch's `F.avg_pool2d`.
- reference: the original MTT iteration, reimplemented in `mctlib.reference`, against the
  engine's unrolled match, same shapes, same run (CPU: digits bench config; CUDA: CIFAR-10 IPC 1
  and 50), each in a fresh process.
- threads: one MTT-unrolled iteration with 1 or 2 torch threads, OpenMP busy-waiting or passive,
  and with or without the allocator tuning of `device.configure_threads`.
- precision: bf16 autocast and channels-last against fp32 (loss and image gradient).
- gpu: the CIFAR-10 shapes of the published presets (3x32x32, width 128, IPC 1/10/50 with their
  syn_steps) per gradient mode, achieved TFLOP/s of the student unroll against a measured matmul
  rate. Without a CUDA device its rows say "no CUDA device" and nothing is measured.

Timings are wall-clock medians with quartiles over repeats; on a shared machine also read the
CPU seconds, which other processes disturb far less. Memory: on CPU the rise of the process's
peak resident set (VmHWM, reset just before the run) over its resident set at the start, in a
fresh child process per configuration; on CUDA `torch.cuda.max_memory_allocated`. No speed
target lives in a unit test: tests/test_bench.py only runs `--quick` and checks the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import available_cores

MODES = ("unrolled", "checkpointed", "constant_memory")
METHODS = ("mtt", "mct")
FORMAT = "mctlib-bench-v1"
DEFAULT_OUT = "runs/bench/bench.json"
# The figure the issue gives for the original MTT code, digits bench config, this machine kind
# (median of 200 iterations, 2 cores); not measured here (no network access to fetch that code).
ORIGINAL_MTT_SECONDS = 2.5
TARGET_MTT_UNROLLED_SECONDS = 1.65
_RESULT_TAG = "MCTLIB-BENCH-RESULT "


@dataclass(frozen=True)
class Sizes:
    """Everything `--quick` shrinks."""

    num_experts: int = 5
    expert_epochs_trained: int = 15
    width: int = 64
    syn_steps: int = 20
    iterations: int = 30
    warmup: int = 2
    memory_steps: tuple[int, ...] = (10, 20, 40, 80)
    memory_iterations: int = 2
    eval_nets: int = 5
    eval_epochs: int = 50
    eval_repeats: int = 3
    thread_iterations: int = 6
    thread_budget_s: float = 240.0
    gpu_iterations: int = 10
    experts_vmap: bool = True
    thread_settings: int = 4          # how many of section_threads' settings to run (quick: the 1-thread ones)
    thread_contention: bool = True    # also time each thread setting with busy processes on every core
    reference_iterations: int = 8     # timed iterations per row of the reference section
    reference_gpu_ipcs: tuple[int, ...] = (1, 50)  # CIFAR-10 IPCs of the reference section on CUDA


FULL = Sizes()
QUICK = Sizes(num_experts=2, expert_epochs_trained=3, width=16, syn_steps=2, iterations=2, warmup=1,
              memory_steps=(1, 2), memory_iterations=1, eval_nets=2, eval_epochs=2, eval_repeats=1,
              thread_iterations=1, thread_budget_s=60.0, gpu_iterations=2, experts_vmap=False,
              thread_settings=2, thread_contention=False, reference_iterations=1,
              reference_gpu_ipcs=(1,))


# ---------------------------------------------------------------------------------------------
# Small helpers

def stats(values: list[float]) -> dict:
    """Median, quartiles (inclusive method), IQR, min, max and n of `values`."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0}
    q1, q3 = (statistics.quantiles(vals, n=4, method="inclusive")[i] for i in (0, 2)) if len(vals) > 1 else (vals[0],) * 2
    return {"n": len(vals), "median": statistics.median(vals), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": vals[0], "max": vals[-1], "values": [round(v, 5) for v in values]}


def machine() -> dict:
    """CPU model and cores, GPU, load and library versions: printed next to every figure."""
    from .device import versions

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": model, "cpu_cores": available_cores(), "versions": versions(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["loadavg"] = list(os.getloadavg())
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, AttributeError, ValueError):
        pass
    return info


def _rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds() -> float:
    return time.process_time()


# ---------------------------------------------------------------------------------------------
# Child processes: one configuration each, so that peak memory is its own

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
    root = str(Path(__file__).resolve().parent.parent)
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
    from .device import configure_threads, resolve_device, tune_glibc_allocator

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
    from . import matching

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
    from . import distill as distill_module
    from .config import get_preset
    from .data import load_dataset
    from .storage import load_store

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
    from .augment import make_augment
    from .device import autocast, channels_last
    from .matching import Student, match, plan_student
    from .networks import FlatModel, NetConfig, build_network

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
            plan = plan_student(n, spec["syn_steps"], spec.get("batch_syn"), gen)
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
    """The original MTT iteration (`mctlib.reference`) on random inputs of the same shapes as
    `_child_match`: a two-point trajectory (start, start + noise), images left unchanged (lr 0)
    so every iteration times the same work."""
    from . import reference
    from .networks import NetConfig

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


def _then(augment, after):
    return lambda x, seed: after(augment(x, seed))


def _count_flops(student, images, labels, alpha, theta_start, theta_target, plan, mode, precision, device) -> int:
    """Floating-point operations of one match() (convolutions and matmuls, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .device import autocast
    from .matching import match

    counter = FlopCounterMode(display=False)
    with counter, autocast(precision, device):
        match(student, images.clone().requires_grad_(True), labels, alpha.clone().requires_grad_(True),
              theta_start, theta_target, plan, mode)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# Sections

def _digits_net(sizes: Sizes):
    """The digits preset's ConvNet (width 64, depth 3, 16x16) at the bench's width."""
    import dataclasses

    from .config import get_preset

    return dataclasses.replace(get_preset("mtt-digits-ipc10").net, width=sizes.width)


def section_experts(sizes: Sizes, work: Path, log) -> dict:
    """Experts per minute (full record) and bytes per expert of each record kind; writes the stores."""
    from . import training
    from .config import get_preset
    from .data import load_dataset
    from .experts import train_experts
    from .networks import FlatModel, build_network
    from .storage import load_store, save_store
    from .trajectories import convexify

    dataset = load_dataset("digits")
    net = _digits_net(sizes)
    cfg = get_preset("mtt-digits-ipc10").expert.replace(num_experts=sizes.num_experts,
                                                        epochs=sizes.expert_epochs_trained, record="full", seed=0)
    out: dict = {"config": {"net": net.to_dict(), "expert": cfg.to_dict()}, "runs": {}}
    runs = [("loop", ())] + ([("vmap", ("cpu", "cuda"))] if sizes.experts_vmap else [])
    records = seeds = None
    for name, vmap_devices in runs:
        before = training.VMAP_DEVICES
        if vmap_devices:
            training.VMAP_DEVICES = vmap_devices
        try:
            gc.collect()
            w, c = time.perf_counter(), _cpu_seconds()
            recs, sds, st = train_experts(dataset, net, cfg, device="cpu", ensemble_size=8)
            wall, cpu = time.perf_counter() - w, _cpu_seconds() - c
        finally:
            training.VMAP_DEVICES = before
        out["runs"][name] = {"seconds": wall, "cpu_seconds": cpu, "experts_per_minute": 60 * cfg.num_experts / wall,
                             "test_accuracy": st["test_accuracy"]}
        log(f"experts ({name}): {cfg.num_experts} x {cfg.epochs} epochs in {wall:.1f} s "
            f"= {60 * cfg.num_experts / wall:.2f} experts/min")
        if records is None:
            records, seeds = recs, sds
    out["experts_per_minute"] = out["runs"]["loop"]["experts_per_minute"]
    layer_slices = FlatModel(build_network(net)).layer_slices
    kinds = {"full": (records, True), "convex_k4": ([convexify(r, layer_slices, 4) for r in records], True),
             "convex_k2": ([convexify(r, layer_slices, 2) for r in records], True)}
    kinds["convex_k2_seed"] = (kinds["convex_k2"][0], False)
    out["stores"], out["bytes_per_expert"] = {}, {}
    for kind, (recs, store_theta0) in kinds.items():
        path = work / f"store-{kind}"
        save_store(path, recs, net, dataset.describe(), cfg.to_dict(), seeds, store_theta0=store_theta0,
                   overwrite=True)
        store = load_store(path)
        out["stores"][kind] = str(path)
        out["bytes_per_expert"][kind] = store.bytes_per_expert
    full = out["bytes_per_expert"]["full"]
    out["ratio_to_full"] = {k: full / v for k, v in out["bytes_per_expert"].items()}
    out["num_params"] = FlatModel(build_network(net)).numel
    return out


def section_distill(sizes: Sizes, stores: dict, threads, log) -> dict:
    """Seconds per iteration and peak memory per method x gradient mode (digits, CPU)."""
    rows = []
    for method in METHODS:
        store = stores["full" if method == "mtt" else "convex_k4"]
        for mode in MODES:
            spec = {"kind": "distill", "method": method, "mode": mode, "syn_steps": sizes.syn_steps,
                    "iterations": sizes.iterations, "warmup": sizes.warmup, "store": store, "threads": threads,
                    "device": "cpu"}
            res = run_child(spec)
            rows.append({"method": method, "mode": mode, "device": "cpu", **res})
            log(_row_text(rows[-1]))
    out = {"rows": rows, "reference": {"original_mtt_seconds": ORIGINAL_MTT_SECONDS,
                                       "target_mtt_unrolled_seconds": TARGET_MTT_UNROLLED_SECONDS}}
    mtt = next(r for r in rows if r["method"] == "mtt" and r["mode"] == "unrolled")
    if "iteration_seconds" in mtt:
        med = mtt["iteration_seconds"]["median"]
        out["target"] = {"mtt_unrolled_median_s": med, "target_s": TARGET_MTT_UNROLLED_SECONDS,
                         "met": med <= TARGET_MTT_UNROLLED_SECONDS,
                         "cpu_seconds_median": mtt["match_cpu_seconds"]["median"],
                         "comparable": sizes == FULL}
    return out


def _row_text(row: dict) -> str:
    if "error" in row:
        return f"{row.get('method', '')} {row.get('mode', '')}: {row['error']}"
    sec = row.get("iteration_seconds") or row.get("match_seconds")
    return (f"{row.get('method', '')} {row.get('mode', '')} syn_steps {row.get('config', {}).get('syn_steps', '')}: "
            f"{sec['median']:.3f} s/it (IQR {sec['iqr']:.3f}), CPU {row['match_cpu_seconds']['median']:.3f} s, "
            f"peak {row['peak_mb']:.1f} MB")


def section_memory(sizes: Sizes, stores: dict, threads, log) -> dict:
    """Peak memory against syn_steps for each gradient mode (method mtt, digits, CPU)."""
    rows = []
    for mode in MODES:
        for steps in sizes.memory_steps:
            spec = {"kind": "distill", "method": "mtt", "mode": mode, "syn_steps": steps,
                    "iterations": sizes.memory_iterations, "warmup": 0, "store": stores["full"], "threads": threads,
                    "device": "cpu"}
            res = run_child(spec)
            rows.append({"mode": mode, "syn_steps": steps, **res})
            log(_row_text({"method": "mtt", "mode": mode, **res}))
    out = {"syn_steps": list(sizes.memory_steps), "rows": rows}
    out["checks"] = memory_checks(rows, sizes.memory_steps, stores)
    return out


def memory_checks(rows: list[dict], steps: tuple[int, ...], stores: dict) -> dict:
    """constant_memory flat (<= 1.1x), unrolled growing, checkpointed growing by ~N parameter vectors."""
    def peak(mode, n):
        row = next((r for r in rows if r["mode"] == mode and r["syn_steps"] == n and "peak_mb" in r), None)
        return None if row is None else row["peak_mb"]

    lo, hi = steps[0], steps[-1]
    checks = {"from": lo, "to": hi}
    try:
        from .storage import load_store

        d = load_store(stores["full"]).manifest["num_params"]
    except Exception:  # noqa: BLE001 - the check is informative only
        d = None
    for mode in MODES:
        a, b = peak(mode, lo), peak(mode, hi)
        if a is None or b is None:
            continue
        checks[mode] = {"peak_mb_from": a, "peak_mb_to": b, "ratio": b / a if a > 0 else None,
                        "growth_mb": b - a}
    if "constant_memory" in checks and checks["constant_memory"]["ratio"] is not None:
        checks["constant_memory"]["flat"] = checks["constant_memory"]["ratio"] <= 1.1
    if "unrolled" in checks:
        checks["unrolled"]["grows"] = checks["unrolled"]["growth_mb"] > 0
    if d is not None and "checkpointed" in checks:
        expected = (hi - lo) * d * 4 / 2**20
        checks["checkpointed"]["expected_growth_mb"] = expected
        checks["checkpointed"]["num_params"] = d
    return checks


def section_eval(sizes: Sizes, log) -> dict:
    """num_eval networks trained together (M at once) vs one after another (M = 1 calls)."""
    from . import training
    from .augment import make_augment
    from .config import get_preset
    from .data import load_dataset, real_images_per_class
    from .networks import FlatModel, build_network
    from .training import SGDRecipe, accuracy, derive_seed, train_networks

    dataset = load_dataset("digits")
    net = _digits_net(sizes)
    images, labels = real_images_per_class(dataset.train_images, dataset.train_labels, dataset.num_classes, 10,
                                           torch.Generator().manual_seed(0))
    eval_cfg = get_preset("mtt-digits-ipc10").eval
    e = sizes.eval_epochs
    recipe = SGDRecipe(lr=0.01, epochs=e, batch_size=eval_cfg.batch_size, momentum=eval_cfg.momentum,
                       weight_decay=eval_cfg.weight_decay, decay_epoch=e // 2)
    m = sizes.eval_nets
    model = FlatModel(build_network(net))
    params = torch.stack([FlatModel(build_network(net, seed=derive_seed(0, 0, i, 0))).flatten() for i in range(m)])
    seeds = [derive_seed(0, 0, i, 1) for i in range(m)]
    augment = make_augment(True)

    def together(vmap_devices):
        def run():
            before = training.VMAP_DEVICES
            training.VMAP_DEVICES = vmap_devices
            try:
                return train_networks(model, params, images, labels, recipe, seeds, augment)
            finally:
                training.VMAP_DEVICES = before
        return run

    def sequential():
        return torch.cat([train_networks(model, params[i:i + 1], images, labels, recipe, [seeds[i]], augment)
                          for i in range(m)])

    def with_torch_pool(fn):
        def run():
            with _torch_avg_pool():
                return fn()
        return run

    variants = {"ensemble": together(training.VMAP_DEVICES), "sequential": sequential,
                "ensemble_vmap": with_torch_pool(together(("cpu", "cuda"))),
                "ensemble_torch_pool": with_torch_pool(together(training.VMAP_DEVICES))}
    times = {k: {"wall": [], "cpu": []} for k in variants}
    finals = {}
    for rep in range(sizes.eval_repeats):
        for name, fn in variants.items():
            gc.collect()
            w, c = time.perf_counter(), _cpu_seconds()
            finals[name] = fn()
            times[name]["wall"].append(time.perf_counter() - w)
            times[name]["cpu"].append(_cpu_seconds() - c)
        log(f"eval repeat {rep + 1}: " + ", ".join(f"{k} {v['wall'][-1]:.2f} s" for k, v in times.items()))
    acc = {k: accuracy(model, p, dataset.test_images, dataset.test_labels).tolist() for k, p in finals.items()}
    out = {"num_eval": m, "epochs": e, "images": int(images.shape[0]), "batch_size": recipe.batch_size,
           "variants": {k: {"seconds": stats(v["wall"]), "cpu_seconds": stats(v["cpu"]), "accuracies": acc[k],
                            "mean_accuracy": sum(acc[k]) / len(acc[k])} for k, v in times.items()}}
    seq = out["variants"]["sequential"]["seconds"]["median"]
    out["compute_floor"] = _compute_floor(model, params, images, labels, recipe, seeds, augment, seq)
    log(f"eval compute floor: {out['compute_floor']['floor_seconds']:.2f} s at "
        f"{out['compute_floor']['matmul_gflops']:.0f} GFLOP/s; batching can gain at most "
        f"{out['compute_floor']['max_speedup_vs_sequential']:.2f}x")
    for k in ("ensemble", "ensemble_vmap", "ensemble_torch_pool"):
        out["variants"][k]["speedup_vs_sequential"] = seq / out["variants"][k]["seconds"]["median"]
        out["variants"][k]["max_param_diff_vs_sequential"] = float((finals[k] - finals["sequential"]).abs().max())
    out["target"] = {"speedup": out["variants"]["ensemble"]["speedup_vs_sequential"], "target": 3.0,
                     "met": out["variants"]["ensemble"]["speedup_vs_sequential"] >= 3.0}
    return out


def _compute_floor(model, params, images, labels, recipe, seeds, augment, sequential_seconds: float) -> dict:
    """The least time any form of training the M networks could take on this CPU: their convolution
    and matmul FLOPs (counted over one epoch of one network, x epochs x M) at the dense matmul rate
    measured now, on the same threads. Training them together changes how the work is scheduled,
    not how much there is, so sequential time / floor bounds the speed-up any batched form can
    reach. (The count includes `AvgPool2x2`'s matmuls, mostly multiplications by zero: 2-3% of
    it for the digits ConvNet, so the floor is that much too high.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from .training import train_networks

    one_epoch = dataclasses.replace(recipe, epochs=1)
    counter = FlopCounterMode(display=False)
    with counter:
        train_networks(model, params[:1], images, labels, one_epoch, seeds[:1], augment)
    per_epoch = int(counter.get_total_flops())
    steps_per_epoch = -(-images.shape[0] // recipe.batch_size)
    flops = per_epoch * recipe.epochs * params.shape[0]
    rate = matmul_rate("cpu", n=2048, repeats=5, kinds=("fp32",))["fp32"] * 1e12
    floor = flops / rate
    return {"flops": flops, "flops_per_network_epoch": per_epoch, "steps_per_epoch": steps_per_epoch,
            "flops_per_network_step": per_epoch / steps_per_epoch, "matmul_gflops": rate / 1e9,
            "floor_seconds": floor, "max_speedup_vs_sequential": sequential_seconds / floor}


@contextlib.contextmanager
def _torch_avg_pool():
    """The library before `networks.AvgPool2x2`: torch's `F.avg_pool2d` on every device (the
    "before" rows of that change)."""
    from .networks import AvgPool2x2

    before = AvgPool2x2.forward
    AvgPool2x2.forward = lambda self, x: torch.nn.functional.avg_pool2d(x, 2, 2)
    try:
        yield
    finally:
        AvgPool2x2.forward = before


def _digits_match_inputs(sizes: Sizes):
    """One unrolled match's inputs at the digits bench shapes: (model, images, labels, theta_start,
    theta_target, plan), random but seeded, the same for every section that compares settings."""
    from .matching import plan_student
    from .networks import FlatModel, build_network

    net = _digits_net(sizes)
    model = FlatModel(build_network(net, seed=0))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(100, net.channels, net.image_size, net.image_size, generator=gen)
    labels = torch.arange(10).repeat_interleave(10)
    theta_start = model.flatten()
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=gen)
    plan = plan_student(100, sizes.syn_steps, None, gen)
    return model, images, labels, theta_start, theta_target, plan


def section_pool(sizes: Sizes, log) -> dict:
    """One MTT-unrolled match with `networks.AvgPool2x2` against torch's `F.avg_pool2d`,
    interleaved: time and how far the loss and the image gradient move (rounding only)."""
    from .augment import make_augment
    from .matching import Student, match

    model, images, labels, theta_start, theta_target, plan = _digits_match_inputs(sizes)
    student = Student(model, make_augment(True))

    def run():
        x = images.clone().requires_grad_(True)
        w, c = time.perf_counter(), _cpu_seconds()
        r = match(student, x, labels, torch.tensor(0.01, requires_grad=True), theta_start, theta_target, plan,
                  "unrolled")
        return r.loss, x.grad, time.perf_counter() - w, _cpu_seconds() - c

    times = {"torch_avg_pool2d": {"wall": [], "cpu": []}, "AvgPool2x2": {"wall": [], "cpu": []}}
    run()  # warm-up
    for rep in range(sizes.eval_repeats + 2):
        with _torch_avg_pool():
            before = run()
        after = run()
        for name, r in (("torch_avg_pool2d", before), ("AvgPool2x2", after)):
            times[name]["wall"].append(r[2])
            times[name]["cpu"].append(r[3])
        log(f"pool repeat {rep + 1}: torch {before[2]:.2f} s, AvgPool2x2 {after[2]:.2f} s")
    return {"syn_steps": sizes.syn_steps,
            "variants": {k: {"seconds": stats(v["wall"]), "cpu_seconds": stats(v["cpu"])} for k, v in times.items()},
            "loss_rel_diff": abs(after[0] - before[0]) / abs(before[0]),
            "image_grad_rel_err": float((after[1] - before[1]).norm() / before[1].norm())}


def section_reference(sizes: Sizes, log) -> dict:
    """The engine's MTT-unrolled match against the original loop (`mctlib.reference`), same shapes,
    same run, each in a fresh process. CPU: the digits bench config under the original's process
    settings (torch's default threads, busy-waiting, allocator untouched), under ours, and on one
    thread. CUDA: the CIFAR-10 shapes of the published IPC 1 and IPC 50 presets."""
    cuda = torch.cuda.is_available()
    if cuda:
        from .config import get_preset

        net = {"arch": "convnet", "channels": 3, "num_classes": 10, "image_size": 32, "width": 128}
        shapes = []
        for ipc in sizes.reference_gpu_ipcs:
            d = get_preset(f"mtt-cifar10-ipc{ipc}").distill
            shapes.append((f"CIFAR-10 IPC {ipc}", ipc, d.syn_steps, d.batch_syn))
        settings = [("GPU", None, None, None)]
    else:
        net = dataclasses.asdict(_digits_net(sizes))
        shapes = [("digits bench config", 10, sizes.syn_steps, None)]
        cores = available_cores()
        # (label, threads, allocator tuned, OMP_WAIT_POLICY): threads "default" leaves torch's own
        # count; tuned None: the engine's processes tune glibc's allocator, the original's do not;
        # policy None unsets one inherited from `python -m mctlib`.
        settings = [("torch defaults (its thread count, busy-waiting)", "default", None, None),
                    ("1 thread", 1, None, None),
                    (f"{cores} threads, OMP passive (the command line's default here)", cores, True, "PASSIVE")]
    rows = []
    for label, ipc, steps, batch_syn in shapes:
        for setting, threads, tuned, policy in settings:
            for impl in ("reference", "engine"):
                if impl == "reference" and policy == "PASSIVE":
                    continue  # the original never ran so
                spec = {"kind": "reference" if impl == "reference" else "match", "device": "cuda" if cuda else "cpu",
                        "net": net, "ipc": ipc, "syn_steps": steps, "batch_syn": batch_syn, "mode": "unrolled",
                        "warmup": 1, "iterations": sizes.reference_iterations, "threads": threads,
                        # the original leaves glibc's allocator alone; the engine's processes tune it
                        "tune_allocator": impl == "engine" if tuned is None else tuned,
                        "env": {"OMP_WAIT_POLICY": policy}}
                res = run_child(spec)
                rows.append({"shape": label, "ipc": ipc, "syn_steps": steps, "setting": setting, "impl": impl, **res})
                log(f"reference {label}, {setting}, {impl}: " + (res.get("error") or
                    f"{res['match_seconds']['median']:.3f} s/it wall, {res['match_cpu_seconds']['median']:.3f} s CPU"))
    speedups = []
    for label, *_ in shapes:
        for setting, *_ in settings:
            pair = {r["impl"]: r for r in rows if r["shape"] == label and r["setting"] == setting and "error" not in r}
            if len(pair) == 2:
                speedups.append({"shape": label, "setting": setting,
                                 "reference_s": pair["reference"]["match_seconds"]["median"],
                                 "engine_s": pair["engine"]["match_seconds"]["median"],
                                 "speedup": pair["reference"]["match_seconds"]["median"]
                                 / pair["engine"]["match_seconds"]["median"]})
    return {"device": "cuda" if cuda else "cpu", "rows": rows, "speedups": speedups,
            "targets": {"cpu_same_settings_s": TARGET_MTT_UNROLLED_SECONDS, "gpu_ipc1": 3.0, "gpu_ipc50": 2.0}}


def section_threads(sizes: Sizes, stores: dict, log) -> dict:
    """MTT unrolled iterations under thread counts, OpenMP wait policies and the allocator tuning,
    on the machine as it is ("as found") and with one busy process of our own per available core
    competing for the cores ("contended": what a shared machine does to each setting)."""
    configs = [("1 thread", 1, True, None), ("1 thread, allocator untuned", 1, False, None),
               ("2 threads", 2, True, None), ("2 threads, OMP passive", 2, True, "PASSIVE")]
    conditions = [("as found", 0)] + ([("contended", available_cores())] if sizes.thread_contention else [])
    rows = []
    for condition, contenders in conditions:
        for label, threads, tuned, policy in configs[:sizes.thread_settings]:
            if condition == "contended" and not tuned:
                continue  # the allocator is not what contention is about
            spec = {"kind": "distill", "method": "mtt", "mode": "unrolled", "syn_steps": sizes.syn_steps,
                    "iterations": sizes.thread_iterations, "warmup": 1, "store": stores["full"], "threads": threads,
                    "tune_allocator": tuned, "device": "cpu", "budget_s": sizes.thread_budget_s,
                    "min_iterations": 3, "env": {"OMP_WAIT_POLICY": policy}}
            busy = _start_contenders(contenders)
            try:
                res = run_child(spec)
            finally:
                _stop(busy)
            rows.append({"label": label, "condition": condition, "contenders": contenders, "threads": threads,
                         "tune_allocator": tuned, "omp_wait_policy": policy, **res})
            log(f"threads {label} ({condition}): " + (res.get("error") or f"{res['match_seconds']['median']:.3f} "
                                                      f"s/it wall, {res['match_cpu_seconds']['median']:.3f} s CPU"))
    return {"rows": rows}


def _start_contenders(n: int) -> list:
    """n busy-looping Python processes (ours), to emulate other jobs sharing the cores."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def section_precision(sizes: Sizes, log) -> dict:
    """bf16 autocast and channels-last against fp32: loss and image gradient of one unrolled match."""
    from .augment import make_augment
    from .device import autocast, channels_last
    from .matching import Student, match

    model, images, labels, theta_start, theta_target, plan = _digits_match_inputs(sizes)
    aug = make_augment(True)

    def run(precision, layout):
        student = Student(model, _then(aug, channels_last) if layout else aug)
        x = images.clone().requires_grad_(True)
        a = torch.tensor(0.01, requires_grad=True)
        w = time.perf_counter()
        with autocast(precision, "cpu"):
            r = match(student, x, labels, a, theta_start, theta_target, plan, "unrolled")
        return r.loss, x.grad, a.grad, time.perf_counter() - w

    ref = run("fp32", False)
    rows = []
    tolerance = {"loss_rel": 1e-2, "image_grad_cosine": 0.99}
    for precision, layout in (("fp32", True), ("bf16", False)):
        loss, gx, ga, sec = run(precision, layout)
        cos = float(torch.nn.functional.cosine_similarity(gx.flatten(), ref[1].flatten(), dim=0))
        row = {"precision": precision, "channels_last": layout, "device": "cpu", "seconds": sec,
               "seconds_fp32": ref[3], "loss": loss, "loss_fp32": ref[0],
               "loss_rel_diff": abs(loss - ref[0]) / abs(ref[0]),
               "image_grad_rel_err": float((gx - ref[1]).norm() / ref[1].norm()),
               "image_grad_cosine": cos, "alpha_grad_rel_err": float((ga - ref[2]).abs() / ref[2].abs())}
        row["within_tolerance"] = row["loss_rel_diff"] <= tolerance["loss_rel"] and cos >= tolerance["image_grad_cosine"]
        rows.append(row)
        log(f"precision {precision}{' channels_last' if layout else ''}: loss rel diff {row['loss_rel_diff']:.2e}, "
            f"image-grad cosine {cos:.5f}, {sec:.2f} s vs fp32 {ref[3]:.2f} s")
    return {"tolerance": tolerance, "rows": rows, "syn_steps": sizes.syn_steps}


# The published CIFAR-10 presets the GPU rows use: (method, ipc) -> syn_steps (METHOD.md).
def _cifar_configs() -> list[tuple[str, int, int, int | None]]:
    from .config import get_preset

    out = []
    for method in METHODS:
        for ipc in (1, 10, 50):
            d = get_preset(f"{method}-cifar10-ipc{ipc}").distill
            out.append((method, ipc, d.syn_steps, d.batch_syn))
    return out


def section_gpu(sizes: Sizes, precision: str, layout: bool, log) -> dict:
    """CIFAR-10 preset shapes on CUDA; without a CUDA device every row says so."""
    configs = _cifar_configs()
    if not torch.cuda.is_available():
        rows = [{"method": m, "ipc": ipc, "syn_steps": s, "mode": mode, "status": "no CUDA device"}
                for m, ipc, s, _ in configs for mode in MODES]
        log("gpu: no CUDA device; nothing measured")
        return {"status": "no CUDA device", "rows": rows}
    net = {"arch": "convnet", "channels": 3, "num_classes": 10, "image_size": 32, "width": 128}
    rows = []
    for method, ipc, steps, batch_syn in configs:
        for mode in MODES:
            spec = {"kind": "match", "device": "cuda", "net": net, "ipc": ipc, "syn_steps": steps,
                    "batch_syn": batch_syn, "mode": mode, "warmup": 2, "iterations": sizes.gpu_iterations,
                    "precision": precision, "channels_last": layout, "count_flops": mode == "unrolled"}
            res = run_child(spec)
            rows.append({"method": method, "ipc": ipc, "syn_steps": steps, "mode": mode, "status": "measured",
                         "precision": precision, "channels_last": layout, **res})
            log(f"gpu {method} ipc {ipc} {mode}: " + (res.get("error") or
                f"{res['match_seconds']['median']:.4f} s/it, peak {res['peak_mb']:.0f} MB"
                + (f", {res['tflops']:.2f} TFLOP/s" if "tflops" in res else "")))
    return {"status": "measured", "rows": rows, "matmul": matmul_rate("cuda")}


def matmul_rate(device: str, n: int = 8192, repeats: int = 10, kinds=("fp32", "tf32", "bf16")) -> dict:
    """Measured dense matmul TFLOP/s on `device` in fp32 (TF32 off and on) and bf16 (`kinds`: which of them;
    a CPU without bf16 matmul units takes minutes for the bf16 row, so ask only for what is used)."""
    dev = torch.device(device)
    out = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        if name not in kinds:
            continue
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a = torch.randn(n, n, device=dev, dtype=dtype)
            b = torch.randn(n, n, device=dev, dtype=dtype)
            a @ b
            _sync(dev)
            times = []
            for _ in range(repeats):
                w = time.perf_counter()
                a @ b
                _sync(dev)
                times.append(time.perf_counter() - w)
            out[name] = 2 * n**3 / statistics.median(times) / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    return out


# ---------------------------------------------------------------------------------------------
# Before/after of each speed change, from rows measured in the same run

def changes(result: dict) -> list[dict]:
    """One entry per speed change: the same figure with the change off (before) and on (after)."""
    out = []
    thr = {r["label"]: r for r in result.get("threads", {}).get("rows", [])
           if "match_seconds" in r and r.get("condition", "as found") == "as found"}
    if "1 thread" in thr and "1 thread, allocator untuned" in thr:
        b, a = thr["1 thread, allocator untuned"], thr["1 thread"]
        out.append({"change": "allocator tuning (device.configure_threads)", "figure": "MTT unrolled s/iteration",
                    "before": b["match_seconds"]["median"], "after": a["match_seconds"]["median"],
                    "before_cpu": b["match_cpu_seconds"]["median"], "after_cpu": a["match_cpu_seconds"]["median"]})
    ev = result.get("eval", {}).get("variants")
    if ev:  # each change against the library just before it: vmap -> loop (torch pooling) -> AvgPool2x2
        loop = ev.get("ensemble_torch_pool", ev["ensemble"])
        out.append({"change": "CPU ensemble as a loop, not vmap (training.VMAP_DEVICES)",
                    "figure": f"{result['eval']['num_eval']} eval networks x {result['eval']['epochs']} epochs, s",
                    "before": ev["ensemble_vmap"]["seconds"]["median"], "after": loop["seconds"]["median"],
                    "before_cpu": ev["ensemble_vmap"]["cpu_seconds"]["median"],
                    "after_cpu": loop["cpu_seconds"]["median"]})
    if ev and "ensemble_torch_pool" in ev:
        out.append({"change": "2x2 average pooling as a matmul on CPU (networks.AvgPool2x2)",
                    "figure": f"{result['eval']['num_eval']} eval networks x {result['eval']['epochs']} epochs, s",
                    "before": ev["ensemble_torch_pool"]["seconds"]["median"],
                    "after": ev["ensemble"]["seconds"]["median"],
                    "before_cpu": ev["ensemble_torch_pool"]["cpu_seconds"]["median"],
                    "after_cpu": ev["ensemble"]["cpu_seconds"]["median"]})
    pool = result.get("pool", {}).get("variants")
    if pool:
        b, a = pool["torch_avg_pool2d"], pool["AvgPool2x2"]
        out.append({"change": "2x2 average pooling as a matmul on CPU (networks.AvgPool2x2)",
                    "figure": "one MTT-unrolled match, s", "before": b["seconds"]["median"],
                    "after": a["seconds"]["median"], "before_cpu": b["cpu_seconds"]["median"],
                    "after_cpu": a["cpu_seconds"]["median"]})
    ex = result.get("experts", {}).get("runs", {})
    if "vmap" in ex and "loop" in ex:
        out.append({"change": "CPU ensemble as a loop, not vmap (training.VMAP_DEVICES)",
                    "figure": "expert training, s", "before": ex["vmap"]["seconds"], "after": ex["loop"]["seconds"],
                    "before_cpu": ex["vmap"]["cpu_seconds"], "after_cpu": ex["loop"]["cpu_seconds"]})
    return out


# ---------------------------------------------------------------------------------------------
# Reporting

def format_table(result: dict, markdown: bool = False) -> str:
    """The benchmark table (plain text for the terminal, or Markdown for the book)."""
    lines = []

    def table(header: list[str], rows: list[list[str]]):
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines.extend("| " + " | ".join(r) + " |" for r in rows)
        else:
            widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
            lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
        lines.append("")

    def med(s):
        return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]" if s and s.get("n") else "-"

    d = result.get("distill")
    if d:
        lines.append("Distillation, digits bench config, CPU: seconds per iteration, median [q1, q3]")
        table(["method", "gradient mode", "s/iteration (wall)", "CPU s/iteration", "peak memory MB"],
              [[r["method"], r["mode"], med(r.get("iteration_seconds") or r.get("match_seconds")),
                med(r.get("match_cpu_seconds")), f"{r['peak_mb']:.0f}" if "peak_mb" in r else r.get("error", "-")]
               for r in d["rows"]])
    g = result.get("gpu")
    if g:
        if g["status"] != "measured":
            lines.append(f"CIFAR-10 preset shapes on CUDA: {g['status']} (not measured)")
            lines.append("")
        else:
            lines.append("CIFAR-10 preset shapes on CUDA: seconds per iteration, median [q1, q3]")
            table(["method", "IPC", "syn_steps", "mode", "s/iteration", "peak MB", "TFLOP/s"],
                  [[r["method"], str(r["ipc"]), str(r["syn_steps"]), r["mode"], med(r.get("match_seconds")),
                    f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-",
                    f"{r['tflops']:.2f}" if "tflops" in r else "-"] for r in g["rows"]])
            lines.append("matmul TFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in g["matmul"].items()))
            lines.append("")
    m = result.get("memory")
    if m:
        lines.append("Peak memory (MB) against syn_steps, MTT, digits, CPU")
        table(["gradient mode"] + [str(s) for s in m["syn_steps"]],
              [[mode] + [f"{r['peak_mb']:.0f}" if "peak_mb" in r else "err" for s in m["syn_steps"]
                         for r in m["rows"] if r["mode"] == mode and r["syn_steps"] == s] for mode in MODES])
    e = result.get("eval")
    if e:
        lines.append(f"Evaluation: {e['num_eval']} networks x {e['epochs']} epochs on {e['images']} images, seconds")
        table(["variant", "s (wall)", "CPU s", "speed-up vs sequential", "mean test accuracy"],
              [[k, med(v["seconds"]), med(v["cpu_seconds"]),
                f"{v['speedup_vs_sequential']:.2f}x" if "speedup_vs_sequential" in v else "1x",
                f"{100 * v['mean_accuracy']:.1f}%"] for k, v in e["variants"].items()])
        f = e.get("compute_floor")
        if f:
            lines.append(f"Compute floor: {f['flops'] / 1e9:.0f} GFLOP of convolutions and matmuls at the measured "
                         f"{f['matmul_gflops']:.0f} GFLOP/s = {f['floor_seconds']:.2f} s; no batched form can be more "
                         f"than {f['max_speedup_vs_sequential']:.2f}x faster than sequential here")
            lines.append("")
    pl = result.get("pool")
    if pl:
        lines.append(f"Pooling, one MTT-unrolled match ({pl['syn_steps']} steps), seconds; loss moves by "
                     f"{pl['loss_rel_diff']:.1e}, image gradient by {pl['image_grad_rel_err']:.1e} (relative)")
        table(["pooling", "s (wall)", "CPU s"],
              [[k, med(v["seconds"]), med(v["cpu_seconds"])] for k, v in pl["variants"].items()])
    r = result.get("reference")
    if r:
        lines.append(f"The original MTT loop (mctlib.reference) against the engine, MTT unrolled, {r['device']}, "
                     "seconds per iteration")
        table(["shape", "setting", "implementation", "s/iteration (wall)", "CPU s/iteration"],
              [[row["shape"], row["setting"], row["impl"], med(row.get("match_seconds")),
                med(row.get("match_cpu_seconds"))] if "error" not in row
               else [row["shape"], row["setting"], row["impl"], row["error"][:60], "-"] for row in r["rows"]])
        table(["shape", "setting", "reference s", "engine s", "speed-up"],
              [[x["shape"], x["setting"], f"{x['reference_s']:.3f}", f"{x['engine_s']:.3f}", f"{x['speedup']:.2f}x"]
               for x in r["speedups"]])
    x = result.get("experts")
    if x:
        lines.append(f"Experts: {x['experts_per_minute']:.2f} experts per minute "
                     f"({x['config']['expert']['num_experts']} x {x['config']['expert']['epochs']} epochs, CPU)")
        table(["record", "bytes per expert", "x smaller than full"],
              [[k, f"{v:,.0f}", f"{x['ratio_to_full'][k]:.1f}"] for k, v in x["bytes_per_expert"].items()])
    t = result.get("threads")
    if t:
        lines.append("Threads and allocator, MTT unrolled, seconds per iteration")
        table(["setting", "machine", "s/iteration (wall)", "CPU s/iteration"],
              [[r["label"], r.get("condition", "as found"), med(r.get("match_seconds")),
                med(r.get("match_cpu_seconds"))] if "error" not in r
               else [r["label"], r.get("condition", "as found"), r["error"][:60], "-"] for r in t["rows"]])
    p = result.get("precision")
    if p:
        lines.append("Precision and layout against fp32 (one unrolled match, CPU)")
        table(["setting", "loss rel. diff", "image-grad cosine", "within tolerance"],
              [[f"{r['precision']}{' channels_last' if r['channels_last'] else ''}", f"{r['loss_rel_diff']:.1e}",
                f"{r['image_grad_cosine']:.5f}", str(r["within_tolerance"])] for r in p["rows"]])
    if result.get("distributed"):
        from .bench_distributed import format_rows

        lines.append(format_rows(result["distributed"]))
    c = result.get("changes")
    if c:
        lines.append("Speed changes, before -> after (wall s; CPU s)")
        table(["change", "figure", "before", "after"],
              [[r["change"], r["figure"], f"{r['before']:.3f} ({r['before_cpu']:.3f})",
                f"{r['after']:.3f} ({r['after_cpu']:.3f})"] for r in c])
    return "\n".join(lines)


def write_figures(result: dict, folder: Path) -> list[Path]:
    """The book's PNGs: memory vs syn_steps, time per iteration per mode, before/after."""
    from .plotting import bench_before_after, bench_memory_vs_syn_steps, bench_seconds_per_iteration, bench_threads

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn, key in (("bench_memory_vs_syn_steps.png", bench_memory_vs_syn_steps, "memory"),
                          ("bench_seconds_per_iteration.png", bench_seconds_per_iteration, "distill"),
                          ("bench_before_after.png", bench_before_after, "changes"),
                          ("bench_threads.png", bench_threads, "threads")):
        if result.get(key):
            fig = fn(result)
            fig.savefig(folder / name, dpi=130)
            written.append(folder / name)
            import matplotlib.pyplot as plt

            plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# Entry point

SECTIONS = ("experts", "distill", "memory", "eval", "pool", "reference", "threads", "precision", "gpu")
# Run only when named: several fresh processes per row (mctlib/bench_distributed.py).
OPTIONAL_SECTIONS = ("distributed",)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mctlib bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and single repeats (a smoke test, not figures)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON file to write (default {DEFAULT_OUT})")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (all by default), or {','.join(OPTIONAL_SECTIONS)}")
    p.add_argument("--iterations", type=int, default=None, help="timed distillation iterations per configuration "
                   f"(default {FULL.iterations}; {QUICK.iterations} with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: device.configure_threads)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="GPU section precision")
    p.add_argument("--channels-last", action="store_true", help="GPU section: channels-last images")
    p.add_argument("--figures", default=None, help="folder for the PNG figures (default: none)")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    p.add_argument("--replot", default=None, help="draw figures/table from an existing bench JSON and exit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `mctlib bench -- --quick`: the separator argparse's REMAINDER keeps
        argv = argv[1:]
    args = make_parser().parse_args(argv)
    if args.child is not None:
        result = _child(json.loads(args.child))
        print(_RESULT_TAG + json.dumps(result), flush=True)
        return 0
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        _report(result, args)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS) - set(OPTIONAL_SECTIONS))
    if unknown:
        make_parser().error(f"--sections: unknown {unknown}; choose from {list(SECTIONS + OPTIONAL_SECTIONS)}")
    if args.iterations is not None and args.iterations < 1:
        make_parser().error("--iterations must be >= 1")
    sizes = QUICK if args.quick else FULL
    if args.iterations is not None:
        sizes = _replace_sizes(sizes, iterations=args.iterations)

    from .device import configure_threads

    settings = configure_threads(args.threads)
    started = time.perf_counter()
    result = {"format": FORMAT, "command": ["python", "-m", "mctlib", "bench", *(argv or [])], "quick": args.quick,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sizes": _sizes_dict(sizes), "settings": settings,
              "machine": machine(), "sections": sections}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mctlib-bench-") as tmp:
        work = Path(tmp)
        needs_stores = any(s in sections for s in ("experts", "distill", "memory", "threads"))
        if needs_stores:
            result["experts"] = section_experts(sizes, work, log)
            stores = result["experts"]["stores"]
        if "distill" in sections:
            result["distill"] = section_distill(sizes, stores, args.threads, log)
        if "memory" in sections:
            result["memory"] = section_memory(sizes, stores, args.threads, log)
        if "eval" in sections:
            result["eval"] = section_eval(sizes, log)
        if "pool" in sections:
            result["pool"] = section_pool(sizes, log)
        if "reference" in sections:
            result["reference"] = section_reference(sizes, log)
        if "threads" in sections:
            result["threads"] = section_threads(sizes, stores, log)
        if "precision" in sections:
            result["precision"] = section_precision(sizes, log)
        if "gpu" in sections:
            result["gpu"] = section_gpu(sizes, args.precision, args.channels_last, log)
        if "distributed" in sections:
            from .bench_distributed import section_distributed

            result["distributed"] = section_distributed(log, quick=args.quick)
        if "experts" in result:
            result["experts"]["stores"] = {k: "(temporary)" for k in result["experts"]["stores"]}
    result["changes"] = changes(result)
    result["seconds"] = time.perf_counter() - started
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps(result, indent=2) + "\n")
    _report(result, args)
    print(f"-> {out}")
    return 0


def _report(result: dict, args) -> None:
    print(format_table(result))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(format_table(result, markdown=True) + "\n")
    if args.figures:
        for path in write_figures(result, Path(args.figures)):
            print(f"figure -> {path}")


def _replace_sizes(sizes: Sizes, **changes) -> Sizes:
    import dataclasses

    return dataclasses.replace(sizes, **changes)


def _sizes_dict(sizes: Sizes) -> dict:
    import dataclasses

    return dataclasses.asdict(sizes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
