"""Real datasets D as normalised tensors, ZCA whitening, and real-image subsets per class.

Every dataset comes back the same way: float32 (N, C, H, W) images normalised per channel with
the *training* split's mean and std, optionally ZCA-whitened (eps 0.1, fitted on the training
split, as MTT and MCT do), int64 labels, and the facts a run manifest records. `DATASET_INFO` is
the one table of what is fixed about each dataset; `sources.py` finds its files and reads them.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .sources import (
    DIGIT_NAMES,
    IDX_FOLDERS,
    DatasetError,
    default_root,
    read_cifar,
    read_digits,
    read_idx_dataset,
    read_svhn,
    read_tiny_imagenet,
)


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


_FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")  # label order of the original files (Zalando's README)
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASET_INFO: dict[str, DatasetInfo] = {
    # title, channels, native size, default size, classes, arch, train, test, class names, downloadable.
    # digits are upsampled 8 -> 16 by default: 8x8 is too small for three 2x pools. The split is ours (a quarter).
    "digits": DatasetInfo("digits", 1, 8, 16, 10, "convnet", 1347, 450, DIGIT_NAMES, False),
    "mnist": DatasetInfo("MNIST", 1, 28, 28, 10, "convnet", 60_000, 10_000, DIGIT_NAMES, True),
    "fashion_mnist": DatasetInfo("Fashion-MNIST", 1, 28, 28, 10, "convnet", 60_000, 10_000, _FASHION_NAMES, True),
    "cifar10": DatasetInfo("CIFAR-10", 3, 32, 32, 10, "convnet", 50_000, 10_000, _CIFAR10_NAMES, True),
    "cifar100": DatasetInfo("CIFAR-100", 3, 32, 32, 100, "convnet", 50_000, 10_000, None, True),
    "svhn": DatasetInfo("SVHN", 3, 32, 32, 10, "convnet", 73_257, 26_032, DIGIT_NAMES, True),
    "tiny_imagenet": DatasetInfo("Tiny ImageNet", 3, 64, 64, 200, "convnet_d4", 100_000, 10_000, None, False),
}
DATASETS: tuple[str, ...] = tuple(DATASET_INFO)
DIGITS_IMAGE_SIZE = DATASET_INFO["digits"].image_size

_CHUNK = 8192  # images per chunk for statistics, resizing and covariance, to bound peak memory


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

    name: one of `DATASETS`. root: folder holding the datasets (default `sources.default_root()`).
    Fashion-MNIST is also found where Debian's `dataset-fashion-mnist` installs it (`sources.SYSTEM_DATASETS`).
    download: let torchvision fetch a missing dataset (not possible for digits, which ships with
    scikit-learn, nor for tiny_imagenet, which must be unzipped by hand).
    image_size: square side to resize to (bilinear); default `DATASET_INFO[name].image_size`.
    verify_checksums: compare CIFAR and SVHN files with torchvision's published md5 sums, and
    Fashion-MNIST's content with its published sha256 (`sources.IDX_SHA256`), before reading them.
    A download always verifies.
    """
    key = _key(name)
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size <= 0
    ):
        raise ValueError(f"image_size must be a positive integer (the side of a square image), got {image_size!r}")
    root = default_root() if root is None else Path(root).expanduser()

    if key == "digits":
        raw = read_digits()
        image_size = DIGITS_IMAGE_SIZE if image_size is None else image_size
    elif key in IDX_FOLDERS:
        info = DATASET_INFO[key]
        raw = read_idx_dataset(key, root, download, verify_checksums, title=info.title, side=info.native_size,
                               class_names=info.class_names)
    elif key in ("cifar10", "cifar100"):
        raw = read_cifar(key, root, download, verify_checksums)
    elif key == "svhn":
        raw = read_svhn(root, download, verify_checksums)
    else:
        raw = read_tiny_imagenet(root, download)
    return _prepare(key, *raw, image_size=image_size, zca=zca, zca_eps=zca_eps)


def _key(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


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
    "DatasetInfo",
    "ZCA",
    "balanced_subset",
    "class_indices",
    "load_data",
    "load_dataset",
    "real_images_per_class",
]
