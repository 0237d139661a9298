"""The one place for device, seeding and environment facts."""

from __future__ import annotations

import platform
import sys

import torch

from . import SMALL_MACHINE_CORES, available_cores


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" picks CUDA when present, else CPU; anything else is taken as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu or 'auto'")
    return device


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
    import os

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


PRECISIONS = ("fp32", "bf16")


def autocast(precision: str = "fp32", device: str | torch.device = "cpu"):
    """The context a student forward/backward runs in at `precision`: "fp32" changes nothing,
    "bf16" is torch.autocast (convolutions and matmuls in bfloat16, reductions and the parameter
    update stay float32). Check a new precision against fp32 before trusting it (`mctlib bench`)."""
    import contextlib

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; choose one of {list(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) in channels-last memory order (a differentiable copy; same values). Forced
    with clone: for C = 1 `contiguous(memory_format=...)` keeps the NCHW strides."""
    return x.clone(memory_format=torch.channels_last)


def versions() -> dict:
    """Library and machine versions recorded next to every output."""
    import numpy

    from . import __version__

    info = {
        "mctlib": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:  # torchvision is optional for the digits default
        info["torchvision"] = None
    return info
