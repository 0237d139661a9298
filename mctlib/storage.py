"""On-disk trajectory stores: one safetensors file per expert plus a JSON manifest (no pickle).

The manifest records the network, dataset and preprocessing, the expert recipe, seeds,
library versions, the record kind and, per expert, the file's SHA-256 and size. Loading checks
all of it: a store made for another network or dataset is refused with both sides named, and
a truncated or altered file is caught by its checksum before any tensor is trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .device import versions
from .networks import FlatModel, NetConfig, build_network
from .trajectories import ConvexRecord, FullBuffer, convexify

FORMAT = "mctlib-trajectories"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


_UMASK = os.umask(0)
os.umask(_UMASK)


class StoreError(RuntimeError):
    """A trajectory store that cannot be used as asked (corrupt, foreign, or mismatched)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should look like any file the user writes
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def tensor_sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor's exact bytes (bit-for-bit identity)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def theta0_from_seed(net: NetConfig, seed: int) -> torch.Tensor:
    """theta_0 regenerated from its initialisation seed (built on CPU, so it is the same everywhere)."""
    return FlatModel(build_network(net, seed=seed)).flatten()


@dataclass
class TrajectoryStore:
    """A loaded store: its manifest and one record per expert."""

    path: Path
    manifest: dict
    records: list  # FullBuffer | ConvexRecord

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def net(self) -> NetConfig:
        return NetConfig.from_dict(self.manifest["net"])

    @property
    def bytes_per_expert(self) -> float:
        return sum(e["bytes"] for e in self.manifest["experts"]) / len(self.manifest["experts"])


def _record_tensors(record, store_theta0: bool) -> dict[str, torch.Tensor]:
    if isinstance(record, FullBuffer):
        params = record.params if store_theta0 else record.params[1:]
        return {"params": params.detach().cpu().contiguous()}
    waypoints = record.waypoints if store_theta0 else record.waypoints[1:]
    return {"waypoints": waypoints.detach().cpu().contiguous(), "beta": record.beta.detach().cpu().float().contiguous()}


def save_store(path: str | Path, records: list, net: NetConfig, dataset: dict, recipe: dict,
               init_seeds: list[int], store_theta0: bool = True, extra: dict | None = None,
               overwrite: bool = False) -> Path:
    """Write one store: expert_NNN.safetensors per record and manifest.json (written last)."""
    path = Path(path)
    if (path / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a trajectory store; choose another --out or pass overwrite=True")
    kinds = {type(r) for r in records}
    if len(kinds) != 1:
        raise ValueError("a store holds one record kind; got " + ", ".join(k.__name__ for k in kinds))
    kind = "full" if kinds == {FullBuffer} else "convex"
    model = FlatModel(build_network(net))
    experts = []
    for i, (record, seed) in enumerate(zip(records, init_seeds, strict=True)):
        theta0 = record.params[0] if kind == "full" else record.waypoints[0]
        data = st_save(_record_tensors(record, store_theta0))
        name = f"expert_{i:03d}.safetensors"
        atomic_write_bytes(path / name, data)
        experts.append({"file": name, "init_seed": int(seed), "sha256": hashlib.sha256(data).hexdigest(),
                        "bytes": len(data), "theta0_sha256": tensor_sha256(theta0)})
    first = records[0]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "net": net.to_dict(), "dataset": dataset, "recipe": recipe,
        "num_params": model.numel, "layers": [{"name": n, "shape": list(s)} for n, s in zip(model.names, model.shapes)],
        "epochs": first.epochs, "theta0": "stored" if store_theta0 else "seed",
        "experts": experts, "versions": versions(), **(extra or {}),
    }
    if kind == "convex":
        manifest["waypoint_epochs"] = list(first.waypoint_epochs)
    atomic_write_json(path / MANIFEST, manifest)
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.exists():
        raise StoreError(f"{path} is not a trajectory store: no {MANIFEST}. Create one with `mctlib experts --out {path}`")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{file} is corrupt ({err}); re-create the store with `mctlib experts`") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not an mctlib trajectory manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{file} has format_version {manifest.get('format_version')}; this mctlib reads {FORMAT_VERSION}")
    return manifest


def check_match(manifest: dict, net: NetConfig | None, dataset: dict | None, path: Path) -> None:
    """Refuse a store recorded for another network or dataset setting, naming both sides."""
    if net is not None and manifest["net"] != net.to_dict():
        diff = {k: (manifest["net"].get(k), v) for k, v in net.to_dict().items() if manifest["net"].get(k) != v}
        raise StoreError(f"{path} was recorded for another network: " +
                         ", ".join(f"{k}: store {a!r} vs requested {b!r}" for k, (a, b) in diff.items()))
    if dataset is not None:
        stored = manifest["dataset"]
        # The split (counts per class) is compared too: experts trained on another split saw other images.
        keys = [k for k in ("name", "image_size", "zca", "channels", "num_classes", "num_train", "num_test",
                            "train_per_class") if k in dataset and k in stored]
        diff = {k: (stored[k], dataset[k]) for k in keys if stored[k] != dataset[k]}
        if diff:
            raise StoreError(f"{path} was recorded on another dataset setting: " +
                             ", ".join(f"{k}: store {a!r} vs requested {b!r}" for k, (a, b) in diff.items()))


def load_store(path: str | Path, net: NetConfig | None = None, dataset: dict | None = None,
               device: str | torch.device = "cpu", limit: int | None = None) -> TrajectoryStore:
    """Load and verify a store; `net`/`dataset` (a `Dataset.describe()` dict) must match if given."""
    path = Path(path)
    manifest = read_manifest(path)
    check_match(manifest, net, dataset, path)
    stored_net = NetConfig.from_dict(manifest["net"])
    model = FlatModel(build_network(stored_net))
    records = []
    for entry in manifest["experts"][:limit]:
        file = path / entry["file"]
        if not file.exists():
            raise StoreError(f"{file} is missing; the store at {path} is incomplete")
        data = file.read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreError(f"{file} is corrupt or truncated ({len(data)} bytes, manifest says {entry['bytes']}; "
                             "checksum mismatch); re-create it with `mctlib experts`")
        try:
            tensors = st_load(data)
        except (SafetensorError, Exception) as err:
            raise StoreError(f"{file} is not a readable safetensors file ({err})") from err
        first_key = "params" if manifest["kind"] == "full" else "waypoints"
        head = tensors[first_key]
        if head.shape[-1] != model.numel:
            raise StoreError(f"{file} holds vectors of {head.shape[-1]} parameters; the network has {model.numel}")
        if manifest["theta0"] == "seed":
            theta0 = theta0_from_seed(stored_net, entry["init_seed"])
            if tensor_sha256(theta0) != entry["theta0_sha256"]:
                raise StoreError(f"theta_0 regenerated from seed {entry['init_seed']} differs from the recorded one "
                                 f"(torch {torch.__version__} vs {manifest['versions'].get('torch')}); "
                                 "this store needs stored theta_0 on this torch version")
            head = torch.cat([theta0.unsqueeze(0), head])
        if manifest["kind"] == "full":
            record = FullBuffer(head.to(device))
        else:
            record = ConvexRecord(head.to(device), tuple(manifest["waypoint_epochs"]), tensors["beta"].to(device),
                                  model.layer_slices)
        records.append(record)
    return TrajectoryStore(path, manifest, records)


def save_convexified(store_full: TrajectoryStore, out: str | Path, num_waypoints: int = 4,
                     beta_schedule: str = "arc_length", smooth: bool = True, store_theta0: bool = True,
                     overwrite: bool = False) -> Path:
    """Write the convexified records of a store of full buffers: same experts, same manifest facts."""
    if store_full.kind != "full":
        raise StoreError(f"{store_full.path} holds {store_full.kind} records; convexify needs full buffers")
    model = FlatModel(build_network(store_full.net))
    records = [convexify(r, model.layer_slices, num_waypoints, beta_schedule, smooth) for r in store_full.records]
    m = store_full.manifest
    recipe = {**m["recipe"], "record": "convex", "num_waypoints": num_waypoints, "beta_schedule": beta_schedule,
              "smooth": smooth, "store_theta0": store_theta0}
    return save_store(out, records, store_full.net, m["dataset"], recipe, [e["init_seed"] for e in m["experts"]],
                      store_theta0=store_theta0, overwrite=overwrite,
                      extra={"stats": m.get("stats"), "beta_schedule": beta_schedule, "smooth": smooth,
                             "converted_from": str(store_full.path)})
