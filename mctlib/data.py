"""Real datasets D as normalised tensors, ZCA whitening, and real-image subsets per class.

Every dataset comes back the same way: float32 (N, C, H, W) images normalised per channel with
the *training* split's mean and std, optionally ZCA-whitened (eps 0.1, fitted on the training
split, as MTT and MCT do), int64 labels, and the facts a run manifest records.

`digits` (scikit-learn's 8x8 handwritten digits, upsampled to 16x16) is the default everywhere:
it ships with scikit-learn, so every chapter runs offline in seconds. The other datasets are read
through torchvision's own loaders from their standard on-disk layouts under `root`
(default `~/.cache/mctlib/data`, or the `MCTLIB_DATA` environment variable).
"""

from __future__ import annotations

import functools
import importlib.util
import hashlib
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet")

DIGITS_IMAGE_SIZE = 16  # digits are upsampled 8 -> 16 by default: 8x8 is too small for three 2x pools
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
SVHN_FOLDER = "svhn"  # torchvision keeps SVHN's .mat files loose in its root; we give them a folder

_CHUNK = 8192  # images per chunk for statistics, resizing and covariance, to bound peak memory
_DIGIT_NAMES = [str(d) for d in range(10)]


class DatasetError(RuntimeError):
    """A dataset was found on disk but could not be read: corrupt, truncated or in the wrong format."""


# ---------------------------------------------------------------------------------------------
# ZCA whitening
# ---------------------------------------------------------------------------------------------


class ZCA:
    """ZCA whitening x -> (x - mu) W with W = U diag(1/sqrt(S + eps)) U^T (kornia's ZCAWhitening, used by MTT)."""

    def __init__(self, mean: torch.Tensor, whiten: torch.Tensor, unwhiten: torch.Tensor, eps: float) -> None:
        d = mean.numel()
        if whiten.shape != (d, d) or unwhiten.shape != (d, d):
            raise ValueError(f"ZCA matrices must be {d}x{d} to match a mean of {d} features")
        self.mean = mean.reshape(d)
        self.whiten = whiten
        self.unwhiten = unwhiten
        self.eps = float(eps)

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = 0.1) -> ZCA:
        """Fit on (N, ...) images flattened per image: feature mean, unbiased covariance, W and W^{-1}."""
        if images.dim() < 2 or images.shape[0] < 2:
            raise ValueError("ZCA.fit needs at least two images shaped (N, ...)")
        if not eps > 0:
            raise ValueError(f"ZCA eps must be > 0, got {eps}")
        flat = images.reshape(images.shape[0], -1)
        # float64 throughout the fit: covariance eigenvalues span many decades. MPS has no float64.
        work = torch.device("cpu") if flat.device.type == "mps" else flat.device
        n, d = flat.shape
        mean = torch.zeros(d, dtype=torch.float64, device=work)
        for chunk in flat.split(_CHUNK):
            mean += chunk.to(work, torch.float64).sum(0)
        mean /= n
        cov = torch.zeros(d, d, dtype=torch.float64, device=work)
        for chunk in flat.split(_CHUNK):
            centred = chunk.to(work, torch.float64) - mean
            cov += centred.T @ centred
        cov /= n - 1  # unbiased, as kornia's default
        eigenvalues, u = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp_min(0)  # round-off can make null directions slightly negative
        whiten = (u * (eigenvalues + eps).rsqrt()) @ u.T
        unwhiten = (u * (eigenvalues + eps).sqrt()) @ u.T
        f32 = {"dtype": torch.float32, "device": images.device}
        return cls(mean.to(**f32), whiten.to(**f32), unwhiten.to(**f32), eps)

    def _flat(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.reshape(images.shape[0], -1)
        if flat.shape[1] != self.mean.numel():
            raise ValueError(
                f"ZCA was fitted on images of {self.mean.numel()} values, got images of shape {tuple(images.shape[1:])}"
            )
        return flat

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten (N, ...) images; the result has the input's shape, dtype and device."""
        flat = self._flat(images)
        mean, whiten = self.mean.to(flat), self.whiten.to(flat)
        return ((flat - mean) @ whiten).reshape(images.shape)

    def inverse(self, images: torch.Tensor) -> torch.Tensor:
        """Undo `transform` exactly: x W^{-1} + mu with W^{-1} = U diag(sqrt(S + eps)) U^T."""
        flat = self._flat(images)
        mean, unwhiten = self.mean.to(flat), self.unwhiten.to(flat)
        return (flat @ unwhiten + mean).reshape(images.shape)

    __call__ = transform

    def to(self, device: str | torch.device) -> ZCA:
        """A copy with its tensors on `device`."""
        return ZCA(self.mean.to(device), self.whiten.to(device), self.unwhiten.to(device), self.eps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so it saves with torch.save or safetensors."""
        return {
            "mean": self.mean.detach().clone(),
            "whiten": self.whiten.detach().clone(),
            "unwhiten": self.unwhiten.detach().clone(),
            "eps": torch.tensor(self.eps, dtype=torch.float64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ZCA:
        """Rebuild from `state_dict()`."""
        missing = {"mean", "whiten", "unwhiten", "eps"} - set(state)
        if missing:
            raise ValueError(f"ZCA state is missing {sorted(missing)}")
        return cls(state["mean"].clone(), state["whiten"].clone(), state["unwhiten"].clone(), float(state["eps"]))

    def __repr__(self) -> str:
        return f"ZCA(features={self.mean.numel()}, eps={self.eps})"


# ---------------------------------------------------------------------------------------------
# The dataset record
# ---------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """A real dataset D: normalised (and optionally ZCA-whitened) train and test tensors plus their facts."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Back to display pixels: undo ZCA (if any), then std and mean, clamped to [0, 1]."""
        images = images.detach()
        batched = images.dim() == 4
        x = images if batched else images.unsqueeze(0)
        if self.zca is not None:
            x = self.zca.inverse(x)
        shape = (1, self.channels, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        x = (x * std + mean).clamp(0, 1)
        return x if batched else x.squeeze(0)

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for a run manifest."""
        return {
            "name": self.name,
            "num_train": int(self.train_labels.numel()),
            "num_test": int(self.test_labels.numel()),
            "train_per_class": torch.bincount(self.train_labels.cpu(), minlength=self.num_classes).tolist(),
            "channels": self.channels,
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "zca": self.zca is not None,
            "zca_eps": self.zca.eps if self.zca is not None else None,
        }


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def default_root() -> Path:
    """Where datasets live: $MCTLIB_DATA if set, else ~/.cache/mctlib/data."""
    return Path(os.environ.get("MCTLIB_DATA") or "~/.cache/mctlib/data").expanduser()


def load_dataset(
    name: str = "digits",
    root: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    zca: bool = False,
    zca_eps: float = 0.1,
    *,
    verify_checksums: bool = True,
) -> Dataset:
    """Load a real dataset D, normalised with its training statistics, optionally ZCA-whitened.

    name: one of `DATASETS`. root: folder holding the datasets (default `default_root()`).
    download: let torchvision fetch a missing dataset (not possible for digits, which ships with
    scikit-learn, nor for tiny_imagenet, which must be unzipped by hand).
    image_size: square side to resize to (bilinear); default the native size, except digits: 16.
    verify_checksums: compare CIFAR and SVHN files with torchvision's published md5 sums before
    reading them. A download always verifies.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size <= 0
    ):
        raise ValueError(f"image_size must be a positive integer (the side of a square image), got {image_size!r}")
    root = default_root() if root is None else Path(root).expanduser()

    if key == "digits":
        raw = _digits()
        image_size = DIGITS_IMAGE_SIZE if image_size is None else image_size
    elif key in ("mnist", "fashion_mnist"):
        raw = _mnist(key, root, download)
    elif key in ("cifar10", "cifar100"):
        raw = _cifar(key, root, download, verify_checksums)
    elif key == "svhn":
        raw = _svhn(root, download, verify_checksums)
    else:
        raw = _tiny_imagenet(root, download)
    return _prepare(key, *raw, image_size=image_size, zca=zca, zca_eps=zca_eps)


# A loader returns (train_images, train_labels, test_images, test_labels, class_names) with
# images float32 (N, C, H, W) in [0, 1] and labels int64.
_Raw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def _prepare(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    class_names: list[str],
    *,
    image_size: int | None,
    zca: bool,
    zca_eps: float,
) -> Dataset:
    num_classes = len(class_names)
    for split, labels in (("train", train_y), ("test", test_y)):
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise DatasetError(
                f"{name}: {split} labels range over [{int(labels.min())}, {int(labels.max())}] "
                f"but there are {num_classes} classes; the files are corrupt, delete them and load again"
            )
    if image_size is not None and tuple(train_x.shape[-2:]) != (image_size, image_size):
        train_x, test_x = _resize(train_x, image_size), _resize(test_x, image_size)
    mean, std = _channel_stats(train_x)
    for x in (train_x, test_x):  # in place: these tensors are ours, fresh from the loader
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    whitening = None
    if zca:
        whitening = ZCA.fit(train_x, eps=zca_eps)
        train_x, test_x = whitening.transform(train_x), whitening.transform(test_x)
    return Dataset(
        name=name,
        train_images=train_x.contiguous(),
        train_labels=train_y,
        test_images=test_x.contiguous(),
        test_labels=test_y,
        channels=int(train_x.shape[1]),
        image_size=(int(train_x.shape[2]), int(train_x.shape[3])),
        num_classes=num_classes,
        class_names=list(class_names),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        zca=whitening,
    )


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    # Bilinear without antialiasing, as torchvision's tensor Resize did for the papers' 64->32 runs.
    return torch.cat(
        [
            F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
            for chunk in images.split(_CHUNK)
        ]
    )


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std over all training pixels, accumulated in float64."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(_CHUNK):
        chunk = chunk.to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3)).cpu()
        squares += chunk.square().sum(dim=(0, 2, 3)).cpu()
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel has nothing to scale
    return mean.float(), std.float()


def _uint8_to_float(images: Any) -> torch.Tensor:
    """uint8 (N, C, H, W) array or tensor -> float32 in [0, 1]."""
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.dtype != torch.uint8:
        raise DatasetError(f"expected uint8 pixels, found {images.dtype}")
    return images.float().div_(255)


# --- digits ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # scikit-learn's load_digits reads this CSV; reading it directly skips importing scikit-learn (~0.8 s).
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DatasetError("the digits dataset ships with scikit-learn; install it with `pip install scikit-learn`")
    table = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",", dtype=np.float32)
    images = (table[:, :-1] / 16.0).reshape(-1, 8, 8)  # values are 0..16 ink counts
    labels = table[:, -1].astype(np.int64)
    # A fixed stratified quarter for testing: numpy's legacy RandomState is stable across versions and machines.
    rng = np.random.RandomState(0)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test[rng.permutation(members)[: int(round(0.25 * len(members)))]] = True
    arrays = (images[~test], images[test], labels[~test], labels[test])
    for a in arrays:
        a.setflags(write=False)  # the cache is shared; callers get copies
    return arrays


def _digits() -> _Raw:
    train_x, test_x, train_y, test_y = _digits_arrays()
    return (
        torch.tensor(train_x).unsqueeze(1),
        torch.tensor(train_y),
        torch.tensor(test_x).unsqueeze(1),
        torch.tensor(test_y),
        list(_DIGIT_NAMES),
    )


# --- torchvision-backed ----------------------------------------------------------------------


def _require(files: list[Path], what: str, hint: str) -> None:
    missing = [f for f in files if not f.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{what} not found: expected {missing[0]}{more}. {hint}")


def _download_hint(root: Path) -> str:
    return (
        f"Pass download=True (CLI: --data-download) to fetch it into {root}, "
        "or point root= / MCTLIB_DATA at the folder that holds it."
    )


def _verify_md5(files: list[tuple[Path, str]], what: str, folder: Path) -> None:
    for path, expected in files:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected:
            raise DatasetError(
                f"{what}: {path} does not match its published checksum (md5 {digest.hexdigest()}, expected "
                f"{expected}); it is corrupt or incomplete. Delete {folder} and load again with download=True."
            )


def _read(what: str, folder: Path, read: Callable[[], Any], downloading: bool) -> Any:
    """Run a torchvision reader; turn any failure into one error that says what to do."""
    try:
        return read()
    except MemoryError:
        raise
    except Exception as err:
        cause = f"{type(err).__name__}: {err}"
        if downloading:
            raise DatasetError(
                f"could not download or read {what} into {folder} ({cause}). Check the network connection; "
                f"if a previous download was interrupted, delete {folder} and try again."
            ) from err
        raise DatasetError(
            f"could not read {what} from {folder} ({cause}). The files are corrupt or incomplete: "
            f"delete {folder} and load again with download=True."
        ) from err


def _without_md5(cls: type, **overrides: Any) -> type:
    # Same torchvision reading code, with its per-file md5 table blanked: we have checked the
    # files ourselves (or been told not to), and a missing file must be a FileNotFoundError.
    return type(cls.__name__, (cls,), overrides)


def _mnist(key: str, root: Path, download: bool) -> _Raw:
    from torchvision import datasets

    cls = datasets.MNIST if key == "mnist" else datasets.FashionMNIST
    what = "MNIST" if key == "mnist" else "Fashion-MNIST"
    folder = root / cls.__name__ / "raw"
    # torchvision reads the uncompressed idx files; its md5 sums are for the .gz downloads only.
    files = [folder / os.path.splitext(name)[0] for name, _ in cls.resources]
    if not download:
        _require(files, what, _download_hint(root))
    train = _read(what, folder, lambda: cls(str(root), train=True, download=download), download)
    test = _read(what, folder, lambda: cls(str(root), train=False, download=download), download)
    names = list(_DIGIT_NAMES) if key == "mnist" else list(cls.classes)
    return (
        _uint8_to_float(train.data.unsqueeze(1)),
        train.targets.long(),
        _uint8_to_float(test.data.unsqueeze(1)),
        test.targets.long(),
        names,
    )


def _cifar(key: str, root: Path, download: bool, verify: bool) -> _Raw:
    from torchvision import datasets

    cls = datasets.CIFAR10 if key == "cifar10" else datasets.CIFAR100
    what = "CIFAR-10" if key == "cifar10" else "CIFAR-100"
    folder = root / cls.base_folder
    entries = [(folder / f, md5) for f, md5 in cls.train_list + cls.test_list]
    entries.append((folder / cls.meta["filename"], cls.meta["md5"]))
    if download:
        make = cls  # torchvision fetches what is missing or fails its md5 check, then verifies
    else:
        _require([p for p, _ in entries], what, _download_hint(root))
        if verify:
            _verify_md5(entries, what, folder)
        make = _without_md5(
            cls,
            train_list=[[f, None] for f, _ in cls.train_list],
            test_list=[[f, None] for f, _ in cls.test_list],
            meta={**cls.meta, "md5": None},
        )
    train = _read(what, folder, lambda: make(str(root), train=True, download=download), download)
    test = _read(what, folder, lambda: make(str(root), train=False, download=download), download)
    # torchvision holds CIFAR as (N, H, W, C) uint8 after its own reshape of the pickled rows.
    return (
        _uint8_to_float(np.ascontiguousarray(train.data.transpose(0, 3, 1, 2))),
        torch.as_tensor(train.targets, dtype=torch.int64),
        _uint8_to_float(np.ascontiguousarray(test.data.transpose(0, 3, 1, 2))),
        torch.as_tensor(test.targets, dtype=torch.int64),
        list(train.classes),
    )


def _svhn(root: Path, download: bool, verify: bool) -> _Raw:
    from torchvision import datasets

    cls = datasets.SVHN
    folder = root / SVHN_FOLDER
    entries = [(folder / cls.split_list[s][1], cls.split_list[s][2]) for s in ("train", "test")]
    if download:
        make = cls
    else:
        _require([p for p, _ in entries], "SVHN", _download_hint(root))
        if verify:
            _verify_md5(entries, "SVHN", folder)
        make = _without_md5(cls, split_list={s: [url, f, None] for s, (url, f, _) in cls.split_list.items()})
    # torchvision maps the .mat label 10 to digit 0 and transposes X to (N, C, H, W).
    train = _read("SVHN", folder, lambda: make(str(folder), split="train", download=download), download)
    test = _read("SVHN", folder, lambda: make(str(folder), split="test", download=download), download)
    return (
        _uint8_to_float(np.ascontiguousarray(train.data)),
        torch.as_tensor(train.labels, dtype=torch.int64),
        _uint8_to_float(np.ascontiguousarray(test.data)),
        torch.as_tensor(test.labels, dtype=torch.int64),
        list(_DIGIT_NAMES),
    )


# --- Tiny ImageNet ---------------------------------------------------------------------------


def _tiny_imagenet(root: Path, download: bool) -> _Raw:
    """Read the standard tiny-imagenet-200 tree; the val split (with labels) is the test split."""
    folder = root / TINY_IMAGENET_FOLDER
    wnids_file, annotations = folder / "wnids.txt", folder / "val" / "val_annotations.txt"
    if not (wnids_file.is_file() and annotations.is_file() and (folder / "train").is_dir()):
        no_download = " torchvision has no downloader for it, so download=True cannot help." if download else ""
        raise FileNotFoundError(
            f"Tiny ImageNet not found: expected {wnids_file}, {folder / 'train'} and {annotations}."
            f"{no_download} Download {TINY_IMAGENET_URL} and unzip it inside {root} "
            f"(giving {folder}), or point root= / MCTLIB_DATA at the folder that holds {TINY_IMAGENET_FOLDER}."
        )
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}  # class order: as listed in wnids.txt

    train_files: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        paths = sorted((folder / "train" / wnid / "images").glob("*.JPEG"))
        if not paths:
            raise DatasetError(f"Tiny ImageNet: no training images in {folder / 'train' / wnid / 'images'}; "
                               f"unzip {TINY_IMAGENET_URL} again into {root}")
        train_files += paths
        train_labels += [index[wnid]] * len(paths)

    test_files: list[Path] = []
    test_labels: list[int] = []
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetError(f"Tiny ImageNet: {annotations} line {line_no} is not 'file<TAB>wnid<TAB>...' "
                               f"with a wnid from wnids.txt; unzip {TINY_IMAGENET_URL} again into {root}")
        test_files.append(folder / "val" / "images" / fields[0])
        test_labels.append(index[fields[1]])

    return (
        _read_jpegs(train_files, root),
        torch.tensor(train_labels, dtype=torch.int64),
        _read_jpegs(test_files, root),
        torch.tensor(test_labels, dtype=torch.int64),
        _tiny_class_names(folder, wnids),
    )


def _read_jpegs(paths: list[Path], root: Path) -> torch.Tensor:
    from PIL import Image

    out: np.ndarray | None = None
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))  # a few Tiny ImageNet JPEGs are grayscale
        except (OSError, ValueError) as err:
            raise DatasetError(f"Tiny ImageNet: cannot read {path} ({err}); delete {root / TINY_IMAGENET_FOLDER} "
                               f"and unzip {TINY_IMAGENET_URL} again") from err
        if out is None:
            out = np.empty((len(paths), *pixels.shape), dtype=np.uint8)  # one allocation for all images
        if pixels.shape != out.shape[1:]:
            raise DatasetError(f"Tiny ImageNet: {path} is {pixels.shape[1]}x{pixels.shape[0]}, "
                               f"the others are {out.shape[2]}x{out.shape[1]}")
        out[i] = pixels
    if out is None:
        raise DatasetError(f"Tiny ImageNet: no images listed under {root / TINY_IMAGENET_FOLDER}")
    return _uint8_to_float(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


def _tiny_class_names(folder: Path, wnids: list[str]) -> list[str]:
    words = folder / "words.txt"
    lookup: dict[str, str] = {}
    if words.is_file():
        for line in words.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            lookup[wnid.strip()] = text.split(",")[0].strip()  # first synonym reads best in a figure
    return [lookup.get(w) or w for w in wnids]


# ---------------------------------------------------------------------------------------------
# Real images per class
# ---------------------------------------------------------------------------------------------


def class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Indices of each class's examples, ascending, one tensor per class (on the labels' device)."""
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found [{int(labels.min())}, {int(labels.max())}]")
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes)
    return list(torch.split(order, counts.tolist()))


def real_images_per_class(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ipc: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ipc` distinct random real images of each class (MTT's initialisation of S), grouped by class."""
    if isinstance(ipc, bool) or not isinstance(ipc, numbers.Integral) or ipc <= 0:
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    per_class = class_indices(labels, num_classes)
    sizes = [idx.numel() for idx in per_class]
    smallest = min(range(num_classes), key=sizes.__getitem__)
    if sizes[smallest] < ipc:
        raise ValueError(f"IPC {ipc} is impossible: class {smallest} has only {sizes[smallest]} training images")
    chosen = []
    for idx in per_class:
        pick = torch.randperm(idx.numel(), generator=generator, device=generator.device)[:ipc]
        chosen.append(idx[pick.to(idx.device)])
    chosen_idx = torch.cat(chosen).to(images.device)
    out_labels = torch.arange(num_classes, device=labels.device).repeat_interleave(ipc)
    return images[chosen_idx].clone(), out_labels


__all__ = [
    "DATASETS",
    "DIGITS_IMAGE_SIZE",
    "Dataset",
    "DatasetError",
    "TINY_IMAGENET_URL",
    "ZCA",
    "class_indices",
    "default_root",
    "load_dataset",
    "real_images_per_class",
]
