"""Real datasets D as normalised tensors, ZCA whitening, and real-image subsets per class.

Every dataset comes back the same way: float32 (N, C, H, W) images normalised per channel with
the *training* split's mean and std, optionally ZCA-whitened (eps 0.1, fitted on the training
split, as MTT and MCT do), int64 labels, and the facts a run manifest records.

`digits` (scikit-learn's 8x8 handwritten digits, upsampled to 16x16) ships with scikit-learn, so it
runs offline in seconds. MNIST and Fashion-MNIST are read by our own IDX reader, from torchvision's
layout under `root` (default `~/.cache/mctlib/data`, or the `MCTLIB_DATA` environment variable) or,
for Fashion-MNIST, from where Debian's `dataset-fashion-mnist` installs it. The other datasets are
read through torchvision's loaders from their standard layouts under `root`; torchvision downloads
any of them but digits and Tiny ImageNet when asked (download=True).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import numbers
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DatasetInfo:
    """What is fixed about a dataset before any file is read; `DATASET_INFO` is the one table of them."""

    title: str                           # as written in prose: "Fashion-MNIST"
    channels: int
    native_size: int                     # side of the square images as distributed
    image_size: int                      # side load_dataset returns by default (native, except digits)
    num_classes: int
    arch: str                            # default network (NetConfig.arch) at image_size
    train_size: int                      # images in the standard splits
    test_size: int
    class_names: tuple[str, ...] | None  # None: read from the dataset's own files
    downloadable: bool                   # torchvision can fetch it (download=True)


_DIGIT_NAMES = tuple(str(d) for d in range(10))
_FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")  # label order of the original files (Zalando's README)
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASET_INFO: dict[str, DatasetInfo] = {
    # title, channels, native size, default size, classes, arch, train, test, class names, downloadable.
    # digits are upsampled 8 -> 16 by default: 8x8 is too small for three 2x pools. The split is ours (a quarter).
    "digits": DatasetInfo("digits", 1, 8, 16, 10, "convnet", 1347, 450, _DIGIT_NAMES, False),
    "mnist": DatasetInfo("MNIST", 1, 28, 28, 10, "convnet", 60_000, 10_000, _DIGIT_NAMES, True),
    "fashion_mnist": DatasetInfo("Fashion-MNIST", 1, 28, 28, 10, "convnet", 60_000, 10_000, _FASHION_NAMES, True),
    "cifar10": DatasetInfo("CIFAR-10", 3, 32, 32, 10, "convnet", 50_000, 10_000, _CIFAR10_NAMES, True),
    "cifar100": DatasetInfo("CIFAR-100", 3, 32, 32, 100, "convnet", 50_000, 10_000, None, True),
    "svhn": DatasetInfo("SVHN", 3, 32, 32, 10, "convnet", 73_257, 26_032, _DIGIT_NAMES, True),
    "tiny_imagenet": DatasetInfo("Tiny ImageNet", 3, 64, 64, 200, "convnet_d4", 100_000, 10_000, None, False),
}
DATASETS: tuple[str, ...] = tuple(DATASET_INFO)
DIGITS_IMAGE_SIZE = DATASET_INFO["digits"].image_size

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
SVHN_FOLDER = "svhn"  # torchvision keeps SVHN's .mat files loose in its root; we give them a folder

# Datasets a system package installs, searched after `root`: name -> (Debian/Ubuntu package, its folders).
# `dpkg -L dataset-fashion-mnist` lists the four original IDX files, gzip-compressed, in this folder.
SYSTEM_DATASETS: dict[str, tuple[str, tuple[Path, ...]]] = {
    "fashion_mnist": ("dataset-fashion-mnist", (Path("/usr/share/datasets/fashion-mnist"),)),
}

# The four IDX files of MNIST and Fashion-MNIST, and torchvision's folder for them under root (<Folder>/raw).
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IDX_MAGIC = {3: 2051, 1: 2049}  # images (N, H, W) and labels (N,): 0x00 0x00, type 0x08 (ubyte), ndim
# sha256 of the decompressed files. Debian recompressed the .gz files, so their md5 differs from
# torchvision's, but the content is the original: these also match the published hashes of the
# files decompressed from Zalando's downloads (whose md5s are the ones torchvision lists).
IDX_SHA256 = {
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

_CHUNK = 8192  # images per chunk for statistics, resizing and covariance, to bound peak memory


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
    Fashion-MNIST is also found where Debian's `dataset-fashion-mnist` installs it (`SYSTEM_DATASETS`).
    download: let torchvision fetch a missing dataset (not possible for digits, which ships with
    scikit-learn, nor for tiny_imagenet, which must be unzipped by hand).
    image_size: square side to resize to (bilinear); default `DATASET_INFO[name].image_size`.
    verify_checksums: compare CIFAR and SVHN files with torchvision's published md5 sums, and
    Fashion-MNIST's content with its published sha256 (`IDX_SHA256`), before reading them.
    A download always verifies.
    """
    key = _key(name)
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size <= 0
    ):
        raise ValueError(f"image_size must be a positive integer (the side of a square image), got {image_size!r}")
    root = default_root() if root is None else Path(root).expanduser()

    if key == "digits":
        raw = _digits()
        image_size = DIGITS_IMAGE_SIZE if image_size is None else image_size
    elif key in _IDX_FOLDERS:
        raw = _idx_dataset(key, root, download, verify_checksums)
    elif key in ("cifar10", "cifar100"):
        raw = _cifar(key, root, download, verify_checksums)
    elif key == "svhn":
        raw = _svhn(root, download, verify_checksums)
    else:
        raw = _tiny_imagenet(root, download)
    return _prepare(key, *raw, image_size=image_size, zca=zca, zca_eps=zca_eps)


def _key(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


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


# --- MNIST and Fashion-MNIST: IDX files, read by us ------------------------------------------

IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: 0x00 0x00, type 0x08 (unsigned byte), ndim 3 or 1


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes, plain or gzip, as a writable uint8 array of the shape its header gives.

    The format of LeCun's MNIST page: a big-endian int32 magic number (2051 for (N, H, W) images,
    2049 for (N,) labels), one big-endian int32 per dimension, then the bytes in row-major order.
    Anything else raises DatasetError naming the file.
    """
    if magic not in (IDX_IMAGES, IDX_LABELS):
        raise ValueError(f"magic must be IDX_IMAGES ({IDX_IMAGES}) or IDX_LABELS ({IDX_LABELS}), got {magic!r}")
    path = Path(path)
    fix = "replace it with an intact copy"
    return _parse_idx(_idx_bytes(path, fix), magic, path, fix)


def find_idx_files(name: str, root: str | Path | None = None) -> dict[str, Path] | None:
    """The four IDX files load_dataset would read for mnist or fashion_mnist, or None if no folder holds all four.

    Searched in order: torchvision's folder under root (`<root>/FashionMNIST/raw`, default
    `default_root()`), then the system folders of `SYSTEM_DATASETS`. Plain files win over .gz.
    """
    key = _key(name)
    if key not in _IDX_FOLDERS:
        raise ValueError(f"{name!r} is not stored as IDX files; those that are: {', '.join(_IDX_FOLDERS)}")
    for folder in _idx_folders(key, default_root() if root is None else Path(root).expanduser()):
        found = {}
        for stem in IDX_FILES:
            path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
            if path is None:
                break
            found[stem] = path
        else:
            return found
    return None


def _idx_folders(key: str, root: Path) -> list[Path]:
    return [root / _IDX_FOLDERS[key] / "raw", *SYSTEM_DATASETS.get(key, ("", ()))[1]]


def _idx_bytes(path: Path, fix: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read {path} ({err.strerror or err}); {fix}") from err
    if data[:2] == b"\x1f\x8b":  # gzip's magic, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-off stream, EOFError
            raise DatasetError(f"{path} is not an intact gzip file ({err}); {fix}") from err
    return data


def _parse_idx(data: bytes, magic: int, path: Path, fix: str) -> np.ndarray:
    what, ndim = ("images" if magic == IDX_IMAGES else "labels"), magic & 0xFF
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise DatasetError(f"{path} is not an IDX {what} file (magic number {found}, expected {magic}); {fix}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated inside its header ({len(data)} bytes); {fix}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    size = header + int(np.prod(dims))
    if len(data) != size:
        state = "truncated" if len(data) < size else "longer than its header says"
        raise DatasetError(f"{path} is {state}: {len(data)} bytes where its header ({'x'.join(map(str, dims))}) "
                           f"needs {size}; {fix}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def _idx_fix(key: str, path: Path) -> str:
    """What to do about a bad file: reinstall the system package, or delete our copy and download again."""
    package, folders = SYSTEM_DATASETS.get(key, ("", ()))
    if path.parent in folders:
        return f"reinstall it as root with `apt-get install --reinstall {package}`"
    return f"delete {path.parent} and load again with download=True (CLI: --data-download)"


def _idx_ways(key: str, root: Path) -> str:
    """The ways to get a missing dataset, as one sentence."""
    package = SYSTEM_DATASETS.get(key, ("", ()))[0]
    ways = [f"pass download=True (CLI: --data-download) to fetch it into {root} over the internet",
            f"point root= / MCTLIB_DATA at the folder that holds {_IDX_FOLDERS[key]}/raw"]
    if package:
        ways.insert(0, f"install it as root with `apt-get install {package}` (Debian/Ubuntu)")
    text = ", or ".join(ways)
    return f"{text[0].upper()}{text[1:]}."


def _idx_dataset(key: str, root: Path, download: bool, verify: bool) -> _Raw:
    info = DATASET_INFO[key]
    what = info.title
    files = find_idx_files(key, root)
    if files is None and download:
        _idx_download(key, root)
        files = find_idx_files(key, root)
    if files is None:
        package, folders = SYSTEM_DATASETS.get(key, ("", ()))
        system = "".join(f", or {package}'s copy in {folder}" for folder in folders)
        expected = root / _IDX_FOLDERS[key] / "raw" / IDX_FILES[0]
        raise FileNotFoundError(f"{what} not found: expected {expected}{system}. {_idx_ways(key, root)}")
    arrays = {}
    for stem, path in files.items():
        fix = _idx_fix(key, path)
        data = _idx_bytes(path, fix)
        published = IDX_SHA256.get(key, {}).get(stem) if verify else None
        digest = hashlib.sha256(data).hexdigest() if published else None
        if digest != published:
            raise DatasetError(f"{what}: the content of {path} does not match the published {stem} (sha256 "
                               f"{digest[:16]}..., expected {published[:16]}...); {fix}")
        arrays[stem] = _parse_idx(data, IDX_IMAGES if "images" in stem else IDX_LABELS, path, fix)
    out = []
    for split in ("train", "t10k"):
        images_file, labels_file = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        images, labels = arrays[images_file], arrays[labels_file]
        fix = _idx_fix(key, files[images_file])
        if images.shape[1:] != (info.native_size, info.native_size):
            raise DatasetError(f"{what}: {files[images_file]} holds {images.shape[1]}x{images.shape[2]} images, "
                               f"not {info.native_size}x{info.native_size}; {fix}")
        if len(images) != len(labels):
            raise DatasetError(f"{what}: {files[images_file]} holds {len(images)} images but {files[labels_file]} "
                               f"{len(labels)} labels; {fix}")
        out += [_uint8_to_float(images[:, None]), torch.from_numpy(labels.astype(np.int64))]
    return (*out, list(info.class_names))


def _idx_download(key: str, root: Path) -> None:
    """torchvision's download into <root>/<Folder>/raw (it also unpacks the .gz files there)."""
    from torchvision import datasets

    cls = datasets.MNIST if key == "mnist" else datasets.FashionMNIST
    folder = root / _IDX_FOLDERS[key] / "raw"
    try:
        cls(str(root), train=True, download=True)
    except MemoryError:
        raise
    except Exception as err:
        package = SYSTEM_DATASETS.get(key, ("", ()))[0]
        offline = f" Without internet access, install it as root with `apt-get install {package}` (Debian/Ubuntu)." \
            if package else ""
        raise DatasetError(f"could not download {DATASET_INFO[key].title} into {folder} ({_one_line(err)}). "
                           f"Check the network connection; if a download was interrupted, delete {folder} and try "
                           f"again.{offline}") from err


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
        cause = _one_line(err)
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
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    chosen_idx = _pick_per_class(labels, num_classes, ipc, generator, "IPC").to(images.device)
    out_labels = torch.arange(num_classes, device=labels.device).repeat_interleave(ipc)
    return images[chosen_idx].clone(), out_labels


def load_data(cfg) -> Dataset:
    """The dataset a `config.DataConfig` describes: `load_dataset` with its name, root, download, size and
    preprocessing, then, where `train_per_class` is set, a class-balanced training subset drawn with seed 0
    (part of the data: the same for every method, run and seed)."""
    ds = load_dataset(cfg.name, root=cfg.root, download=cfg.download, image_size=cfg.image_size, zca=cfg.zca)
    return balanced_subset(ds, cfg.train_per_class, seed=0) if cfg.train_per_class else ds


def balanced_subset(dataset: Dataset, per_class: int, seed: int) -> Dataset:
    """D with a class-balanced training split: `per_class` random images of each class, for experts trained on part
    of D (chapter 4, "Experiments").

    The same seed picks the same images on any machine (a CPU torch generator); they keep their order in D.
    The test split, the normalisation (mean, std of the full training split) and the ZCA are D's own.
    """
    generator = torch.Generator().manual_seed(seed)
    idx = _pick_per_class(dataset.train_labels.cpu(), dataset.num_classes, per_class, generator, "per_class")
    idx = idx.sort().values.to(dataset.train_labels.device)
    return dataclasses.replace(dataset, train_images=dataset.train_images[idx], train_labels=dataset.train_labels[idx])


def _pick_per_class(labels: torch.Tensor, num_classes: int, k: int, generator: torch.Generator,
                    what: str) -> torch.Tensor:
    """Indices of k distinct random examples of each class, class 0's first."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
        raise ValueError(f"{what.lower()} must be a positive integer, got {k!r}")
    per_class = class_indices(labels, num_classes)
    sizes = [idx.numel() for idx in per_class]
    smallest = min(range(num_classes), key=sizes.__getitem__)
    if sizes[smallest] < k:
        raise ValueError(f"{what} {k} is impossible: class {smallest} has only {sizes[smallest]} training images")
    chosen = []
    for idx in per_class:
        pick = torch.randperm(idx.numel(), generator=generator, device=generator.device)[:k]
        chosen.append(idx[pick.to(idx.device)])
    return torch.cat(chosen)


__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "DIGITS_IMAGE_SIZE",
    "Dataset",
    "DatasetError",
    "DatasetInfo",
    "IDX_FILES",
    "IDX_IMAGES",
    "IDX_LABELS",
    "IDX_SHA256",
    "SYSTEM_DATASETS",
    "TINY_IMAGENET_URL",
    "ZCA",
    "balanced_subset",
    "class_indices",
    "default_root",
    "find_idx_files",
    "load_data",
    "load_dataset",
    "read_idx",
    "real_images_per_class",
]
