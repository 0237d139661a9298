"""Section experts: experts per minute, and bytes per expert for each record kind."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from .common import Sizes, _cpu_seconds, _digits_net


def section_experts(sizes: Sizes, work: Path, log) -> dict:
    """Experts per minute (full record) and bytes per expert of each record kind; writes the stores."""
    from .. import training
    from ..config import get_preset
    from ..data import load_dataset
    from ..experts import train_experts
    from ..networks import FlatModel, build_network
    from ..storage import load_store, save_store
    from ..trajectories import convexify

    dataset = load_dataset("digits")
    net = _digits_net(sizes)
    cfg = get_preset("mtt-digits-ipc10").expert.replace(num_experts=sizes.num_experts,
                                                        epochs=sizes.expert_epochs_trained, record="full", seed=0)
    out: dict = {"config": {"net": net.to_dict(), "expert": cfg.to_dict()}, "runs": {}}
    runs = [("loop", ())] + ([("vmap", ("cpu", "cuda"))] if sizes.experts_vmap else [])
    records = seeds = None
    for name, vmap_devices in runs:
        before = training.VMAP_DEVICES
        if vmap_devices:
            training.VMAP_DEVICES = vmap_devices
        try:
            gc.collect()
            w, c = time.perf_counter(), _cpu_seconds()
            recs, sds, st = train_experts(dataset, net, cfg, device="cpu", ensemble_size=8)
            wall, cpu = time.perf_counter() - w, _cpu_seconds() - c
        finally:
            training.VMAP_DEVICES = before
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
