"""Experts: networks trained on the real data with plain SGD, their trajectories recorded.

Experts train in ensembles (see `training.train_networks`). Each epoch's parameters go either
into a full buffer (MTT) or straight into a `ConvexRecorder` (MCT), which keeps a few vectors
and the beta table: the full trajectory of a convexified expert is never held in memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .augment import make_augment
from .config import ExpertConfig
from .data import Dataset
from .device import compute_identity, precision_context, resolve_device
from .networks import FlatModel, NetConfig, build_network
from .storage import TrajectoryStore, check_destination, load_store, save_store
from .training import SGDRecipe, accuracy, derive_seed, train_networks
from .trajectories import ConvexRecorder, FullBuffer
from .workers import parallel_jobs


def init_seed(cfg: ExpertConfig, index: int) -> int:
    """Expert `index`'s initialisation seed: theta_0 can be rebuilt from it bit for bit."""
    return derive_seed(cfg.seed, index, 0)


def train_experts(dataset: Dataset, net: NetConfig, cfg: ExpertConfig, device=None, ensemble_size: int = 8,
                  progress: bool = False, indices: range | None = None,
                  use_vmap: bool | None = None) -> tuple[list, list[int], dict]:
    """Train cfg.num_experts experts; returns (records, init seeds, stats with test accuracies and seconds).

    `indices`: only these experts (default all), in ensembles from indices.start; a distributed run
    trains its share this way (distributed.make_experts). `use_vmap`: see `training.train_networks`."""
    if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
        raise ValueError(f"ensemble_size = {ensemble_size!r} must be an integer >= 1")
    indices = range(cfg.num_experts) if indices is None else indices
    device = resolve_device(device)
    model = FlatModel(build_network(net)).to(device)
    images, labels = dataset.train_images.to(device), dataset.train_labels.to(device)
    recipe = SGDRecipe(lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay)
    augment = make_augment(cfg.dsa)
    records, seeds, accs = [], [], []
    bar = _bar(len(indices) * cfg.epochs, "experts", progress)
    start = time.perf_counter()
    for first in range(indices.start, indices.stop, ensemble_size):
        members = range(first, min(first + ensemble_size, indices.stop))
        chunk_seeds = [init_seed(cfg, i) for i in members]
        params = torch.stack([FlatModel(build_network(net, seed=s)).flatten() for s in chunk_seeds]).to(device)
        if cfg.record == "full":
            buffers: list[list[torch.Tensor]] = [[] for _ in members]

            def on_epoch(epoch, p, buffers=buffers):
                for m, buf in enumerate(buffers):
                    buf.append(p[m].detach().clone().cpu())  # an explicit copy (MTT's CPU snapshots aliased)
        else:
            recorders = [ConvexRecorder(model.layer_slices, cfg.epochs, cfg.num_waypoints, cfg.beta_schedule,
                                        cfg.smooth) for _ in members]

            def on_epoch(epoch, p, recorders=recorders):
                for m, rec in enumerate(recorders):
                    rec.update(epoch, p[m])

        final = train_networks(model, params, images, labels, recipe, [derive_seed(cfg.seed, i, 1) for i in members],
                               augment, on_epoch=on_epoch, progress=(lambda e: bar.update(len(members))) if bar else None,
                               use_vmap=use_vmap)
        accs += accuracy(model, final, dataset.test_images.to(device), dataset.test_labels.to(device),
                         use_vmap=use_vmap).tolist()
        if cfg.record == "full":
            records += [FullBuffer(torch.stack(buf)) for buf in buffers]
        else:
            records += [rec.finish().to("cpu") for rec in recorders]
        seeds += chunk_seeds
    if bar:
        bar.close()
    seconds = time.perf_counter() - start
    return records, seeds, {"test_accuracy": accs, "seconds": seconds, "ensemble_size": ensemble_size,
                            "experts_per_minute": 60 * len(indices) / seconds}


def _train_ensemble(dataset: Dataset, net: NetConfig, cfg: ExpertConfig, device, ensemble_size: int, precision: str,
                    indices: range) -> tuple[list, list[int], dict]:
    """In a worker process: one ensemble of experts (`train_experts` on `indices`)."""
    with precision_context(precision, device):
        return train_experts(dataset, net, cfg, device, ensemble_size=ensemble_size, indices=indices)


def make_experts(dataset: Dataset, net: NetConfig, cfg: ExpertConfig, out: str | Path, device=None,
                 progress: bool = False, overwrite: bool = False, ensemble_size: int = 8,
                 precision: str = "fp32", workers: int = 1) -> TrajectoryStore:
    """Train experts at `precision` (see device.precision_context) and write their store to `out`
    (refuses to overwrite an existing store); the manifest records the device name and precision.

    `workers` > 1: the ensembles (`ensemble_size` experts each) are trained in that many single-threaded
    processes at once (`workers.parallel_jobs`), with the same files as one process with the same
    ensemble size; on a CPU give an ensemble size that leaves each worker an ensemble."""
    out = Path(out)
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a trajectory store; choose another --out, or load it with load_store")
    check_destination(out)  # before training: a folder that cannot be written would lose it all
    device = resolve_device(device)
    chunks = [range(first, min(first + ensemble_size, cfg.num_experts))
              for first in range(0, cfg.num_experts, ensemble_size)]
    if workers > 1 and len(chunks) > 1:
        start = time.perf_counter()
        parts = parallel_jobs(_train_ensemble, [(dataset, net, cfg, device, ensemble_size, precision, c)
                                                for c in chunks], workers, progress, desc="expert ensembles")
        seconds = time.perf_counter() - start
        records = [r for part in parts for r in part[0]]
        seeds = [s for part in parts for s in part[1]]
        stats = {"test_accuracy": [a for part in parts for a in part[2]["test_accuracy"]], "seconds": seconds,
                 "ensemble_size": ensemble_size, "experts_per_minute": 60 * cfg.num_experts / seconds}
    else:
        with precision_context(precision, device):
            records, seeds, stats = train_experts(dataset, net, cfg, device, ensemble_size=ensemble_size,
                                                  progress=progress)
    save_store(out, records, net, dataset.describe(), cfg.to_dict(), seeds, store_theta0=cfg.store_theta0,
               extra={"stats": stats, "compute": compute_identity(device, precision),
                      "beta_schedule": cfg.beta_schedule if cfg.record == "convex" else None,
                      "smooth": cfg.smooth if cfg.record == "convex" else None}, overwrite=overwrite)
    return load_store(out)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    # tqdm.auto only when a bar is asked for: importing it in a notebook without ipywidgets prints a warning
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", leave=False)
