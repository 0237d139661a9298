"""The run folder of one distillation (METHOD.md, "Distillation"): its files, their checks, its one writer.

A run folder holds `config.json` (what decides the computation, compared on resume), `metrics.json`,
`checkpoint.safetensors` (the loop's whole state, checksummed) and the best and final synthetic sets,
each a self-verifying file that carries the network and data settings evaluation needs. Every file
is written whole (a temporary file, then a rename), with its metadata in one canonical JSON entry, so
two identical runs write identical bytes. One process at a time writes a folder: `folder_lock` takes
an exclusive `fcntl.flock` that the kernel drops when its holder dies, so a killed run never blocks
the next one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .storage import MANIFEST, atomic_write_bytes, atomic_write_json, tensor_sha256

CONFIG, METRICS = "config.json", "metrics.json"
CHECKPOINT = "checkpoint.safetensors"
SYNTHETIC_BEST, SYNTHETIC_FINAL = "synthetic_best.safetensors", "synthetic_final.safetensors"
# v3: metadata in one canonical JSON entry (safetensors writes a multi-key metadata map in random order).
CHECKPOINT_FORMAT = "mctlib-distill-checkpoint-v3"
SYNTHETIC_FORMAT = "mctlib-synthetic-v2"   # v2: checksummed, with the network and data it was distilled for
# Fields that may change when a run is resumed: they decide when to stop and log, not what is computed.
RESUMABLE_CHANGES = {"iterations", "eval_every", "checkpoint_every"}
# Step sizes may change too, so a diverged run continues from its last good state with a lower one.
STEP_SIZE_CHANGES = ("lr_img", "lr_lr")
# What a run recorded before its config held "compute": the engine had only ever run on the CPU, in fp32.
LEGACY_COMPUTE = {"device": "cpu", "precision": "fp32"}
_CHECKPOINT_V2 = "mctlib-distill-checkpoint-v2"   # checksummed the same way; read, never written
_CHECKPOINT_TENSORS = ("images", "labels", "alpha", "img_velocity", "lr_velocity", "rng")


class CheckpointError(RuntimeError):
    """A run folder or checkpoint that cannot be used as asked (corrupt, foreign, another configuration)."""


class FolderBusyError(RuntimeError):
    """An output folder that another live process is writing."""


class SyntheticSetError(ValueError):
    """A synthetic set file that is corrupt, altered, or from an older mctlib."""


# ------------------------------------------------------------------ one writer per folder

_HELD: dict[Path, list] = {}   # folder -> [fd, lock file, depth]: a process may re-enter its own lock


class folder_lock:
    """Exclusive lock on an output folder, held in `.NAME.lock` beside it (so nothing is created in the
    folder itself before its command writes it): the holder's PID and host are written in it for the
    message a second writer gets. The file is removed on release; one left by a killed holder is not
    locked (the kernel drops an flock with its process), so it blocks nothing."""

    def __init__(self, path: str | Path, flag: str = "--out") -> None:
        self.path, self.flag = Path(path).absolute(), flag

    def __enter__(self) -> "folder_lock":
        held = _HELD.get(self.path)
        if held:
            held[2] += 1
            return self
        lock = self.path.parent / f".{self.path.name}.lock"
        if not os.access(self.path.parent, os.W_OK) and self.path.is_dir():
            lock = self.path / ".mctlib.lock"   # a writable folder in a read-only parent: every writer decides alike
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                who = f"process {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"
                raise FolderBusyError(f"{self.flag} {self.path} is being written by {who}; wait for it to end or "
                                      f"choose another {self.flag}") from None
            try:  # a releasing holder may have removed the file between our open and our lock: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        _HELD[self.path] = [fd, lock, 1]
        return self

    def __exit__(self, *exc) -> None:
        held = _HELD[self.path]
        held[2] -= 1
        if held[2] == 0:
            del _HELD[self.path]
            Path(held[1]).unlink(missing_ok=True)   # while still locked: the next writer re-checks the inode
            os.close(held[0])


# ------------------------------------------------------------------ what a folder holds

def folder_kind(path: str | Path) -> str | None:
    """"store", "run" or "evaluation" for a folder that holds one of mctlib's outputs, else None."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return "store"
    if any((path / name).exists() for name in (CONFIG, CHECKPOINT, SYNTHETIC_FINAL, SYNTHETIC_BEST)):
        return "run"
    if (path / METRICS).exists():
        return "evaluation"
    return None


_KINDS = {"store": "a trajectory store", "run": "a run", "evaluation": "an evaluation"}


def check_out(path: str | Path, wants: str, resume: bool = False) -> None:
    """Refuse an --out that holds another kind of output than the command writes, or its own kind
    already (a run is continued only with `resume`). `wants`: "store", "run" or "evaluation"."""
    kind = folder_kind(path)
    if kind is None:
        if resume and wants == "run":
            raise CheckpointError(f"nothing to resume: {Path(path) / CHECKPOINT} does not exist (run without --resume "
                                  "to start)")
        return
    if kind != wants:
        raise CheckpointError(f"--out {path} holds {_KINDS[kind]}, not {_KINDS[wants]}; choose another folder")
    if wants == "run" and not resume:
        raise CheckpointError(f"--out {path} already holds a run; pass --resume to continue it or choose another "
                              "folder")
    if wants != "run":
        raise CheckpointError(f"--out {path} already holds {_KINDS[kind]}; choose another folder")


# ------------------------------------------------------------------ canonical files

def _pack(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """safetensors bytes whose metadata is one entry of sorted JSON: the same content, the same bytes."""
    return st_save(tensors, metadata={"mctlib": json.dumps(meta, sort_keys=True, separators=(",", ":"))})


def _unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}
    return tensors, json.loads(meta["mctlib"]) if "mctlib" in meta else meta


def _checksum(tensors: dict[str, torch.Tensor], *texts) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes and the given JSON-able parts."""
    parts = {name: [str(t.dtype), list(t.shape), tensor_sha256(t)] for name, t in sorted(tensors.items())}
    return hashlib.sha256(json.dumps([parts, *texts], sort_keys=True).encode()).hexdigest()


def config_differences(saved: dict, now: dict, ignore=(), left: str = "checkpoint", right: str = "now",
                       prefix: str = "") -> list[str]:
    """Every setting that differs between two configs, as "a.b: LEFT x vs RIGHT y", sorted. `ignore` holds
    keys (anywhere) or dotted paths ("distill.lr_img") that may differ. The one differ of configs: resume
    and the run cache compare with it."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key in ignore or f"{prefix}{key}" in ignore:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, ignore, left, right, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {left} {_short(a)} vs {right} {_short(b)}")
    return out


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def listed(differences: list[str], most: int = 4) -> str:
    """The first `most` differences, and how many more: one line however far two configs are apart."""
    more = len(differences) - most
    return "; ".join(differences[:most]) + (f"; and {more} more" if more > 0 else "")


_RESUME_IGNORES = RESUMABLE_CHANGES | {f"distill.{name}" for name in STEP_SIZE_CHANGES}


@dataclass
class Checkpoint:
    """A verified checkpoint: its tensors, the loop's state (iteration, log, evals, changes) and the config."""

    tensors: dict[str, torch.Tensor]
    state: dict
    config: dict


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], state: dict, config: dict) -> None:
    config_json, state_json = json.dumps(config, sort_keys=True), json.dumps(state, sort_keys=True)
    atomic_write_bytes(run_dir / CHECKPOINT, _pack(tensors, {
        "format": CHECKPOINT_FORMAT, "config": config_json, "state": state_json,
        "checksum": _checksum(tensors, config_json, state_json)}))


def load_checkpoint(run_dir: Path, config: dict) -> Checkpoint:
    """The verified checkpoint of `run_dir`: format, fields, finiteness, checksum, then the configuration."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"nothing to resume: {path} does not exist (run without --resume to start)")
    try:
        tensors, meta = _unpack(path.read_bytes())
    except (SafetensorError, ValueError, UnicodeDecodeError, Exception) as err:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({err}); delete it to start over") from err
    if meta.get("format") == "mctlib-distill-checkpoint-v1":
        raise CheckpointError(f"{path} was written by an older mctlib without a checksum, so it cannot be verified; "
                              "start the run again in another --out")
    if meta.get("format") not in (CHECKPOINT_FORMAT, _CHECKPOINT_V2):
        raise CheckpointError(f"{path} is not an mctlib distillation checkpoint (format {meta.get('format')!r})")
    missing = [k for k in _CHECKPOINT_TENSORS if k not in tensors] + [k for k in ("config", "state", "checksum")
                                                                       if k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks the field(s) {missing}; it is damaged: delete it to start over")
    bad = [k for k in ("images", "alpha", "img_velocity", "lr_velocity")
           if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all()]
    if bad:
        # Checked before the checksum: the more specific diagnosis. mctlib never writes such a checkpoint
        # (a diverging run keeps its last finite state), so it was altered or damaged.
        raise CheckpointError(f"{path} holds non-finite values (NaN/Inf in {', '.join(bad)}), so it cannot be "
                              "resumed; it was altered or damaged: restore a copy or delete it to start over")
    if meta["checksum"] != _checksum(tensors, meta["config"], meta["state"]):
        raise CheckpointError(f"{path} fails its checksum: its tensors or state were altered or damaged after it "
                              "was written; restore a copy or delete it to start over")
    saved = json.loads(meta["config"])
    saved.setdefault("compute", LEGACY_COMPUTE)
    diff = config_differences(saved, config, _RESUME_IGNORES)
    if diff:
        raise CheckpointError(f"{path} belongs to a run with another configuration: {listed(diff)}; "
                              "resume with the same settings or choose another --out")
    expected = images_shape(config)
    for name in ("images", "img_velocity"):
        if tuple(tensors[name].shape) != expected:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the run's configuration "
                                  f"implies {expected}; it does not belong to this run")
    return Checkpoint(tensors, json.loads(meta["state"]), saved)


def check_started_config(run_dir: Path, config: dict) -> None:
    """A run stopped before its first checkpoint left only config.json: it may start over only if that
    config is this run's."""
    try:
        on_disk = json.loads((run_dir / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{run_dir / CONFIG} is corrupt ({err}); choose another --out") from err
    missing = sorted(set(config) - set(on_disk)) if isinstance(on_disk, dict) else sorted(config)
    if missing:
        raise CheckpointError(f"{run_dir / CONFIG} is not a run's config (it lacks {', '.join(missing)}); it was "
                              "edited or damaged: choose another --out")
    diff = config_differences({k: on_disk.get(k) for k in config}, config, _RESUME_IGNORES, left="config.json")
    if diff:
        raise CheckpointError(f"{run_dir} holds the start of a run with another configuration: {listed(diff)}; "
                              "resume with the same settings or choose another --out")


def images_shape(config: dict) -> tuple[int, ...]:
    d = config["dataset"]
    return (config["distill"]["ipc"] * d["num_classes"], d["channels"], *d["image_size"])


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files of a write that a kill interrupted."""
    for leftover in [*run_dir.glob(".*.safetensors.*.tmp"), *run_dir.glob(".*.json.*.tmp")]:
        leftover.unlink(missing_ok=True)


# ------------------------------------------------------------------ synthetic sets

@dataclass
class SyntheticSet:
    """A distilled set as saved: images, labels, the learned lr alpha, and what evaluation needs to train
    on it: the network (`net`), the data (`dataset`, a `Dataset.describe()`) and `ipc`."""

    images: torch.Tensor
    labels: torch.Tensor
    alpha: float
    settings: dict
    info: dict


def save_synthetic(path: Path, images: torch.Tensor, labels: torch.Tensor, alpha: float, settings: dict,
                   info: dict) -> None:
    """`settings`: {"net": ..., "dataset": ..., "ipc": ...}, checksummed with the tensors."""
    tensors = {"images": images.detach().cpu().contiguous(), "labels": labels.cpu().contiguous(),
               "alpha": torch.tensor([float(alpha)])}
    settings_json, info_json = json.dumps(settings, sort_keys=True), json.dumps(info, sort_keys=True)
    atomic_write_bytes(path, _pack(tensors, {"format": SYNTHETIC_FORMAT, "settings": settings_json,
                                             "info": info_json,
                                             "checksum": _checksum(tensors, settings_json, info_json)}))


def read_synthetic(path: str | Path) -> SyntheticSet:
    """A verified synthetic set: its checksum, then its labels (`ipc` images of each class) and shape."""
    path = Path(path)
    try:
        tensors, meta = _unpack(path.read_bytes())
    except (OSError, SafetensorError, ValueError, UnicodeDecodeError, Exception) as err:
        raise SyntheticSetError(f"{path} is not a readable mctlib synthetic set ({err})") from err
    if meta.get("format") == "mctlib-synthetic-v1":
        raise SyntheticSetError(f"{path} was written by an older mctlib without a checksum, so it cannot be "
                                "verified; delete its run folder and distill it again (with the same settings)")
    if meta.get("format") != SYNTHETIC_FORMAT or any(k not in meta for k in ("settings", "info", "checksum")) \
            or any(k not in tensors for k in ("images", "labels", "alpha")):
        raise SyntheticSetError(f"{path} is not an mctlib synthetic set (format {meta.get('format')!r})")
    if meta["checksum"] != _checksum(tensors, meta["settings"], meta["info"]):
        raise SyntheticSetError(f"{path} fails its checksum: its images, labels, alpha or settings were altered "
                                "or damaged after it was written; restore a copy or distill it again")
    settings = json.loads(meta["settings"])
    images, labels = tensors["images"], tensors["labels"]
    d, ipc = settings["dataset"], settings["ipc"]
    want = (ipc * d["num_classes"], d["channels"], *d["image_size"])
    integer = labels.dim() == 1 and not labels.is_floating_point() and labels.numel() > 0
    counts = (torch.bincount(labels.long(), minlength=d["num_classes"]).tolist()
              if integer and int(labels.min()) >= 0 else None)
    if tuple(images.shape) != want or counts != [ipc] * d["num_classes"]:
        # Unreachable through a matching checksum unless the writer was wrong: said plainly all the same.
        raise SyntheticSetError(f"{path} holds images {tuple(images.shape)} with labels per class {counts}; its "
                                f"settings say {ipc} image(s) of each of {d['num_classes']} classes of shape {want[1:]}")
    return SyntheticSet(images, labels, float(tensors["alpha"][0]), settings, json.loads(meta["info"]))


def load_synthetic(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(images, labels, alpha) of a saved synthetic set (synthetic_best / synthetic_final), verified."""
    s = read_synthetic(path)
    return s.images, s.labels, s.alpha


# ------------------------------------------------------------------ the folder as the loop sees it

class RunFolder:
    """Where one distillation writes. `path` None (no run folder) or `writes` False (a torchrun rank
    other than 0) make every write a no-op, so the loop calls them unconditionally."""

    def __init__(self, path: str | Path | None, writes: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.writes = writes and self.path is not None
        self._lock, self._created = None, False

    @classmethod
    def open(cls, path: str | Path | None, resume: bool = False, writes: bool = True) -> "RunFolder":
        """Lock the folder (the writer only), then check it holds no other output and, without `resume`,
        no run: in this order, so that of two processes started together one runs and one is refused."""
        folder = cls(path, writes)
        if folder.path is None:
            if resume:
                raise ValueError("resume needs the run directory of the run to continue")
            return folder
        if folder.writes:
            folder.path.parent.mkdir(parents=True, exist_ok=True)
            folder._lock = folder_lock(folder.path).__enter__()
        try:
            check_out(folder.path, "run", resume)
            if folder.writes:
                folder._created = not folder.path.exists()
                folder.path.mkdir(exist_ok=True)
                remove_leftovers(folder.path)
        except BaseException:
            folder.close()
            raise
        return folder

    def close(self) -> None:
        """Release the folder; one this run created and left empty (it stopped before writing) is removed."""
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def resume(self, config: dict) -> Checkpoint | None:
        """The verified checkpoint; None when the run stopped before its first one (after checking that
        its config.json is this run's: nothing of it is kept, so it starts over)."""
        if (self.path / CHECKPOINT).exists() or not (self.path / CONFIG).exists():
            return load_checkpoint(self.path, config)
        check_started_config(self.path, config)
        return None

    def write_config(self, config: dict) -> None:
        if self.writes:
            atomic_write_json(self.path / CONFIG, config)

    def write_metrics(self, metrics: dict) -> None:
        if self.writes:
            atomic_write_json(self.path / METRICS, metrics)

    def checkpoint(self, tensors: dict[str, torch.Tensor], state: dict, config: dict) -> None:
        if self.writes:
            save_checkpoint(self.path, tensors, state, config)

    def synthetic(self, name: str, images, labels, alpha: float, settings: dict, info: dict) -> None:
        if self.writes:
            save_synthetic(self.path / name, images, labels, alpha, settings, info)
