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


# The manifest fields that decide what a store computes; its "checksum" covers them, so a hand edit
# (say, waypoint_epochs) is refused instead of silently changing every run that matches the store.
CHECKSUMMED = ("format", "format_version", "kind", "net", "dataset", "recipe", "num_params", "layers", "epochs",
               "theta0", "experts", "waypoint_epochs")


class StoreError(RuntimeError):
    """A trajectory store that cannot be used as asked (corrupt, foreign, or mismatched)."""


class DestinationError(RuntimeError):
    """An output folder that cannot be written (checked before any work starts)."""


def check_destination(path: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file or lies where nothing can be written.

    Writes and removes a probe file in the folder, or in its nearest existing parent, because
    permission bits alone do not say it (root, read-only mounts, ACLs)."""
    if not str(path).strip():  # Path("") is the current folder: an empty --out would write there
        raise DestinationError(f"{flag} {str(path)!r} names no folder; give the folder to write in, e.g. {flag} runs/x")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{flag} {path} is an existing file, not a folder; choose another {flag}")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DestinationError(f"{flag} {path} cannot be created: {probe} is a file; choose another {flag}")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".mctlib-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise DestinationError(f"{flag} {path}: cannot write in {probe} ({err.strerror}); choose another {flag} "
                               "or make it writable") from err


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest's computation-deciding fields (`CHECKSUMMED`), in canonical JSON."""
    fields = {k: manifest[k] for k in CHECKSUMMED if k in manifest}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    if path.is_dir():  # half-written temporary files of a write that a kill interrupted
        for leftover in [*path.glob(".expert_*.safetensors.*.tmp"), *path.glob(f".{MANIFEST}.*.tmp")]:
            leftover.unlink(missing_ok=True)
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
    manifest["checksum"] = manifest_checksum(manifest)
    atomic_write_json(path / MANIFEST, manifest)
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a trajectory store (a folder holding {MANIFEST}); pass the folder "
                         "that `mctlib experts` or `mctlib convexify` wrote")
    if not file.exists() and (path / "config.json").exists():
        raise StoreError(f"{path} is a distillation run folder, not a trajectory store; pass the store it was "
                         "distilled from (its config.json names it under run.store_path)")
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
    if "checksum" not in manifest:
        # Checked before anything else it holds: without its checksum no field of it can be trusted.
        raise StoreError(f"{file} has no checksum (written by an older mctlib, or edited), so its settings cannot "
                         "be verified; re-create the store with `mctlib experts`")
    validate_manifest(manifest, file)
    if manifest["checksum"] != manifest_checksum(manifest):
        raise StoreError(f"{file} was edited or damaged: its checksum does not match its fields "
                         f"({', '.join(k for k in CHECKSUMMED if k in manifest)}); undo the edit or re-create the "
                         "store with `mctlib experts`")
    return manifest


def validate_manifest(manifest: dict, file: Path) -> None:
    """Check every field a load reads, with one line naming the first bad one (no KeyError later)."""
    from .trajectories import waypoint_epochs

    def bad(field: str, why: str) -> None:
        value = json.dumps(manifest.get(field, "<missing>")) if "." not in field else ""
        value = value if len(value) <= 60 else value[:57] + "..."
        raise StoreError(f"{file}: field {field}{' = ' + value if value else ''} is invalid: {why}; "
                         "undo the edit or re-create the store with `mctlib experts`")

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_hex64(x) -> bool:
        return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)

    if manifest.get("kind") not in ("full", "convex"):
        bad("kind", "must be 'full' or 'convex'")
    if not isinstance(manifest.get("net"), dict):
        bad("net", "must be an object of network settings")
    try:
        NetConfig.from_dict(manifest["net"])
    except (ValueError, TypeError) as err:
        bad("net", str(err))
    dataset = manifest.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("name"), str):
        bad("dataset", "must be an object with the dataset's name, image_size, channels and num_classes")
    size = dataset.get("image_size", [1, 1])  # the facts a Dataset.describe() gives; compared where present
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) and v > 0 for v in size)):
        bad("dataset.image_size", "must be [height, width], two positive integers")
    for key in ("channels", "num_classes"):
        if not (is_int(dataset.get(key, 1)) and dataset.get(key, 1) > 0):
            bad(f"dataset.{key}", "must be a positive integer")
    if not isinstance(manifest.get("recipe"), dict):
        bad("recipe", "must be an object (the expert recipe)")
    if not (is_int(manifest.get("num_params")) and manifest["num_params"] > 0):
        bad("num_params", "must be a positive integer")
    epochs = manifest.get("epochs")
    if not (is_int(epochs) and epochs > 0):
        bad("epochs", "must be a positive integer")
    if manifest.get("theta0") not in ("stored", "seed"):
        bad("theta0", "must be 'stored' or 'seed'")
    experts = manifest.get("experts")
    if not (isinstance(experts, list) and experts):
        bad("experts", "must be a non-empty list")
    for i, e in enumerate(experts):
        name = e.get("file") if isinstance(e, dict) else None
        if not (isinstance(name, str) and name and Path(name).name == name and name not in (".", "..")):
            bad(f"experts[{i}].file", "must be a file name inside the store")
        if not (is_int(e.get("init_seed")) and is_int(e.get("bytes")) and e["bytes"] >= 0):
            bad(f"experts[{i}].init_seed/bytes", "must be integers")
        if not (is_hex64(e.get("sha256")) and is_hex64(e.get("theta0_sha256"))):
            bad(f"experts[{i}].sha256/theta0_sha256", "must be SHA-256 hex digests")
    if manifest["kind"] == "convex":
        w = manifest.get("waypoint_epochs")
        if not (isinstance(w, list) and len(w) >= 2 and all(is_int(v) for v in w)):
            bad("waypoint_epochs", "must be a list of at least 2 integer epochs")
        if not 2 <= len(w) <= epochs + 1 or list(waypoint_epochs(epochs, len(w))) != w:
            # The recorder places K waypoints by one rule; any other list is not what was recorded.
            expected = list(waypoint_epochs(epochs, len(w))) if 2 <= len(w) <= epochs + 1 else "2..E+1 entries"
            bad("waypoint_epochs", f"with epochs = {epochs} and K = {len(w)} waypoints it must be {expected}")


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
    if manifest["num_params"] != model.numel:
        raise StoreError(f"{path / MANIFEST}: field num_params = {manifest['num_params']} is invalid: its net has "
                         f"{model.numel} parameters; undo the edit or re-create the store with `mctlib experts`")
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
        head = tensors.get(first_key)
        if head is None or head.dim() != 2:
            raise StoreError(f"{file} holds no 2-D tensor {first_key!r}; re-create it with `mctlib experts`")
        if head.shape[-1] != model.numel:
            raise StoreError(f"{file} holds vectors of {head.shape[-1]} parameters; the network has {model.numel}")
        rows = (manifest["epochs"] + 1 if manifest["kind"] == "full" else len(manifest["waypoint_epochs"]))
        rows -= manifest["theta0"] == "seed"
        if head.shape[0] != rows:
            field = "epochs" if manifest["kind"] == "full" else "waypoint_epochs"
            raise StoreError(f"{file} holds {head.shape[0]} {first_key} vectors, the manifest's {field} implies {rows}; "
                             "the manifest does not describe this file")
        if manifest["kind"] == "convex":
            beta = tensors.get("beta")
            want = (manifest["epochs"] + 1, len(model.layer_slices))
            if beta is None or tuple(beta.shape) != want:
                raise StoreError(f"{file}: beta has shape {None if beta is None else tuple(beta.shape)}, the manifest's "
                                 f"epochs = {manifest['epochs']} and the network imply {want}")
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
