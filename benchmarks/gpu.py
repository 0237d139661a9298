"""Section gpu: the CIFAR-10 preset shapes on CUDA, the acceptance check's rows (`mctlib.check.timings.gpu_rows`):
the engine against the original loop (IPC 1 and 50), the achieved fraction of the measured matmul rate, and
peak memory against the engine's own estimate (`cost.estimate_cost`)."""

from __future__ import annotations

from mctlib.check.timings import gpu_rows

from .common import Sizes


def section_gpu(sizes: Sizes, precision: str, layout: bool, log) -> dict:
    """CIFAR-10 preset shapes on CUDA; without a CUDA device every row says so."""
    return gpu_rows(precision, sizes.gpu_iterations, sizes.reference_gpu_ipcs, layout, log)
