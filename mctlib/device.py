"""The one place for device, seeding and environment facts."""

from __future__ import annotations

import contextlib
import os
import platform
import sys

import torch

from . import SMALL_MACHINE_CORES, available_cores


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" picks CUDA when present, else CPU; anything else is taken as given.

    Every entry point resolves its device here, so this is also where a CUDA run is made
    reproducible and full precision (`configure_determinism`) before its first kernel."""
    if device is None or device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu or 'auto'")
    if device.type == "cuda":
        configure_determinism()
    return device


def configure_determinism() -> dict:
    """Deterministic kernels and no TF32, the defaults of every CUDA run.

    - torch.use_deterministic_algorithms(True, warn_only=True): deterministic kernels wherever torch
      has them; a kernel without one warns (and `mctlib check` fails on such a warning) rather than
      stopping a reader's chapter. The library's own non-deterministic backwards, grid_sample, gather
      and adaptive pooling, are replaced off the CPU (augment.NATIVE_DEVICES, networks.GlobalAvgPool).
      cuBLAS needs CUBLAS_WORKSPACE_CONFIG for it, set here if the user has not (it must precede the
      first cuBLAS call).
      fill_uninitialized_memory stays off: the library never reads memory it has not written.
    - cudnn.deterministic, no cudnn.benchmark: the same convolution algorithm on every run.
    - TF32 off for cuDNN (torch's default is on) and matmuls: fp32 is fp32 unless `precision="tf32"`
      (`precision_context`) says otherwise.
    Only CUDA runs call it: on the CPU the kernels the library uses are deterministic at a fixed
    thread count already (tests/test_distill.py), and deterministic mode would route CPU index_put
    through a slower path."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return determinism()


def determinism() -> dict:
    """The process's current determinism and TF32 settings (recorded by `mctlib check`)."""
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch.Generator on `device`, seeded explicitly (never from the clock)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


# On a small machine (<= this many cores) torch runs on one thread unless OpenMP's threads sleep
# while they wait (OMP_WAIT_POLICY=PASSIVE, which `python -m mctlib` sets there). Measured by
# `python -m mctlib bench` (book/performance.md, run 3), MTT unrolled on 2 cores: two busy-waiting
# threads are 1.9x faster than one while nothing else runs, 2.5x slower once other processes
# share the cores; two passive threads are 26% / 18% faster than one in those two cases. The
# thread count also changes results in the last bits, so it must not follow the load.
SINGLE_THREAD_MAX_CORES = SMALL_MACHINE_CORES


def configure_threads(threads: int | None = None, tune_allocator: bool = True) -> dict:
    """The one place that sets CPU speed knobs; call it once at start-up (the CLI and the bench do).

    threads: torch intra-op threads. None takes $MCTLIB_THREADS; else, on machines with at most
    `SINGLE_THREAD_MAX_CORES` cores, 1 unless OMP_WAIT_POLICY=PASSIVE was in the environment when
    torch loaded (then sharing the cores costs little and all of them are used; the command line
    sets it there); else torch's default (all cores). tune_allocator: on Linux/glibc, keep freed
    memory in the process instead of handing large blocks back to the kernel after every tensor
    (the unrolled student allocates and frees over 1 GB per iteration; refaulting it costs 4-9% of
    an iteration). Returns what was set. Changes no result beyond the last bits that any thread
    count does.
    """
    cores = available_cores()
    if threads is None and os.environ.get("MCTLIB_THREADS"):
        value = os.environ["MCTLIB_THREADS"]
        if not value.strip().isdigit():
            raise ValueError(f"MCTLIB_THREADS={value!r} is not a positive integer; unset it or set e.g. MCTLIB_THREADS=2")
        threads = int(value)
    if threads is None:
        passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
        threads = 1 if cores <= SINGLE_THREAD_MAX_CORES and not passive else torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads = {threads} must be >= 1")
    torch.set_num_threads(int(threads))
    tuned = tune_glibc_allocator() if tune_allocator else False
    return {"threads": torch.get_num_threads(), "cores": cores, "allocator_tuned": tuned,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def tune_glibc_allocator() -> bool:
    """glibc mallopt: no mmap per large block and no trimming, so freed tensors are reused in place."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # mallopt returns 1 on success. A tensor below the mmap threshold comes from the heap, whose
        # freed blocks the next iteration reuses; some glibc versions cap the threshold at 32 MiB.
        ok = any(libc.mallopt(m_mmap_threshold, size) == 1 for size in (1 << 30, 32 << 20))
        return bool(ok and libc.mallopt(m_trim_threshold, 1 << 30) == 1)
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False


PRECISIONS = ("fp32", "tf32", "bf16")


def precision_context(precision: str = "fp32", device: str | torch.device = "cpu"):
    """The context a forward/backward runs in at `precision` (the one place precision is applied).

    "fp32": float32 throughout, TF32 off (the default; `configure_determinism` turns off torch's
    cuDNN TF32). "tf32": cuDNN convolutions and matmuls may use TF32 tensor cores (10-bit mantissa
    inputs, float32 accumulation; on a CPU it changes nothing). "bf16": torch.autocast to bfloat16
    (convolutions and matmuls in bfloat16, reductions and the parameter update float32; DSA opts
    out). Each is checked against fp32 by `mctlib check`, with tolerances per precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; choose one of {list(PRECISIONS)}")
    stack = contextlib.ExitStack()
    stack.enter_context(_tf32(precision == "tf32"))
    if precision == "bf16":
        stack.enter_context(torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16))
    return stack


autocast = precision_context  # the name the bench used first


@contextlib.contextmanager
def _tf32(enabled: bool):
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def device_name(device: str | torch.device) -> str:
    """What identifies a device's arithmetic in a run's config: "cpu", or "cuda (<GPU model>)".
    Two GPUs of the same model give the same results; another model, or the CPU, need not."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def compute_identity(device: str | torch.device, precision: str = "fp32") -> dict:
    """The part of a run's identity that is where and how it computes: device name and precision.
    A run resumed or a result reused elsewhere would silently follow other random streams (DSA draws
    on the device) and other rounding, so resume and caches compare it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; choose one of {list(PRECISIONS)}")
    return {"device": device_name(device), "precision": precision}


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) in channels-last memory order (a differentiable copy; same values). Forced
    with clone: for C = 1 `contiguous(memory_format=...)` keeps the NCHW strides."""
    return x.clone(memory_format=torch.channels_last)


def versions(device: str | torch.device | None = None) -> dict:
    """Library and machine versions recorded next to every output. The GPU is recorded when `device`
    is a CUDA device, or, for device None, whenever torch sees one; never for a CPU run."""
    import numpy

    from . import __version__

    gpu_device = torch.device("cuda") if device is None else torch.device(device)
    gpu = gpu_device.type == "cuda" and torch.cuda.is_available()
    info = {
        "mctlib": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if gpu else None,
        "gpu": torch.cuda.get_device_name(gpu_device) if gpu else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:  # torchvision is optional for the digits default
        info["torchvision"] = None
    return info
