"""Section eval: evaluation networks trained together against one after another, and the compute floor."""

from __future__ import annotations

import dataclasses
import gc
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mctlib.augment import make_augment
from mctlib.check.timings import matmul_rate, stats
from mctlib.config import get_preset
from mctlib.data import load_dataset, real_images_per_class
from mctlib.networks import FlatModel, build_network
from mctlib.training import SGDRecipe, accuracy, derive_seed, train_networks

from .common import Sizes, digits_net, torch_pooled


def section_eval(sizes: Sizes, log) -> dict:
    """num_eval networks trained together (M at once) vs one after another (M = 1 calls)."""
    dataset = load_dataset("digits")
    net = digits_net(sizes)
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

    before_pool = torch_pooled(model)  # the library before networks.AvgPool2x2

    def together(net_model, use_vmap=None):
        return lambda: train_networks(net_model, params, images, labels, recipe, seeds, augment, use_vmap=use_vmap)

    def sequential():
        return torch.cat([train_networks(model, params[i:i + 1], images, labels, recipe, [seeds[i]], augment)
                          for i in range(m)])

    # each change against the library just before it: vmap -> loop (torch pooling) -> AvgPool2x2
    variants = {"ensemble": together(model), "sequential": sequential,
                "ensemble_vmap": together(before_pool, use_vmap=True),
                "ensemble_torch_pool": together(before_pool)}
    times = {k: {"wall": [], "cpu": []} for k in variants}
    finals = {}
    for rep in range(sizes.eval_repeats):
        for name, fn in variants.items():
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            finals[name] = fn()
            times[name]["wall"].append(time.perf_counter() - w)
            times[name]["cpu"].append(time.process_time() - c)
        log(f"eval repeat {rep + 1}: " + ", ".join(f"{k} {v['wall'][-1]:.2f} s" for k, v in times.items()))
    acc = {k: accuracy(model, p, dataset.test_images, dataset.test_labels).tolist() for k, p in finals.items()}
    out = {"num_eval": m, "epochs": e, "images": int(images.shape[0]), "batch_size": recipe.batch_size,
           "variants": {k: {"seconds": stats(v["wall"]), "cpu_seconds": stats(v["cpu"]), "accuracies": acc[k],
                            "mean_accuracy": sum(acc[k]) / len(acc[k])} for k, v in times.items()}}
    seq = out["variants"]["sequential"]["seconds"]["median"]
    out["compute_floor"] = compute_floor(model, params, images, labels, recipe, seeds, augment, seq)
    log(f"eval compute floor: {out['compute_floor']['floor_seconds']:.2f} s at "
        f"{out['compute_floor']['matmul_gflops']:.0f} GFLOP/s; batching can gain at most "
        f"{out['compute_floor']['max_speedup_vs_sequential']:.2f}x")
    for k in ("ensemble", "ensemble_vmap", "ensemble_torch_pool"):
        out["variants"][k]["speedup_vs_sequential"] = seq / out["variants"][k]["seconds"]["median"]
        out["variants"][k]["max_param_diff_vs_sequential"] = float((finals[k] - finals["sequential"]).abs().max())
    out["target"] = {"speedup": out["variants"]["ensemble"]["speedup_vs_sequential"], "target": 3.0,
                     "met": out["variants"]["ensemble"]["speedup_vs_sequential"] >= 3.0}
    return out


def compute_floor(model, params, images, labels, recipe, seeds, augment, sequential_seconds: float) -> dict:
    """The least time any form of training the M networks could take on this CPU: their convolution
    and matmul FLOPs (counted over one epoch of one network, x epochs x M) at the dense matmul rate
    measured now, on the same threads. Training them together changes how the work is scheduled,
    not how much there is, so sequential time / floor bounds the speed-up any batched form can
    reach. (The count includes `AvgPool2x2`'s matmuls, mostly multiplications by zero: 2-3% of
    it for the digits ConvNet, so the floor is that much too high.)"""
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
