"""Values checked before any work, on every command: each bad input gives one line,
`mctlib <command>: error: ...`, names what is wrong, and leaves nothing behind."""

import json
import os
from pathlib import Path

import pytest
import torch

from mctlib.cli import main, make_parser
from mctlib.config import ExpertConfig
from mctlib.data import load_dataset
from mctlib.experts import make_experts
from mctlib.networks import NetConfig
from mctlib.storage import load_store, save_convexified

NET = NetConfig(channels=1, num_classes=10, image_size=8, width=16, depth=2)
DATA = ["--dataset", "digits", "--data-image-size", "8"]
TINY = [*DATA, "--net-image-size", "8", "--net-width", "16", "--net-depth", "2"]
FAST_EVAL = ["--num-eval", "1", "--epochs", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Full buffers and their K = 3 convexified records: two 6-epoch experts of the tiny ConvNet."""
    root = tmp_path_factory.mktemp("values")
    data = load_dataset("digits", image_size=8)
    full = make_experts(data, NET, ExpertConfig(num_experts=2, epochs=6, record="full", batch_size=128), root / "full")
    save_convexified(full, root / "convex", num_waypoints=3)
    return {"mtt": root / "full", "mct": root / "convex"}


def _refused(capsys, argv: list[str], code: int = 2) -> str:
    """Run the command; it must exit with `code` and one error line, which is returned."""
    with pytest.raises(SystemExit) as exit_:
        result = main(argv)
        raise SystemExit(result)
    assert exit_.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"mctlib {argv[0]}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _distill(store: Path, out: Path, method: str, *extra: str) -> list[str]:
    return ["distill", "--store", str(store), "--out", str(out), "--method", method, "--no-progress", "--device",
            "cpu", *DATA, "--ipc", "1", "--syn-steps", "2", "--expert-epochs", "2", "--lr-lr", "1e-7",
            "--iterations", "1", "--eval-every", "0", *extra]


@pytest.mark.parametrize("method, largest", [("mtt", 5), ("mct", 4)])
def test_max_start_epoch_beyond_the_store_is_refused_with_the_largest_allowed(stores, tmp_path, capsys, method,
                                                                             largest):
    """E = 6, M = 2: MTT's integer starts 0 .. max_start - 1 must stay <= E - M, MCT's continuous starts
    below max_start must too. Before: clamped without notice (on MCT the windows were cut at E)."""
    line = _refused(capsys, _distill(stores[method], tmp_path / "r", method, "--max-start-epoch", str(largest + 1)))
    assert f"max_start_epoch = {largest + 1}" in line and f"largest allowed max_start_epoch is {largest}" in line
    assert not (tmp_path / "r").exists()
    assert main(_distill(stores[method], tmp_path / "ok", method, "--max-start-epoch", str(largest))) == 0


@pytest.mark.parametrize("flag, value, words", [
    ("--lr", "-0.01", "--lr -0.01 must be a finite number > 0"),
    ("--lr", "nan", "--lr nan must be a finite number > 0"),
    ("--lr", "inf", "--lr inf must be a finite number > 0"),
    ("--ipc", "0", "--ipc 0 must be >= 1"),
])
def test_evaluate_refuses_a_bad_baseline_lr_or_ipc(tmp_path, capsys, monkeypatch, flag, value, words):
    """Before: a negative lr trained by gradient ascent and wrote 10 % to metrics.json; --ipc 0 a traceback."""
    import mctlib.evaluate

    monkeypatch.setattr(mctlib.evaluate, "train_networks", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "e"
    assert words in _refused(capsys, ["evaluate", "--baseline", "random_real", flag, value, "--out", str(out),
                                      *FAST_EVAL, *TINY])
    assert not out.exists()


def _synthetic(path: Path, images: torch.Tensor, labels: torch.Tensor, alpha: float = 0.01) -> Path:
    """A well-formed, checksummed set whose recorded settings describe its images as they are."""
    from mctlib.rundir import save_synthetic

    c, size = images.shape[1], images.shape[-1]
    settings = {"net": {**NET.to_dict(), "channels": c, "image_size": size}, "ipc": max(1, images.shape[0] // 10),
                "dataset": {"name": "digits", "channels": c, "image_size": [size, size], "num_classes": 10,
                            "zca": False}}
    save_synthetic(path, images, labels, alpha, settings, {})
    return path


@pytest.mark.parametrize("images, labels, alpha, words", [
    (torch.randn(10, 3, 8, 8), torch.arange(10), 0.01, "shape (10, 3, 8, 8); the network takes (N, 1, 8, 8)"),
    (torch.randn(10, 1, 16, 16), torch.arange(10), 0.01, "the network takes (N, 1, 8, 8)"),
    (torch.randn(10, 1, 8, 8), torch.arange(10) + 5, 0.01, "labels per class [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1"),
    (torch.randn(10, 1, 8, 8), -torch.arange(10), 0.01, "labels per class None"),
    (torch.randn(10, 1, 8, 8), torch.arange(9), 0.01, "labels per class [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]"),
    (torch.full((10, 1, 8, 8), float("nan")), torch.arange(10), 0.01, "must be finite"),
    (torch.randn(10, 1, 8, 8), torch.arange(10), float("inf"), "alpha = inf must be a finite positive number"),
], ids=["channels", "size", "labels-high", "labels-negative", "label-count", "nan-images", "inf-alpha"])
def test_evaluate_refuses_a_synthetic_set_the_network_cannot_take(tmp_path, capsys, images, labels, alpha, words):
    """Before: tracebacks from inside the first convolution or the loss. Labels that are not `ipc` per class
    are refused as the set is read; the rest when evaluated on another network (--config overrides the
    set's own)."""
    path = _synthetic(tmp_path / "syn.safetensors", images, labels, alpha)
    out = tmp_path / "e"
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"net": NET.to_dict(), "data": {"name": "digits", "image_size": 8}}))
    assert words in _refused(capsys, ["evaluate", "--synthetic", str(path), "--out", str(out), *FAST_EVAL,
                                      "--config", str(config)])
    assert not (out / "metrics.json").exists()


def test_ensemble_size_is_validated_and_reaches_the_training(tmp_path, capsys):
    """Before: any value was accepted and passed to nothing. An expert's trajectory does not depend on
    how many train beside it, so ensembles of 1 and 2 give the same stores."""
    assert "--ensemble-size 0 must be >= 1" in _refused(capsys, ["experts", "--out", str(tmp_path / "x"),
                                                                 "--ensemble-size", "0", *TINY])
    stores = {}
    for size in (1, 2):
        out = tmp_path / f"e{size}"
        assert main(["experts", "--out", str(out), "--num-experts", "2", "--epochs", "3", "--record", "full",
                     "--batch-size", "128", "--no-progress", "--device", "cpu", "--ensemble-size", str(size),
                     *TINY]) == 0
        stores[size] = load_store(out)
        assert stores[size].manifest["stats"]["ensemble_size"] == size
    for a, b in zip(stores[1].records, stores[2].records):
        torch.testing.assert_close(a.params, b.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flag, value", [("--lr-img", "inf"), ("--lr-img", "nan"), ("--expert-epochs", "inf"),
                                         ("--max-start-epoch", "-inf")])
def test_non_finite_values_are_called_non_finite(tmp_path, capsys, flag, value):
    """Before: `inf` was told it "must be > 0"."""
    line = _refused(capsys, ["distill", "--store", "x", "--out", str(tmp_path / "r"), flag, value])
    assert f"{flag}:" in line and "must be a finite number" in line


def test_a_store_of_another_width_than_the_preset_is_said_or_refused(stores, tmp_path, capsys):
    """Before: the store's width silently replaced the preset's."""
    argv = ["distill", "--preset", "mct-digits-ipc1", "--store", str(stores["mct"]), "--out", str(tmp_path / "r"),
            "--data-image-size", "8", "--max-start-epoch", "3", "--syn-steps", "2", "--iterations", "1",
            "--eval-every", "0", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mctlib distill: note: ")]
    assert len(notes) == 1 and "width 16 (preset 64)" in notes[0] and "store's network is used" in notes[0]
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"net": {"width": 64}}))
    argv = [*argv[:5], "--config", str(config), "--out", str(tmp_path / "r2"), *argv[7:]]
    assert "width: --config 64 vs store 16" in _refused(capsys, argv)
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("command", ["experts", "convexify", "distill", "evaluate"])
def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch, command):
    """Before: `--out ""` wrote into the current folder."""
    monkeypatch.chdir(tmp_path)
    argv = {"experts": ["experts", *TINY], "convexify": ["convexify", "--store", "s"],
            "distill": ["distill", "--store", "s"], "evaluate": ["evaluate", "--baseline", "full", *TINY]}[command]
    assert "--out '' names no folder" in _refused(capsys, [*argv, "--out", ""])
    assert list(tmp_path.iterdir()) == []


def test_negative_numbers_in_scientific_notation_are_values(tmp_path, capsys):
    """Before: argparse took `-1e-7` for a flag ("expected one argument")."""
    args = make_parser().parse_args(["distill", "--store", "s", "--out", "o", "--lr-lr", "-1e-7", "--seed", "-3",
                                     "--lr-img", "-.5E+2"])
    assert vars(args)["distill.lr_lr"] == -1e-7 and vars(args)["distill.seed"] == -3
    assert vars(args)["distill.lr_img"] == -50.0
    line = _refused(capsys, ["distill", "--store", "s", "--out", str(tmp_path / "r"), "--lr-lr", "-1e-7"])
    assert "--lr-lr: DistillConfig.lr_lr = -1e-07 is invalid: must be >= 0" in line


@pytest.mark.parametrize("command", ["experts", "distill", "evaluate"])
def test_a_gpu_device_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch, stores, command):
    """Before: a RuntimeError/ValueError traceback (experts and evaluate)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = str(tmp_path / "r")
    argv = {"experts": ["experts", "--out", out, *TINY, "--record", "full"],
            "distill": ["distill", "--store", str(stores["mtt"]), "--out", out, *DATA],
            "evaluate": ["evaluate", "--baseline", "full", "--out", out, *TINY]}[command]
    for device in ("cuda", "gpu"):
        assert f"--device {device}: " in _refused(capsys, [*argv, "--device", device])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("where", ["file", "under-a-file", "read-only"])
def test_experts_checks_its_destination_before_training(tmp_path, capsys, monkeypatch, where):
    """Before: every expert trained, then the write failed with a traceback."""
    import mctlib.experts

    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    monkeypatch.setattr(mctlib.experts, "train_experts", lambda *a, **k: pytest.fail("trained before checking --out"))
    target = tmp_path / "file"
    target.write_text("not a folder")
    out = {"file": target, "under-a-file": target / "store", "read-only": tmp_path / "ro" / "store"}[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir(mode=0o555)
    line = _refused(capsys, ["experts", "--out", str(out), "--record", "full", *TINY, "--device", "cpu"])
    assert "--out" in line and "choose another --out" in line
    assert target.read_text() == "not a folder"


def test_a_file_system_error_is_one_line(tmp_path, capsys, monkeypatch, stores):
    """An environment fault (here a full disk while writing) ends in one line, not a traceback."""
    import mctlib.storage

    def full_disk(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(mctlib.storage, "atomic_write_bytes", full_disk)
    line = _refused(capsys, ["convexify", "--store", str(stores["mtt"]), "--out", str(tmp_path / "k")], code=1)
    assert "No space left on device" in line
