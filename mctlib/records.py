"""The two records of the same experts: the full buffer (MTT) and its convexified forms (MCT), chapter 3.

A `RecordSpec` names a record; `convexified_store` makes it once next to the full buffer, so every run
that matches it shares the experts of the runs that match the full buffer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .storage import TrajectoryStore, load_store, save_convexified


@dataclass(frozen=True)
class RecordSpec:
    """Which record of the experts a run matches: the full buffer, or a convexified one (K, beta, smoothing)."""

    kind: str = "convex"
    num_waypoints: int = 4
    beta_schedule: str = "arc_length"
    smooth: bool = True

    @property
    def label(self) -> str:
        if self.kind == "full":
            return "full buffer"
        return f"convex K={self.num_waypoints} {self.beta_schedule}" + ("" if self.smooth else " unsmoothed")


FULL = RecordSpec("full")


def record_spec(store: TrajectoryStore) -> RecordSpec:
    """The RecordSpec a loaded store holds."""
    if store.kind == "full":
        return FULL
    m = store.manifest
    return RecordSpec("convex", len(m["waypoint_epochs"]), m.get("beta_schedule") or m["recipe"]["beta_schedule"],
                      bool(m.get("smooth", m["recipe"].get("smooth", True))))


def convexified_store(store_full: TrajectoryStore, num_waypoints: int = 4, beta_schedule: str = "arc_length",
                      smooth: bool = True) -> TrajectoryStore:
    """The convexified record of `store_full`'s experts, saved next to it (loaded if already there).

    Same experts, same manifest facts as `mctlib convexify`: only the record differs, so MTT and
    MCT runs on the two stores compare the methods, not the experts.
    """
    if store_full.kind != "full":
        raise ValueError(f"{store_full.path} holds {store_full.kind} records; convexify needs full buffers")
    suffix = f"convex-K{num_waypoints}-{beta_schedule}" + ("" if smooth else "-unsmoothed")
    path = store_full.path.parent / f"{store_full.path.name}-{suffix}"
    if not (path / "manifest.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        try:
            save_convexified(store_full, tmp, num_waypoints, beta_schedule, smooth, overwrite=True)
            try:
                os.replace(tmp, path)
            except OSError:  # another process finished first: keep theirs
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    store = load_store(path, net=store_full.net, dataset=store_full.manifest["dataset"])
    if [e["init_seed"] for e in store.manifest["experts"]] != [e["init_seed"] for e in store_full.manifest["experts"]]:
        raise ValueError(f"{path} was convexified from other experts than {store_full.path}; move it away")
    return store


def store_for(spec: RecordSpec, store_full: TrajectoryStore) -> TrajectoryStore:
    """The store of `store_full`'s experts in the record `spec` asks for."""
    if spec.kind == "full":
        return store_full
    return convexified_store(store_full, spec.num_waypoints, spec.beta_schedule, spec.smooth)


def bytes_on_disk(store: TrajectoryStore) -> float:
    """Mean size in bytes of one expert's file, read from the file system (not from the manifest)."""
    sizes = [(store.path / e["file"]).stat().st_size for e in store.manifest["experts"]]
    return sum(sizes) / len(sizes)
