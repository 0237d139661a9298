"""Section pool: one MTT-unrolled match with `networks.AvgPool2x2` against torch's `nn.AvgPool2d`."""

from __future__ import annotations

import time

import torch

from mctlib.augment import make_augment
from mctlib.check.timings import stats
from mctlib.matching import Student, match

from .common import Sizes, digits_match_inputs, torch_pooled


def section_pool(sizes: Sizes, log) -> dict:
    """One MTT-unrolled match with `networks.AvgPool2x2` against torch's `nn.AvgPool2d`,
    interleaved: time and how far the loss and the image gradient move (rounding only)."""
    model, images, labels, theta_start, theta_target, plan = digits_match_inputs(sizes)
    augment = make_augment(True)
    ours, torchs = Student(model, augment), Student(torch_pooled(model), augment)

    def run(student):
        x = images.clone().requires_grad_(True)
        w, c = time.perf_counter(), time.process_time()
        r = match(student, x, labels, torch.tensor(0.01, requires_grad=True), theta_start, theta_target, plan,
                  "unrolled")
        return r.loss, x.grad, time.perf_counter() - w, time.process_time() - c

    times = {"torch_avg_pool2d": {"wall": [], "cpu": []}, "AvgPool2x2": {"wall": [], "cpu": []}}
    run(ours)  # warm-up
    for rep in range(sizes.eval_repeats + 2):
        before = run(torchs)
        after = run(ours)
        for name, r in (("torch_avg_pool2d", before), ("AvgPool2x2", after)):
            times[name]["wall"].append(r[2])
            times[name]["cpu"].append(r[3])
        log(f"pool repeat {rep + 1}: torch {before[2]:.2f} s, AvgPool2x2 {after[2]:.2f} s")
    return {"syn_steps": sizes.syn_steps,
            "variants": {k: {"seconds": stats(v["wall"]), "cpu_seconds": stats(v["cpu"])} for k, v in times.items()},
            "loss_rel_diff": abs(after[0] - before[0]) / abs(before[0]),
            "image_grad_rel_err": float((after[1] - before[1]).norm() / before[1].norm())}
