"""What every section shares: the sizes, the machine's description, the memory probe, the seeded
inputs the sections compare settings on, and the ConvNet with torch's own pooling (the "before" of
`networks.AvgPool2x2`). Statistics, the matmul rate and the match timers are the acceptance check's
(`mctlib.check.timings`), so the bench and the check time the same way."""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from mctlib import available_cores
from mctlib.config import get_preset
from mctlib.device import versions
from mctlib.matching import plan_student
from mctlib.networks import AvgPool2x2, FlatModel, NetConfig, build_network

MODES = ("unrolled", "checkpointed", "constant_memory")
FORMAT = "mctlib-bench-v1"
DEFAULT_OUT = "runs/bench/bench.json"
# The reported figure for the original MTT code, digits bench config, this machine kind
# (median of 200 iterations, 2 cores); not measured here (no network access to fetch that code).
ORIGINAL_MTT_SECONDS = 2.5
TARGET_MTT_UNROLLED_SECONDS = 1.65


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
    gpu_iterations: int = 10
    experts_vmap: bool = True
    thread_settings: int = 4          # how many of section_threads' settings to run (quick: the 1-thread ones)
    thread_contention: bool = True    # also time each thread setting with busy processes on every core
    reference_iterations: int = 8     # timed iterations per row of the reference section
    reference_gpu_ipcs: tuple[int, ...] = (1, 50)  # CIFAR-10 IPCs of the reference section on CUDA


FULL = Sizes()
QUICK = Sizes(num_experts=2, expert_epochs_trained=3, width=16, syn_steps=2, iterations=2, warmup=1,
              memory_steps=(1, 2), memory_iterations=1, eval_nets=2, eval_epochs=2, eval_repeats=1,
              thread_iterations=1, gpu_iterations=2, experts_vmap=False, thread_settings=2,
              thread_contention=False, reference_iterations=1, reference_gpu_ipcs=(1,))


def machine() -> dict:
    """CPU model and cores, GPU, load and library versions: printed next to every figure."""
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_probe(device: torch.device):
    """Start a peak-memory measurement; call the returned function at the end for the rise in MB
    (CUDA: max_memory_allocated; CPU: the process's peak resident set, reset now, over its resident set now)."""
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


def digits_net(sizes: Sizes) -> NetConfig:
    """The digits preset's ConvNet (width 64, depth 3, 16x16) at the bench's width."""
    return dataclasses.replace(get_preset("mtt-digits-ipc10").net, width=sizes.width)


def torch_pooled(model: FlatModel) -> FlatModel:
    """The same network with torch's `nn.AvgPool2d` where the library has `networks.AvgPool2x2`: the
    library before that change (the "before" rows)."""
    module = copy.deepcopy(model.module)
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, AvgPool2x2):
                setattr(parent, name, torch.nn.AvgPool2d(2, 2))
    return FlatModel(module)


def digits_match_inputs(sizes: Sizes):
    """One unrolled match's inputs at the digits bench shapes: (model, images, labels, theta_start,
    theta_target, plan), random but seeded, the same for every section that compares settings."""
    net = digits_net(sizes)
    model = FlatModel(build_network(net, seed=0))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(100, net.channels, net.image_size, net.image_size, generator=gen)
    labels = torch.arange(10).repeat_interleave(10)
    theta_start = model.flatten()
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=gen)
    plan = plan_student(100, sizes.syn_steps, None, gen)
    return model, images, labels, theta_start, theta_target, plan
