"""Cost of a preset on a GPU, estimated from FLOPs and saved activations counted on the CPU."""

from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .augment import make_augment
from .config import Preset
from .data import DATASET_INFO
from .matching import Student, match, plan_student
from .networks import FlatModel, build_network


def _probe_dataset_free(preset: Preset, images: int, steps: int, mode: str) -> tuple[float, float, int]:
    """(FLOPs, bytes saved for backward, aten ops) of one `match` on `images` random synthetic images
    with `steps` student steps, on CPU, with the preset's network and DSA."""
    net = preset.net
    model = FlatModel(build_network(net, seed=0))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(images, net.channels, net.image_size, net.image_size, generator=gen)
    y = torch.arange(images) % net.num_classes
    theta = model.flatten()
    target = theta + 1e-3 * torch.randn(theta.shape, generator=gen)
    plan = plan_student(images, steps, None, gen)
    student = Student(model, make_augment(preset.distill.dsa))
    alpha = torch.tensor(preset.distill.lr_teacher, requires_grad=True)
    x.requires_grad_(True)
    saved: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    counter = FlopCounterMode(display=False)
    with counter, Count(), saved_tensors_hooks(pack, lambda t: t):
        match(student, x, y, alpha, theta, target, plan, mode)
    return float(counter.get_total_flops()), float(sum(saved.values())), Count.ops


def estimate_cost(preset: Preset, throughput: float = 5e12, launch_seconds: float = 10e-6,
                  probe_images: int = 2) -> dict:
    """Estimated cost of one preset on a GPU, from quantities counted on the CPU.

    FLOPs, aten-op counts and the bytes the unrolled graph saves for backward are measured for one
    matching step on `probe_images` random images with one and with two student steps, then scaled to
    the preset's batch and syn_steps (all three are linear in them). Time per iteration =
    FLOPs / `throughput` + ops x `launch_seconds`. Activation memory by gradient mode: unrolled keeps
    every step's graph; constant_memory about one step's; checkpointed one step's plus the N kept
    parameter vectors. GPU memory adds the synthetic set (and its momentum, gradient) and every expert
    record, which `distill` moves to the device. Evaluation and experts: 3 forward FLOPs per image and
    epoch. The throughput and the launch latency are assumptions, not measurements."""
    d, ev, e = preset.distill, preset.eval, preset.expert
    n_syn = d.ipc * preset.net.num_classes
    batch = min(d.batch_syn or n_syn, n_syn)
    scale = batch / probe_images
    f1, m1, o1 = _probe_dataset_free(preset, probe_images, 1, "unrolled")
    f2, m2, o2 = _probe_dataset_free(preset, probe_images, 2, "unrolled")
    flops = (f1 + (d.syn_steps - 1) * (f2 - f1)) * scale
    ops = o1 + (d.syn_steps - 1) * (o2 - o1)
    model = FlatModel(build_network(preset.net))
    activations = {"unrolled": (m1 + (d.syn_steps - 1) * (m2 - m1)) * scale,
                   "constant_memory": m1 * scale,
                   "checkpointed": m1 * scale + 4 * d.syn_steps * model.numel}
    fwd = FlopCounterMode(display=False)
    with fwd, torch.no_grad():
        model.module(torch.zeros(1, preset.net.channels, preset.net.image_size, preset.net.image_size))
    fwd_flops = float(fwd.get_total_flops())
    seconds = flops / throughput + ops * launch_seconds
    pixels = n_syn * preset.net.channels * preset.net.image_size ** 2
    record_vectors = e.epochs + 1 if e.record == "full" else e.num_waypoints
    fixed = 4 * (3 * pixels + e.num_experts * record_vectors * model.numel)
    evals = d.iterations // d.eval_every + 1 if d.eval_every else 0
    eval_flops = ev.num_eval * ev.epochs * n_syn * 3 * fwd_flops
    info = DATASET_INFO[preset.data.name]
    train_size = info.num_classes * preset.data.train_per_class if preset.data.train_per_class else info.train_size
    expert_flops = e.num_experts * e.epochs * train_size * 3 * fwd_flops
    return {"preset": preset.name, "parameters": model.numel, "forward_flops_per_image": fwd_flops,
            "flops_per_iteration": flops, "ops_per_iteration": ops, "seconds_per_iteration": seconds,
            "distill_hours": d.iterations * seconds / 3600, "activation_bytes": activations[d.gradient_mode],
            "gpu_bytes": activations[d.gradient_mode] + fixed,
            "gpu_bytes_by_mode": {m: a + fixed for m, a in activations.items()}, "records_bytes": fixed,
            "evaluations": evals, "hours_per_evaluation": eval_flops / throughput / 3600,
            "eval_hours": evals * eval_flops / throughput / 3600, "expert_hours": expert_flops / throughput / 3600,
            "throughput": throughput, "launch_seconds": launch_seconds}
