"""mctlib.data and mctlib.sources: every loader reads files written in the dataset's real on-disk format."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mctlib.data import (
    DATASET_INFO,
    DATASETS,
    ZCA,
    Dataset,
    balanced_subset,
    class_indices,
    load_dataset,
    real_images_per_class,
)
from mctlib.sources import (
    IDX_FILES,
    IDX_IMAGES,
    IDX_LABELS,
    IDX_SHA256,
    SYSTEM_DATASETS,
    DatasetError,
    find_idx_files,
    read_idx,
)

RNG = np.random.default_rng(0)


def pixels(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def check_roundtrip(ds: Dataset, train: np.ndarray, test: np.ndarray) -> None:
    """Undoing the normalisation gives back the uint8 pixels written to disk, (N, C, H, W)."""
    assert ds.train_images.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert tuple(ds.train_images.shape) == train.shape and tuple(ds.test_images.shape) == test.shape
    for images, written in ((ds.train_images, train), (ds.test_images, test)):
        torch.testing.assert_close(ds.denormalise(images), torch.from_numpy(written).float() / 255, atol=1e-5, rtol=0)


# --- digits ----------------------------------------------------------------------------------


def test_digits_shapes_split_and_normalisation():
    ds = load_dataset()
    assert ds.name == "digits" and ds.num_classes == 10 and ds.class_names == [str(i) for i in range(10)]
    assert ds.channels == 1 and ds.image_size == (16, 16)
    assert ds.train_images.shape == (len(ds.train_labels), 1, 16, 16)
    assert ds.train_images.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert len(ds.train_labels) + len(ds.test_labels) == 1797
    assert len(ds.test_labels) == 450
    # Stratified: each class's share of the test split matches its share of the whole.
    train_counts = torch.bincount(ds.train_labels, minlength=10)
    test_counts = torch.bincount(ds.test_labels, minlength=10)
    assert ((test_counts.float() / (train_counts + test_counts) - 0.25).abs() < 0.01).all()
    assert ds.train_images.mean().abs() < 1e-5 and (ds.train_images.std(correction=0) - 1).abs() < 1e-5
    back = ds.denormalise(ds.test_images)
    assert back.min() >= 0 and back.max() <= 1
    facts = ds.describe()
    assert facts["num_train"] + facts["num_test"] == 1797 and facts["zca"] is False
    assert facts["image_size"] == [16, 16] and sum(facts["train_per_class"]) == facts["num_train"]


def test_digits_deterministic_and_fresh_tensors():
    a, b = load_dataset(), load_dataset("digits")
    assert torch.equal(a.train_labels, b.train_labels) and torch.equal(a.train_images, b.train_images)
    a.train_images.zero_()  # a caller scribbling on its copy must not reach the next caller
    assert torch.equal(load_dataset().train_images, b.train_images)


def test_digits_resize_and_native_size():
    ds = load_dataset(image_size=32)
    assert ds.image_size == (32, 32) and ds.test_images.shape[1:] == (1, 32, 32)
    native = load_dataset(image_size=8)
    # At native size, denormalising gives back scikit-learn's 0..16 ink counts / 16.
    from sklearn.datasets import load_digits

    values = set(np.round(native.denormalise(native.train_images).numpy().ravel() * 16, 4))
    assert values <= set(float(v) for v in np.unique(load_digits().images))


# --- torchvision-backed datasets in their real formats ----------------------------------------


def write_cifar(root: Path, hundred: bool) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Python pickles as in the CIFAR archives: rows of 3072 bytes (R plane, G plane, B plane)."""
    # The real files are Python 2 pickles whose keys load as str under encoding="latin1",
    # which is how torchvision reads them; protocol 2 with str keys reads back the same way.
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    n_classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    batches = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    per_batch = 10 if hundred else 2
    train_rows, train_labels = [], []
    for name in batches:
        rows, labels = pixels(per_batch, 3072), [int(v) for v in RNG.integers(0, n_classes, per_batch)]
        entry = {"batch_label": name, "data": rows, label_key: labels, "filenames": [f"{i}.png" for i in labels]}
        if hundred:
            entry["coarse_labels"] = [v // 5 for v in labels]
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = pixels(3, 3072), [n_classes - 1, 0, 1]
    test_entry = {"batch_label": "test", "data": test_rows, label_key: test_labels, "filenames": ["a", "b", "c"]}
    (folder / ("test" if hundred else "test_batch")).write_bytes(pickle.dumps(test_entry, protocol=2))
    names = [f"class_{i}" for i in range(n_classes)]
    meta = {"fine_label_names": names, "coarse_label_names": names[:20]} if hundred else {"label_names": names}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))
    train = np.concatenate(train_rows).reshape(-1, 3, 32, 32)
    return train, train_labels, test_rows.reshape(-1, 3, 32, 32), test_labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_real_format(tmp_path, name):
    train, train_labels, test, test_labels = write_cifar(tmp_path, hundred=name == "cifar100")
    ds = load_dataset(name, root=tmp_path, verify_checksums=False)
    assert ds.num_classes == (100 if name == "cifar100" else 10)
    assert ds.class_names[:2] == ["class_0", "class_1"] and ds.image_size == (32, 32) and ds.channels == 3
    assert ds.train_labels.tolist() == train_labels and ds.test_labels.tolist() == test_labels
    check_roundtrip(ds, train, test)
    # One pixel by hand from the file itself: byte 1024 + 32*h + w of a row is green at (h, w).
    first = "train" if name == "cifar100" else "data_batch_1"
    folder = "cifar-100-python" if name == "cifar100" else "cifar-10-batches-py"
    row = pickle.loads((tmp_path / folder / first).read_bytes(), encoding="latin1")["data"][0]
    assert round(float(ds.denormalise(ds.train_images[:1])[0, 1, 2, 5]) * 255) == row[1024 + 32 * 2 + 5]


def test_cifar_checksums_checked_by_default(tmp_path):
    write_cifar(tmp_path, hundred=False)
    with pytest.raises(DatasetError, match=r"data_batch_1 does not match its published checksum.*download=True"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_truncated_pickle(tmp_path):
    write_cifar(tmp_path, hundred=False)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DatasetError, match=r"could not read CIFAR-10 from .*cifar-10-batches-py.*delete"):
        load_dataset("cifar10", root=tmp_path, verify_checksums=False)


# --- MNIST and Fashion-MNIST: the IDX files ---------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """IDX format: magic 0x0000 | type 0x08 (ubyte) | ndim, big-endian dims, then the bytes; gzip as distributed."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist(folder: Path, compress: bool = False, size: int = 28) -> tuple[np.ndarray, ...]:
    """The four files, named as in the original distribution (plus .gz when compressed)."""
    folder.mkdir(parents=True, exist_ok=True)
    train, test = pixels(12, size, size), pixels(5, size, size)
    train_labels, test_labels = RNG.integers(0, 10, 12).astype(np.uint8), np.array([9, 0, 1, 2, 3], np.uint8)
    suffix = ".gz" if compress else ""
    for name, array in zip(IDX_FILES, (train, train_labels, test, test_labels)):
        write_idx(folder / f"{name}{suffix}", array, compress)
    return train, train_labels, test, test_labels


@pytest.fixture
def system_folder(tmp_path, monkeypatch) -> Path:
    """Fashion-MNIST's system folder moved to an empty temporary one, so only what a test writes is found."""
    folder = tmp_path / "system" / "fashion-mnist"
    folder.mkdir(parents=True)
    monkeypatch.setitem(SYSTEM_DATASETS, "fashion_mnist", ("dataset-fashion-mnist", (folder,)))
    return folder


def test_read_idx_by_hand(tmp_path):
    # A labels file written byte by byte: magic 2049, N = 3, then the labels 5, 0, 9.
    labels = tmp_path / "labels"
    labels.write_bytes(bytes.fromhex("00000801" "00000003" "050009"))
    assert read_idx(labels, IDX_LABELS).tolist() == [5, 0, 9]
    # Images: magic 2051, 2 images of 1x3, rows in order.
    images = tmp_path / "images.gz"
    images.write_bytes(gzip.compress(bytes.fromhex("00000803" "00000002" "00000001" "00000003" "010203" "ff0080")))
    out = read_idx(images, IDX_IMAGES)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 3) and out.tolist() == [[[1, 2, 3]], [[255, 0, 128]]]
    out[0, 0, 0] = 7  # writable: the caller owns it
    with pytest.raises(ValueError, match="magic must be"):
        read_idx(labels, 2050)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_real_format(tmp_path, name, folder, compress):
    train, train_labels, test, test_labels = write_mnist(tmp_path / folder / "raw", compress)
    ds = load_dataset(name, root=tmp_path, verify_checksums=False)  # these are not the published files
    assert ds.num_classes == 10 and ds.channels == 1 and ds.image_size == (28, 28)
    assert ds.train_labels.tolist() == train_labels.tolist() and ds.test_labels.tolist() == test_labels.tolist()
    check_roundtrip(ds, train[:, None], test[:, None])
    assert ds.class_names == list(DATASET_INFO[name].class_names)
    if name == "fashion_mnist":
        assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    resized = load_dataset(name, root=tmp_path, image_size=32, verify_checksums=False)
    assert resized.train_images.shape == (12, 1, 32, 32)


def test_fashion_mnist_content_checked_by_default(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw")
    published = r"content of .*FashionMNIST.raw.train-images-idx3-ubyte does not match the published .*download=True"
    with pytest.raises(DatasetError, match=published):
        load_dataset("fashion_mnist", root=tmp_path)


def bad_file(folder: Path, how: str) -> Path:
    """Spoil one of the four files written by write_mnist in `how` way; return it."""
    if how == "wrong magic":  # an images file where the labels belong
        path = folder / "t10k-labels-idx1-ubyte"
        write_idx(path, pixels(5, 28, 28))
    elif how == "truncated":
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "too long":
        path = folder / "train-labels-idx1-ubyte"
        path.write_bytes(path.read_bytes() + b"\x00")
    elif how == "cut gzip":
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(gzip.compress(path.read_bytes())[:-40])
    elif how == "header only":
        path = folder / "t10k-images-idx3-ubyte"
        path.write_bytes(bytes.fromhex("00000803" "0000"))
    elif how == "wrong count":
        path = folder / "train-labels-idx1-ubyte"
        write_idx(path, np.zeros(11, np.uint8))
    else:  # wrong size: 32x32 images in the Fashion-MNIST files
        path = folder / "train-images-idx3-ubyte"
        write_idx(path, pixels(12, 32, 32))
    return path


@pytest.mark.parametrize(
    "how,message",
    [
        ("wrong magic", r"is not an IDX labels file \(magic number 2051, expected 2049\)"),
        ("truncated", r"is truncated: 9324 bytes where its header \(12x28x28\) needs 9424"),
        ("too long", r"is longer than its header says: 21 bytes where its header \(12\) needs 20"),
        ("cut gzip", r"is not an intact gzip file"),
        ("header only", r"is truncated inside its header \(6 bytes\)"),
        ("wrong count", r"holds 12 images but .*train-labels-idx1-ubyte 11 labels"),
        ("wrong size", r"holds 32x32 images, not 28x28"),
    ],
)
def test_bad_idx_file_named_with_what_to_do(tmp_path, how, message):
    folder = tmp_path / "FashionMNIST" / "raw"
    write_mnist(folder)
    path = bad_file(folder, how)
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion_mnist", root=tmp_path, verify_checksums=False)
    text = str(err.value)
    assert re.search(message, text) and "\n" not in text
    assert str(path) in text and f"delete {folder} and load again with download=True" in text


def test_idx_search_order_root_then_system(tmp_path, system_folder):
    system, *_ = write_mnist(system_folder, compress=True)  # as Debian installs them: .gz only
    root = tmp_path / "root"
    found = find_idx_files("fashion_mnist", root)
    assert found is not None and found["train-images-idx3-ubyte"] == system_folder / "train-images-idx3-ubyte.gz"
    assert_train_pixels(load_dataset("fashion_mnist", root=root, verify_checksums=False), system)
    mine, *_ = write_mnist(root / "FashionMNIST" / "raw")  # the user's own copy comes first
    assert_train_pixels(load_dataset("fashion_mnist", root=root, verify_checksums=False), mine)
    assert find_idx_files("mnist", root) is None  # Debian has no MNIST package we know of


def assert_train_pixels(ds: Dataset, written: np.ndarray) -> None:
    back = ds.denormalise(ds.train_images)
    torch.testing.assert_close(back, torch.from_numpy(written[:, None]).float() / 255, atol=1e-5, rtol=0)


def test_bad_system_file_says_reinstall(tmp_path, system_folder):
    write_mnist(system_folder, compress=True)
    bad = system_folder / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 30)
    with pytest.raises(DatasetError, match=rf"{re.escape(str(bad))} is not an intact gzip file .*"
                                           r"apt-get install --reinstall dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=tmp_path / "root", verify_checksums=False)
    write_mnist(system_folder, compress=True)
    with pytest.raises(DatasetError, match=r"does not match the published .*apt-get install --reinstall"):
        load_dataset("fashion_mnist", root=tmp_path / "root")


def test_fashion_mnist_nowhere_names_both_ways(tmp_path, system_folder):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion_mnist", root=tmp_path / "root")
    text = str(err.value)
    assert "\n" not in text and str(tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in text
    assert str(system_folder) in text
    assert "apt-get install dataset-fashion-mnist" in text and "download=True (CLI: --data-download)" in text


def test_fashion_mnist_download_fails_names_both_ways(tmp_path, system_folder, monkeypatch):
    from torchvision import datasets

    # Nothing listens on the discard port, so the download fails at once, as it does offline.
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion_mnist", root=tmp_path / "root", download=True)
    text = str(err.value)
    assert "\n" not in text and text.startswith("could not download Fashion-MNIST into")
    assert "apt-get install dataset-fashion-mnist" in text and "Check the network connection" in text


# The real files, where Debian's dataset-fashion-mnist is installed (CI installs it).
REAL = find_idx_files("fashion_mnist", root=Path("/nonexistent"))
needs_real = pytest.mark.skipif(REAL is None, reason="no Fashion-MNIST: apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    return load_dataset("fashion_mnist", root=Path("/nonexistent"))


@needs_real
def test_real_fashion_mnist(fashion):
    info = DATASET_INFO["fashion_mnist"]
    assert fashion.train_images.shape == (info.train_size, 1, 28, 28) == (60_000, 1, 28, 28)
    assert fashion.test_images.shape == (info.test_size, 1, 28, 28) == (10_000, 1, 28, 28)
    assert torch.bincount(fashion.train_labels).tolist() == [6000] * 10
    assert torch.bincount(fashion.test_labels).tolist() == [1000] * 10
    # The per-channel statistics every Fashion-MNIST paper normalises with (DC/DSA: 0.2860, 0.3530).
    assert abs(fashion.mean[0] - 0.2860) < 1e-4 and abs(fashion.std[0] - 0.3530) < 1e-4
    pixels_back = fashion.denormalise(fashion.test_images) * 255
    assert float(pixels_back.min()) == pytest.approx(0, abs=1e-3)
    assert float(pixels_back.max()) == pytest.approx(255, abs=1e-3)
    assert torch.allclose(pixels_back, pixels_back.round(), atol=2e-3)  # 8-bit pixels, exactly


@needs_real
def test_real_fashion_mnist_content(tmp_path):
    # Our hashes are of the decompressed files; they match what is installed ...
    for stem, path in REAL.items():
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == IDX_SHA256["fashion_mnist"][stem]
    # ... and our reader agrees with torchvision's on the test split.
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for stem, read in (("t10k-images-idx3-ubyte", read_image_file), ("t10k-labels-idx1-ubyte", read_label_file)):
        plain = tmp_path / stem
        plain.write_bytes(gzip.decompress(REAL[stem].read_bytes()))
        ours = read_idx(REAL[stem], IDX_IMAGES if "images" in stem else IDX_LABELS)
        assert np.array_equal(ours, read(str(plain)).numpy())


@needs_real
def test_real_fashion_mnist_balanced_subset(fashion):
    subset = balanced_subset(fashion, 500, seed=0)
    assert torch.bincount(subset.train_labels).tolist() == [500] * 10
    assert subset.test_images is fashion.test_images and subset.mean == fashion.mean


# --- SVHN and Tiny ImageNet --------------------------------------------------------------------


def write_svhn(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MATLAB files as distributed: X is (32, 32, 3, N), y is (N, 1) with the digit 0 stored as 10."""
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True)
    train, test = pixels(7, 3, 32, 32), pixels(4, 3, 32, 32)  # (N, C, H, W)
    train_digits, test_digits = np.array([0, 1, 2, 3, 4, 5, 9]), np.array([0, 0, 7, 8])
    for name, images, digits in (("train", train, train_digits), ("test", test, test_digits)):
        stored = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
        savemat(folder / f"{name}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": stored})
    return train, train_digits, test, test_digits


def test_svhn_real_format(tmp_path):
    train, train_digits, test, test_digits = write_svhn(tmp_path)
    ds = load_dataset("svhn", root=tmp_path, verify_checksums=False)
    assert ds.train_labels.tolist() == train_digits.tolist() and ds.test_labels.tolist() == test_digits.tolist()
    assert ds.class_names == [str(i) for i in range(10)] and ds.image_size == (32, 32)
    check_roundtrip(ds, train, test)
    with pytest.raises(DatasetError, match="train_32x32.mat does not match its published checksum"):
        load_dataset("svhn", root=tmp_path)


def write_tiny_imagenet(root: Path) -> dict[str, tuple[int, int, int]]:
    """The tiny-imagenet-200 tree with flat-coloured 64x64 JPEGs (JPEG keeps flat colours almost exactly)."""
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # not sorted: class order must follow wnids.txt
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn99\tunused\n")
    colours = {}
    for c, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(2):
            colour = (40 * c + 20, 100 + 50 * i, 200 - 60 * c)
            Image.new("RGB", (64, 64), colour).save(images / f"{wnid}_{i}.JPEG", quality=95)
            colours[f"train/{wnid}/{i}"] = colour
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02"]):
        colour = (10 + 80 * i, 60, 90)
        Image.new("RGB", (64, 64), colour).save(folder / "val" / "images" / f"val_{i}.JPEG", quality=95)
        colours[f"val/{i}"] = colour
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    # A few real Tiny ImageNet JPEGs are grayscale: they must come back as 3 equal channels.
    Image.new("L", (64, 64), 77).save(folder / "val" / "images" / "val_3.JPEG", quality=95)
    colours["val/3"] = (77, 77, 77)
    lines.append("val_3.JPEG\tn02\t1\t2\t3\t4")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return colours


def test_tiny_imagenet_real_format(tmp_path):
    colours = write_tiny_imagenet(tmp_path)
    ds = load_dataset("tiny_imagenet", root=tmp_path)
    assert ds.num_classes == 3 and ds.class_names == ["tabby", "goldfish", "n03"]
    assert ds.train_images.shape == (6, 3, 64, 64) and ds.test_images.shape == (4, 3, 64, 64)
    assert ds.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and ds.test_labels.tolist() == [2, 1, 0, 0]
    train, test = ds.denormalise(ds.train_images) * 255, ds.denormalise(ds.test_images) * 255
    for c, wnid in enumerate(["n02", "n01", "n03"]):
        for i in range(2):
            got = train[2 * c + i].mean(dim=(1, 2))
            assert (got - torch.tensor(colours[f"train/{wnid}/{i}"], dtype=torch.float32)).abs().max() < 3
    for i in range(4):
        assert (test[i].mean(dim=(1, 2)) - torch.tensor(colours[f"val/{i}"], dtype=torch.float32)).abs().max() < 3
    assert ds.describe()["image_size"] == [64, 64]
    assert load_dataset("tiny_imagenet", root=tmp_path, image_size=32).train_images.shape == (6, 3, 32, 32)


def test_tiny_imagenet_corrupt_jpeg(tmp_path):
    write_tiny_imagenet(tmp_path)
    bad = tmp_path / "tiny-imagenet-200" / "train" / "n01" / "images" / "n01_1.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"cannot read .*n01_1\.JPEG.*unzip"):
        load_dataset("tiny_imagenet", root=tmp_path)


# --- bad input -------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASETS)


@pytest.mark.parametrize("size", [0, -4, 16.0, True, "32"])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match="image_size"):
        load_dataset(image_size=size)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/train"),
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
        ("svhn", "svhn/train_32x32.mat"),
    ],
)
def test_missing_dataset_says_where_and_how(tmp_path, system_folder, name, expected):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path / expected) in str(err.value) and "download=True" in str(err.value)


def test_missing_tiny_imagenet_gives_url(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tiny-imagenet-200\.zip.*unzip it inside"):
        load_dataset("tiny_imagenet", root=tmp_path, download=True)


def test_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MCTLIB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cifar-10-batches-py")):
        load_dataset("cifar10")


# --- ZCA -------------------------------------------------------------------------------------


def test_zca_matches_formula_and_inverts():
    ds = load_dataset(image_size=8)  # 64 features: a full eigendecomposition is cheap
    x = ds.train_images
    zca = ZCA.fit(x, eps=0.1)
    flat = x.reshape(len(x), -1).double().numpy()
    centred = flat - flat.mean(0)
    cov = centred.T @ centred / (len(flat) - 1)
    s, u = np.linalg.eigh(cov)
    s = np.clip(s, 0, None)
    w = u @ np.diag(1 / np.sqrt(s + 0.1)) @ u.T
    np.testing.assert_allclose(zca.whiten.double().numpy(), w, atol=1e-5)
    white = zca.transform(x)
    assert white.shape == x.shape
    # Whitened covariance in the eigenbasis is diag(S / (S + eps)): ~identity where S >> eps.
    wf = white.reshape(len(x), -1).double().numpy()
    wcov = u.T @ (wf.T @ wf / (len(wf) - 1)) @ u
    np.testing.assert_allclose(np.diag(wcov), s / (s + 0.1), atol=1e-4)
    large = s > 10 * 0.1
    assert large.sum() >= 3 and np.all(np.diag(wcov)[large] > 0.9)
    torch.testing.assert_close(zca.inverse(white), x, atol=1e-4, rtol=0)


def test_zca_dataset_and_state_dict():
    ds = load_dataset(zca=True)
    assert ds.zca is not None and ds.describe()["zca"] is True
    plain = load_dataset()
    torch.testing.assert_close(ds.zca.inverse(ds.train_images), plain.train_images, atol=1e-4, rtol=0)
    torch.testing.assert_close(ds.denormalise(ds.test_images), plain.denormalise(plain.test_images), atol=1e-4, rtol=0)
    state = ds.zca.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = ZCA.from_state_dict(state)
    assert again.eps == 0.1
    torch.testing.assert_close(again.transform(plain.test_images), ds.test_images)


# --- real images per class -------------------------------------------------------------------


def test_real_images_per_class():
    ds = load_dataset()
    g = torch.Generator().manual_seed(3)
    images, labels = real_images_per_class(ds.train_images, ds.train_labels, 10, 5, g)
    assert images.shape == (50, 1, 16, 16) and labels.tolist() == sorted(labels.tolist())
    assert torch.bincount(labels).tolist() == [5] * 10
    per_class = class_indices(ds.train_labels, 10)
    for i in range(len(images)):
        matches = (ds.train_images == images[i]).flatten(1).all(1).nonzero().flatten()
        assert len(matches) >= 1 and int(ds.train_labels[matches[0]]) == int(labels[i])
    for c in range(10):  # distinct within each class
        block = images[labels == c].flatten(1)
        assert len(torch.unique(block, dim=0)) == 5
    assert sum(len(idx) for idx in per_class) == len(ds.train_labels)
    again, _ = real_images_per_class(ds.train_images, ds.train_labels, 10, 5, torch.Generator().manual_seed(3))
    other, _ = real_images_per_class(ds.train_images, ds.train_labels, 10, 5, torch.Generator().manual_seed(4))
    assert torch.equal(images, again) and not torch.equal(images, other)


def test_impossible_ipc():
    ds = load_dataset()
    smallest = int(torch.bincount(ds.train_labels).min())
    with pytest.raises(ValueError, match=rf"IPC 500 is impossible: class \d has only {smallest} training images"):
        real_images_per_class(ds.train_images, ds.train_labels, 10, 500, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="ipc"):
        real_images_per_class(ds.train_images, ds.train_labels, 10, 0, torch.Generator())


def test_balanced_subset_by_hand():
    # Image i is filled with the value i, so the subset's images name the examples chosen.
    labels = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0, 1, 1, 2, 0])  # class sizes 4, 5, 4
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    ds = Dataset("toy", images, labels, images[:2].clone(), labels[:2].clone(), 1, (2, 2), 3, ["a", "b", "c"],
                 (0.0,), (1.0,), None)
    subset = balanced_subset(ds, 3, seed=5)
    chosen = subset.train_images[:, 0, 0, 0].long()
    assert torch.equal(subset.train_images, images[chosen]) and torch.equal(subset.train_labels, labels[chosen])
    assert torch.bincount(subset.train_labels).tolist() == [3, 3, 3]
    assert chosen.tolist() == sorted(set(chosen.tolist()))  # distinct, in D's order
    assert subset.test_images is ds.test_images and subset.test_labels is ds.test_labels
    assert torch.equal(balanced_subset(ds, 3, seed=5).train_images, subset.train_images)
    draws = {tuple(balanced_subset(ds, 3, seed=s).train_images[:, 0, 0, 0].tolist()) for s in range(10)}
    assert len(draws) > 1  # the seed matters
    whole = balanced_subset(ds, 4, seed=0).train_images[:, 0, 0, 0].long()  # all of classes 0 and 2
    assert [i for i in whole.tolist() if labels[i] != 1] == [i for i in range(13) if labels[i] != 1]
    with pytest.raises(ValueError, match=r"per_class 5 is impossible: class 0 has only 4 training images"):
        balanced_subset(ds, 5, seed=0)
    with pytest.raises(ValueError, match="per_class must be a positive integer"):
        balanced_subset(ds, 0, seed=0)


def test_the_readers_do_not_import_the_dataset_module():
    """The dependency runs one way: data.py prepares what sources.py reads, and sources.py needs nothing from it."""
    code = "import sys, mctlib.sources; print('mctlib.data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
