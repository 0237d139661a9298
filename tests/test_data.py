"""mctlib.data: every loader reads files written in the dataset's real on-disk format."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mctlib.data import (
    DATASETS,
    ZCA,
    Dataset,
    DatasetError,
    class_indices,
    load_dataset,
    real_images_per_class,
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


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: magic 0x0000 | type 0x08 (ubyte) | ndim, big-endian dims, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    train, test = pixels(12, 28, 28), pixels(5, 28, 28)
    train_labels, test_labels = RNG.integers(0, 10, 12).astype(np.uint8), np.array([9, 0, 1, 2, 3], np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", train)
    write_idx(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx(raw / "t10k-images-idx3-ubyte", test)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_labels)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_real_format(tmp_path, name, folder):
    train, train_labels, test, test_labels = write_mnist(tmp_path, folder)
    ds = load_dataset(name, root=tmp_path)
    assert ds.num_classes == 10 and ds.channels == 1 and ds.image_size == (28, 28)
    assert ds.train_labels.tolist() == train_labels.tolist() and ds.test_labels.tolist() == test_labels.tolist()
    check_roundtrip(ds, train[:, None], test[:, None])
    if name == "fashion_mnist":
        assert ds.class_names[0] == "T-shirt/top"
    resized = load_dataset(name, root=tmp_path, image_size=32)
    assert resized.train_images.shape == (12, 1, 32, 32)


def test_mnist_bad_magic(tmp_path):
    write_mnist(tmp_path, "MNIST")
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(b"\x00\x00\x99\x07" + images.read_bytes()[4:])
    with pytest.raises(DatasetError, match=r"could not read MNIST from .*MNIST.raw.*download=True"):
        load_dataset("mnist", root=tmp_path)


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
def test_missing_dataset_says_where_and_how(tmp_path, name, expected):
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
