"""Section precision: bf16 autocast and channels-last against fp32 (loss and image gradient)."""

from __future__ import annotations

import time

import torch

from mctlib.augment import make_augment
from mctlib.device import channels_last, precision_context
from mctlib.matching import Student, match

from .common import Sizes, digits_match_inputs


def section_precision(sizes: Sizes, log) -> dict:
    """bf16 autocast and channels-last against fp32: loss and image gradient of one unrolled match."""
    model, images, labels, theta_start, theta_target, plan = digits_match_inputs(sizes)
    aug = make_augment(True)

    def run(precision, layout):
        student = Student(model, (lambda x, seed: channels_last(aug(x, seed))) if layout else aug)
        x = images.clone().requires_grad_(True)
        a = torch.tensor(0.01, requires_grad=True)
        w = time.perf_counter()
        with precision_context(precision, "cpu"):
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
