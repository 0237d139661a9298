"""Section experts: experts per minute, and bytes per expert for each record kind."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from mctlib.config import get_preset
from mctlib.data import load_dataset
from mctlib.experts import train_experts
from mctlib.networks import FlatModel, build_network
from mctlib.storage import load_store, save_store
from mctlib.trajectories import convexify

from .common import Sizes, digits_net


def section_experts(sizes: Sizes, work: Path, log) -> dict:
    """Experts per minute (full record) and bytes per expert of each record kind; writes the stores."""
    dataset = load_dataset("digits")
    net = digits_net(sizes)
    cfg = get_preset("mtt-digits-ipc10").expert.replace(num_experts=sizes.num_experts,
                                                        epochs=sizes.expert_epochs_trained, record="full", seed=0)
    out: dict = {"config": {"net": net.to_dict(), "expert": cfg.to_dict()}, "runs": {}}
    runs = [("loop", None)] + ([("vmap", True)] if sizes.experts_vmap else [])  # None: the CPU's default, a loop
    records = seeds = None
    for name, use_vmap in runs:
        gc.collect()
        w, c = time.perf_counter(), time.process_time()
        recs, sds, st = train_experts(dataset, net, cfg, device="cpu", ensemble_size=8, use_vmap=use_vmap)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
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
