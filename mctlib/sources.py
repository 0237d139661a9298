"""Where each dataset's files are and how each on-disk format is read (`data.load_dataset` prepares the result).

A reader returns `Raw`: the standard train and test splits as float32 (N, C, H, W) images in [0, 1],
int64 labels and the class names, untouched otherwise. `digits` (scikit-learn's 8x8 handwritten
digits) ships with scikit-learn, so it reads offline in seconds. MNIST and Fashion-MNIST are read by
our own IDX reader, from torchvision's layout under `root` (default `~/.cache/mctlib/data`, or the
`MCTLIB_DATA` environment variable) or, for Fashion-MNIST, from where Debian's `dataset-fashion-mnist`
installs it. CIFAR-10/100 and SVHN are read through torchvision's loaders from their standard layouts
under `root`; Tiny ImageNet from its unzipped tree. torchvision downloads any of them but digits and
Tiny ImageNet when asked (download=True).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

DIGIT_NAMES = tuple(str(d) for d in range(10))  # digits and SVHN: label d is the digit d

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
IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
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


class DatasetError(RuntimeError):
    """A dataset was found on disk but could not be read: corrupt, truncated or in the wrong format."""



# A reader returns (train_images, train_labels, test_images, test_labels, class_names) with
# images float32 (N, C, H, W) in [0, 1] and labels int64.
Raw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def default_root() -> Path:
    """Where datasets live: $MCTLIB_DATA if set, else ~/.cache/mctlib/data."""
    return Path(os.environ.get("MCTLIB_DATA") or "~/.cache/mctlib/data").expanduser()



def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


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


def read_digits() -> Raw:
    """scikit-learn's 8x8 digits at their native size, split by us: a fixed stratified quarter is the test split."""
    train_x, test_x, train_y, test_y = _digits_arrays()
    return (
        torch.tensor(train_x).unsqueeze(1),
        torch.tensor(train_y),
        torch.tensor(test_x).unsqueeze(1),
        torch.tensor(test_y),
        list(DIGIT_NAMES),
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
    key = str(name).strip().lower().replace("-", "_")  # as load_dataset reads names
    if key not in IDX_FOLDERS:
        raise ValueError(f"{name!r} is not stored as IDX files; those that are: {', '.join(IDX_FOLDERS)}")
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
    return [root / IDX_FOLDERS[key] / "raw", *SYSTEM_DATASETS.get(key, ("", ()))[1]]


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
            f"point root= / MCTLIB_DATA at the folder that holds {IDX_FOLDERS[key]}/raw"]
    if package:
        ways.insert(0, f"install it as root with `apt-get install {package}` (Debian/Ubuntu)")
    text = ", or ".join(ways)
    return f"{text[0].upper()}{text[1:]}."


def read_idx_dataset(key: str, root: Path, download: bool, verify: bool, *, title: str, side: int,
                     class_names: tuple[str, ...]) -> Raw:
    """MNIST or Fashion-MNIST (`key`) from its four IDX files (`find_idx_files`), each checked against its header,
    its published sha256 (`IDX_SHA256`, when `verify`) and the images' `side`; `title` names it in messages."""
    what = title
    files = find_idx_files(key, root)
    if files is None and download:
        _idx_download(key, title, root)
        files = find_idx_files(key, root)
    if files is None:
        package, folders = SYSTEM_DATASETS.get(key, ("", ()))
        system = "".join(f", or {package}'s copy in {folder}" for folder in folders)
        expected = root / IDX_FOLDERS[key] / "raw" / IDX_FILES[0]
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
        if images.shape[1:] != (side, side):
            raise DatasetError(f"{what}: {files[images_file]} holds {images.shape[1]}x{images.shape[2]} images, "
                               f"not {side}x{side}; {fix}")
        if len(images) != len(labels):
            raise DatasetError(f"{what}: {files[images_file]} holds {len(images)} images but {files[labels_file]} "
                               f"{len(labels)} labels; {fix}")
        out += [_uint8_to_float(images[:, None]), torch.from_numpy(labels.astype(np.int64))]
    return (*out, list(class_names))


def _idx_download(key: str, title: str, root: Path) -> None:
    """torchvision's download into <root>/<Folder>/raw (it also unpacks the .gz files there)."""
    from torchvision import datasets

    cls = datasets.MNIST if key == "mnist" else datasets.FashionMNIST
    folder = root / IDX_FOLDERS[key] / "raw"
    try:
        cls(str(root), train=True, download=True)
    except MemoryError:
        raise
    except Exception as err:
        package = SYSTEM_DATASETS.get(key, ("", ()))[0]
        offline = f" Without internet access, install it as root with `apt-get install {package}` (Debian/Ubuntu)." \
            if package else ""
        raise DatasetError(f"could not download {title} into {folder} ({_one_line(err)}). "
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


def read_cifar(key: str, root: Path, download: bool, verify: bool) -> Raw:
    """CIFAR-10 or CIFAR-100 (`key`) from torchvision's batches folder under `root`, md5-checked when `verify`."""
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


def read_svhn(root: Path, download: bool, verify: bool) -> Raw:
    """SVHN's train and test .mat files from `<root>/svhn`, md5-checked when `verify`."""
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
        list(DIGIT_NAMES),
    )


# --- Tiny ImageNet ---------------------------------------------------------------------------


def read_tiny_imagenet(root: Path, download: bool) -> Raw:
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


__all__ = [
    "DIGIT_NAMES",
    "DatasetError",
    "IDX_FILES",
    "IDX_FOLDERS",
    "IDX_IMAGES",
    "IDX_LABELS",
    "IDX_SHA256",
    "Raw",
    "SVHN_FOLDER",
    "SYSTEM_DATASETS",
    "TINY_IMAGENET_FOLDER",
    "TINY_IMAGENET_URL",
    "default_root",
    "find_idx_files",
    "read_cifar",
    "read_digits",
    "read_idx",
    "read_idx_dataset",
    "read_svhn",
    "read_tiny_imagenet",
]
