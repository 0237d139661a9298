"""Tests for mctlib.storage: trajectory stores as safetensors files plus a JSON manifest.

The files are read back independently (safetensors.safe_open, and the raw header), the
manifest as plain JSON, checksums with hashlib; every way a store can be unusable must raise
StoreError with a message that says what is wrong.
"""

import dataclasses
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mctlib.networks import FlatModel, NetConfig, build_network
from mctlib.storage import MANIFEST, StoreError, load_store, manifest_checksum, save_store
from mctlib.trajectories import ConvexRecord, FullBuffer, convexify

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- stores made once per module


@pytest.fixture(scope="module")
def context(digits8, tiny_net, expert_cfg, full_buffers, init_seeds, flat_model):
    convex = [convexify(b, flat_model.layer_slices, 4, "arc_length", smooth=True) for b in full_buffers]
    return dict(net=tiny_net, dataset=digits8.describe(), recipe=expert_cfg.to_dict(), seeds=list(init_seeds),
                full=list(full_buffers), convex=convex, model=flat_model)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, context):
    """{(kind, store_theta0): path} for both record kinds, with theta_0 stored or regenerated from its seed."""
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for kind in ("full", "convex"):
        for store_theta0 in (True, False):
            path = root / f"{kind}-{'stored' if store_theta0 else 'seed'}"
            save_store(path, context[kind], context["net"], context["dataset"], context["recipe"],
                       context["seeds"], store_theta0=store_theta0)
            out[kind, store_theta0] = path
    return out


@pytest.fixture
def copy_of(stores, tmp_path):
    """A private copy of one of the module's stores, to damage."""

    def make(kind="full", store_theta0=True):
        dest = tmp_path / f"copy-{kind}-{store_theta0}"
        shutil.copytree(stores[kind, store_theta0], dest)
        return dest

    return make


def assert_same_record(a, b):
    assert type(a) is type(b)
    if isinstance(a, FullBuffer):
        assert a.params.dtype == b.params.dtype and torch.equal(a.params, b.params)
    else:
        assert torch.equal(a.waypoints, b.waypoints) and a.waypoints.dtype == b.waypoints.dtype
        assert torch.equal(a.beta, b.beta) and a.beta.dtype == b.beta.dtype
        assert a.waypoint_epochs == b.waypoint_epochs and a.layer_slices == b.layer_slices
        for tau in (0, 1.5, 6.25, a.epochs):
            assert torch.equal(a.point(tau), b.point(tau))


def read_header(file: Path) -> dict:
    """The safetensors header, read by hand: u64 little-endian length, then that much JSON."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def write_manifest(path: Path, manifest) -> None:
    """Rewrite a manifest with its checksum recomputed, as a deliberate edit would, so that the checks
    behind the checksum are what these tests exercise (test_integrity.py: edits without it)."""
    if isinstance(manifest, dict) and "checksum" in manifest:
        manifest = {**manifest, "checksum": manifest_checksum(manifest)}
    (path / MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------- round trip and format


@pytest.mark.parametrize("store_theta0", (True, False))
@pytest.mark.parametrize("kind", ("full", "convex"))
def test_round_trip_is_bit_identical(stores, context, kind, store_theta0):
    store = load_store(stores[kind, store_theta0], net=context["net"], dataset=context["dataset"])
    assert store.kind == kind and store.net == context["net"]
    assert len(store.records) == len(context[kind])
    for got, want in zip(store.records, context[kind]):
        assert_same_record(got, want)


@pytest.mark.parametrize("kind", ("full", "convex"))
def test_manifest_is_json_with_the_recorded_facts(stores, context, kind):
    path = stores[kind, True]
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == "mctlib-trajectories" and manifest["format_version"] == 1
    assert manifest["kind"] == kind
    assert manifest["net"] == context["net"].to_dict()
    assert manifest["dataset"] == context["dataset"]
    assert manifest["recipe"] == context["recipe"]
    assert manifest["epochs"] == context["full"][0].epochs
    assert manifest["num_params"] == context["model"].numel
    assert [layer["name"] for layer in manifest["layers"]] == list(context["model"].names)
    assert manifest["versions"]["torch"] == torch.__version__ and "python" in manifest["versions"]
    assert manifest["theta0"] == "stored"
    if kind == "convex":
        assert manifest["waypoint_epochs"] == list(context["convex"][0].waypoint_epochs)
    assert len(manifest["experts"]) == len(context["seeds"])
    for entry, seed in zip(manifest["experts"], context["seeds"]):
        data = (path / entry["file"]).read_bytes()
        assert entry["init_seed"] == seed
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # Only the store's files: no temporary files left behind by the atomic writes.
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST] + [e["file"] for e in manifest["experts"]])


@pytest.mark.parametrize("kind", ("full", "convex"))
def test_files_are_plain_safetensors(stores, context, kind):
    path = stores[kind, True]
    manifest = json.loads((path / MANIFEST).read_text())
    D = context["model"].numel
    for entry, record in zip(manifest["experts"], context[kind]):
        file = path / entry["file"]
        header = read_header(file)
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
        if kind == "full":
            assert keys == {"params"}
            assert header["params"]["dtype"] == "F32" and header["params"]["shape"] == [record.epochs + 1, D]
            assert torch.equal(tensors["params"], record.params)
        else:
            assert keys == {"waypoints", "beta"}
            assert header["waypoints"]["shape"] == [4, D] and header["waypoints"]["dtype"] == "F32"
            assert header["beta"]["shape"] == [record.epochs + 1, len(context["model"].names)]
            assert header["beta"]["dtype"] == "F32"                # one float32 array, not pickled scalars
            assert torch.equal(tensors["waypoints"], record.waypoints)
            assert torch.equal(tensors["beta"], record.beta)


# ---------------------------------------------------------------- theta_0 from its seed


@pytest.mark.parametrize("kind", ("full", "convex"))
def test_theta0_is_regenerated_bit_for_bit_from_the_seed(stores, context, kind):
    path = stores[kind, False]
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["theta0"] == "seed"
    store = load_store(path)
    D = context["model"].numel
    for entry, got, want, seed in zip(manifest["experts"], store.records, context[kind], context["seeds"]):
        with safe_open(str(path / entry["file"]), framework="pt") as f:
            stored = f.get_tensor("params" if kind == "full" else "waypoints")
        first_got = got.params[0] if kind == "full" else got.waypoints[0]
        first_want = want.params[0] if kind == "full" else want.waypoints[0]
        # The file really lacks theta_0 ...
        assert stored.shape[0] == (want.epochs if kind == "full" else len(want.waypoint_epochs) - 1)
        assert stored.shape[1] == D
        # ... and the loaded record has it back, exactly: it is the seeded initialisation.
        assert torch.equal(first_got, first_want)
        assert torch.equal(first_got, FlatModel(build_network(context["net"], seed=seed)).flatten())
        assert_same_record(got, want)
        assert entry["bytes"] < (stores[kind, True] / entry["file"]).stat().st_size - 4 * D + 64


def test_altered_theta0_checksum_is_refused(copy_of):
    path = copy_of("full", store_theta0=False)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["experts"][1]["theta0_sha256"] = "0" * 64
    write_manifest(path, manifest)
    with pytest.raises(StoreError, match="theta_0"):
        load_store(path)


def test_theta0_from_a_wrong_seed_is_refused(copy_of):
    path = copy_of("convex", store_theta0=False)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["experts"][0]["init_seed"] += 1
    write_manifest(path, manifest)
    with pytest.raises(StoreError, match="seed"):
        load_store(path)


# ---------------------------------------------------------------- bytes


def test_K2_record_of_a_50_epoch_expert_is_25x_smaller(tmp_path, capsys):
    """The digits ConvNet (D = 302,346 in 14 tensors), 50 epochs: full = 51 D floats; K = 2 is
    2 D floats plus a 51 x 14 beta table (METHOD.md: "2 models instead of ~50")."""
    net = NetConfig()
    model = FlatModel(build_network(net, seed=0))
    D, L, E = model.numel, len(model.names), 50
    g = torch.Generator().manual_seed(0)
    params = model.flatten() + torch.randn(E + 1, D, generator=g).mul_(1e-3).cumsum_(0)
    params[0] = model.flatten()
    full = FullBuffer(params)
    convex = convexify(full, model.layer_slices, 2, "arc_length")
    save_store(tmp_path / "full", [full], net, {"name": "digits"}, {}, [0])
    save_store(tmp_path / "convex", [convex], net, {"name": "digits"}, {}, [0])
    full_bytes = (tmp_path / "full" / "expert_000.safetensors").stat().st_size
    convex_bytes = (tmp_path / "convex" / "expert_000.safetensors").stat().st_size
    # Payloads are exactly the float32 arrays; the headers are small.
    assert 51 * D * 4 < full_bytes < 51 * D * 4 + 256
    assert (2 * D + 51 * L) * 4 < convex_bytes < (2 * D + 51 * L) * 4 + 256
    ratio = full_bytes / convex_bytes
    with capsys.disabled():
        print(f"\n[storage] D={D} L={L} E={E}: full {full_bytes} B, K=2 convex {convex_bytes} B, ratio {ratio:.2f}")
    assert ratio >= 25
    assert load_store(tmp_path / "convex").bytes_per_expert == convex_bytes


# ---------------------------------------------------------------- damaged, foreign and mismatched stores


def test_truncated_file_is_refused(copy_of):
    path = copy_of()
    file = path / "expert_001.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"expert_001\.safetensors is corrupt or truncated"):
        load_store(path)


@pytest.mark.parametrize("where", ("header", "middle", "last"))
def test_flipped_byte_is_refused(copy_of, where):
    path = copy_of("convex")
    file = path / "expert_000.safetensors"
    data = bytearray(file.read_bytes())
    pos = {"header": 20, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[pos] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"expert_000\.safetensors is corrupt"):
        load_store(path)


def test_missing_file_is_refused(copy_of):
    path = copy_of()
    (path / "expert_001.safetensors").unlink()
    with pytest.raises(StoreError, match=r"expert_001\.safetensors is missing"):
        load_store(path)


def test_checksummed_garbage_is_refused(copy_of):
    """A file whose manifest entry matches it but that is not safetensors."""
    path = copy_of()
    garbage = b"not a safetensors file at all" * 10
    (path / "expert_000.safetensors").write_bytes(garbage)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["experts"][0].update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    write_manifest(path, manifest)
    with pytest.raises(StoreError, match="safetensors"):
        load_store(path)


@pytest.mark.parametrize("content", ['{"name": "resnet", "version": 1}', "[1, 2, 3]", '"mctlib-trajectories"',
                                     '{"format": "something-else", "format_version": 1}'])
def test_foreign_json_manifest_is_refused(tmp_path, content):
    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(StoreError, match="not an mctlib trajectory manifest"):
        load_store(tmp_path)


def test_corrupt_manifest_is_refused(copy_of):
    path = copy_of()
    text = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="corrupt"):
        load_store(path)


def test_non_store_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not a trajectory store"):
        load_store(tmp_path)
    with pytest.raises(StoreError, match="not a trajectory store"):
        load_store(tmp_path / "does-not-exist")


@pytest.mark.parametrize("version", (0, 2, "1", None))
def test_other_format_version_is_refused(copy_of, version):
    path = copy_of()
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = version
    write_manifest(path, manifest)
    with pytest.raises(StoreError, match="format_version"):
        load_store(path)


def test_network_mismatch_names_both_sides(stores, context):
    other = dataclasses.replace(context["net"], width=16)
    with pytest.raises(StoreError, match=r"width: store 8 vs requested 16"):
        load_store(stores["full", True], net=other)
    other = dataclasses.replace(context["net"], norm="batchnorm")
    with pytest.raises(StoreError, match=r"norm: store 'instancenorm' vs requested 'batchnorm'"):
        load_store(stores["convex", True], net=other)


def test_dataset_mismatch_names_both_sides(stores, context):
    other = dict(context["dataset"], name="cifar10")
    with pytest.raises(StoreError, match=r"name: store 'digits' vs requested 'cifar10'"):
        load_store(stores["full", True], dataset=other)
    other = dict(context["dataset"], image_size=[16, 16])
    with pytest.raises(StoreError, match=r"image_size: store \[8, 8\] vs requested \[16, 16\]"):
        load_store(stores["full", True], dataset=other)
    other = dict(context["dataset"], zca=True)
    with pytest.raises(StoreError, match=r"zca: store False vs requested True"):
        load_store(stores["full", True], dataset=other)


def test_vectors_of_another_network_are_refused(copy_of):
    """A manifest that claims another network than the files hold."""
    path = copy_of()
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["net"]["width"] = 16
    write_manifest(path, manifest)
    with pytest.raises(StoreError, match="parameters"):
        load_store(path)


def test_save_refuses_to_overwrite(stores, context):
    path = stores["full", True]
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(FileExistsError, match="already holds a trajectory store"):
        save_store(path, context["full"], context["net"], context["dataset"], context["recipe"], context["seeds"])
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_save_refuses_mixed_record_kinds(tmp_path, context):
    with pytest.raises(ValueError, match="one record kind"):
        save_store(tmp_path / "mixed", [context["full"][0], context["convex"][1]], context["net"],
                   context["dataset"], context["recipe"], context["seeds"])
    assert isinstance(context["convex"][1], ConvexRecord)
