"""What every section shares: the sizes, statistics, the machine's description, timing and memory helpers,
the seeded inputs the sections compare settings on, and the measured matmul rate."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import available_cores


MODES = ("unrolled", "checkpointed", "constant_memory")


METHODS = ("mtt", "mct")


FORMAT = "mctlib-bench-v1"


DEFAULT_OUT = "runs/bench/bench.json"


# The reported figure for the original MTT code, digits bench config, this machine kind
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
    from ..device import versions

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


def _then(augment, after):
    return lambda x, seed: after(augment(x, seed))


def _count_flops(student, images, labels, alpha, theta_start, theta_target, plan, mode, precision, device) -> int:
    """Floating-point operations of one match() (convolutions and matmuls, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..device import autocast
    from ..matching import match

    counter = FlopCounterMode(display=False)
    with counter, autocast(precision, device):
        match(student, images.clone().requires_grad_(True), labels, alpha.clone().requires_grad_(True),
              theta_start, theta_target, plan, mode)
    return int(counter.get_total_flops())


def _digits_net(sizes: Sizes):
    """The digits preset's ConvNet (width 64, depth 3, 16x16) at the bench's width."""
    import dataclasses

    from ..config import get_preset

    return dataclasses.replace(get_preset("mtt-digits-ipc10").net, width=sizes.width)


@contextlib.contextmanager
def _torch_avg_pool():
    """The library before `networks.AvgPool2x2`: torch's `F.avg_pool2d` on every device (the
    "before" rows of that change)."""
    from ..networks import AvgPool2x2

    before = AvgPool2x2.forward
    AvgPool2x2.forward = lambda self, x: torch.nn.functional.avg_pool2d(x, 2, 2)
    try:
        yield
    finally:
        AvgPool2x2.forward = before


def _digits_match_inputs(sizes: Sizes):
    """One unrolled match's inputs at the digits bench shapes: (model, images, labels, theta_start,
    theta_target, plan), random but seeded, the same for every section that compares settings."""
    from ..matching import plan_student
    from ..networks import FlatModel, build_network

    net = _digits_net(sizes)
    model = FlatModel(build_network(net, seed=0))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(100, net.channels, net.image_size, net.image_size, generator=gen)
    labels = torch.arange(10).repeat_interleave(10)
    theta_start = model.flatten()
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=gen)
    plan = plan_student(100, sizes.syn_steps, None, gen)
    return model, images, labels, theta_start, theta_target, plan


# The published CIFAR-10 presets the GPU rows use, one row per distinct student shape: MTT and MCT
# share (ipc, syn_steps, batch_syn) at IPC 10 and 50, and a match on random inputs does not depend on
# the method, so such a shape is timed once and labelled with both.
def _cifar_configs() -> list[tuple[str, int, int, int | None]]:
    """(methods joined by "+", ipc, syn_steps, batch_syn) for each distinct CIFAR-10 preset shape."""
    from ..config import get_preset

    shapes: dict[tuple, list[str]] = {}
    for method in METHODS:
        for ipc in (1, 10, 50):
            d = get_preset(f"{method}-cifar10-ipc{ipc}").distill
            shapes.setdefault((ipc, d.syn_steps, d.batch_syn), []).append(method)
    return [("+".join(methods), ipc, steps, batch) for (ipc, steps, batch), methods in shapes.items()]


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


def _replace_sizes(sizes: Sizes, **changes) -> Sizes:
    import dataclasses

    return dataclasses.replace(sizes, **changes)


def _sizes_dict(sizes: Sizes) -> dict:
    import dataclasses

    return dataclasses.asdict(sizes)
