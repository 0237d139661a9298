"""Self-verifying files: a store's manifest and a distillation checkpoint refuse a hand edit or damage
with one line naming what is wrong, and a checkpoint's step sizes may change on resume, logged."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mctlib.cli import main
from mctlib.config import DistillConfig, ExpertConfig
from mctlib.data import load_dataset
from mctlib.distill import CHECKPOINT, CheckpointError, distill
from mctlib.experts import make_experts
from mctlib.networks import NetConfig
from mctlib.storage import StoreError, load_store, save_convexified

NET = NetConfig(channels=1, num_classes=10, image_size=8, width=16, depth=2)
SMALL = dict(method="mct", ipc=1, syn_steps=4, expert_epochs=2.0, max_start_epoch=3.0, lr_img=100.0, lr_lr=1e-7,
             iterations=4, eval_every=0, checkpoint_every=2)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", image_size=8)


@pytest.fixture(scope="module")
def store_dir(data, tmp_path_factory) -> Path:
    """A convexified store: two 6-epoch experts, K = 3 (waypoint_epochs [0, 3, 6])."""
    root = tmp_path_factory.mktemp("integrity")
    full = make_experts(data, NET, ExpertConfig(num_experts=2, epochs=6, record="full", batch_size=128), root / "full")
    save_convexified(full, root / "convex", num_waypoints=3)
    return root / "convex"


def _edited(store_dir: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy


def _cli_distill(store: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--store", str(store), "--out", str(out), "--no-progress", "--device", "cpu", "--dataset",
            "digits", "--data-image-size", "8", "--ipc", "1", "--syn-steps", "4", "--expert-epochs", "2",
            "--max-start-epoch", "3", "--lr-lr", "1e-7", "--iterations", "4", "--eval-every", "0",
            "--checkpoint-every", "2", *extra]


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"mctlib {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_hand_edited_waypoint_list_is_refused(store_dir, tmp_path, capsys):
    """Before: waypoint_epochs [0, 2, 6] for the recorded [0, 3, 6] was used silently (other points matched)."""
    assert load_store(store_dir).manifest["waypoint_epochs"] == [0, 3, 6]
    store = _edited(store_dir, tmp_path, lambda m: m.update(waypoint_epochs=[0, 2, 6]))
    with pytest.raises(StoreError, match=r"field waypoint_epochs = \[0, 2, 6\] is invalid: .*must be \[0, 3, 6\]"):
        load_store(store)
    with pytest.raises(SystemExit) as exit_:
        main(_cli_distill(store, tmp_path / "run"))
    assert exit_.value.code == 2 and "waypoint_epochs" in _one_line(capsys, "distill")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit", [
    lambda m: m["recipe"].update(lr=0.02),
    lambda m: m["experts"][1].update(init_seed=7),
    lambda m: m["dataset"]["mean"].__setitem__(0, 0.5),
    lambda m: m["layers"].reverse(),
], ids=["recipe", "init_seed", "dataset-mean", "layers"])
def test_a_well_formed_edit_fails_the_checksum(store_dir, tmp_path, edit):
    store = _edited(store_dir, tmp_path, edit)
    with pytest.raises(StoreError, match="was edited or damaged: its checksum does not match"):
        load_store(store)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("epochs"), "epochs"),
    (lambda m: m["experts"][1].pop("file"), r"experts\[1\].file"),
    (lambda m: m.update(experts=[]), "experts"),
    (lambda m: m.update(kind="mixed"), "kind"),
    (lambda m: m.update(theta0=None), "theta0"),
    (lambda m: m["dataset"].update(image_size=[8]), "dataset.image_size"),
    (lambda m: m["net"].update(width="wide"), "net"),
    (lambda m: m.update(waypoint_epochs=[0, 3, 6, 9]), "waypoint_epochs"),
    (lambda m: m.pop("waypoint_epochs"), "waypoint_epochs"),
])
def test_a_malformed_manifest_gives_one_line_naming_the_field(store_dir, tmp_path, capsys, edit, field):
    """Before: KeyError / IndexError / TypeError tracebacks from deep inside the load."""
    store = _edited(store_dir, tmp_path, edit)
    with pytest.raises(StoreError, match=rf"field {field}\b.* is invalid"):
        load_store(store)
    with pytest.raises(SystemExit) as exit_:
        main(_cli_distill(store, tmp_path / "run"))
    assert exit_.value.code == 2
    line = _one_line(capsys, "distill")
    assert "field" in line and "manifest.json" in line


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("checksum"),
    lambda m: (m.pop("checksum"), m["net"].update(activation="sigmoid")),
    lambda m: (m.pop("checksum"), m.update(epochs=5)),
], ids=["only-removed", "activation-edited", "epochs-edited"])
def test_a_manifest_without_its_checksum_is_refused_before_any_field_is_used(store_dir, tmp_path, capsys, edit):
    """Before: trusted. With net.activation edited to sigmoid, distill trained a sigmoid network on ReLU
    weights and exited 0; with epochs edited, the intact expert file was blamed. Now one line says the
    manifest cannot be verified and how to re-create the store, and no run folder is made."""
    store = _edited(store_dir, tmp_path, edit)
    with pytest.raises(StoreError, match="has no checksum .* re-create the store with `mctlib experts`"):
        load_store(store)
    with pytest.raises(SystemExit) as exit_:
        main(_cli_distill(store, tmp_path / "run"))
    line = _one_line(capsys, "distill")
    assert exit_.value.code == 2 and "manifest.json has no checksum" in line and "expert_" not in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- checkpoints


def _run(data, store_dir: Path, run: Path, **changes):
    return distill(DistillConfig(**{**SMALL, **changes}), load_store(store_dir), data, run_dir=run,
                   resume=(run / CHECKPOINT).exists(), progress=False)


def _rewrite_checkpoint(path: Path, tensors=None, state=None) -> None:
    """Change a checkpoint's tensors or state and write it back with its metadata (checksum included) as is."""
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["mctlib"])   # the checkpoint's metadata: one entry of sorted JSON
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    if tensors:
        tensors(loaded)
    if state:
        info = json.loads(meta["state"])
        state(info)
        meta["state"] = json.dumps(info)
    save_file(loaded, path, metadata={"mctlib": json.dumps(meta)})


@pytest.fixture
def run(data, store_dir, tmp_path) -> Path:
    out = tmp_path / "run"
    _run(data, store_dir, out)
    return out


def test_a_checkpoint_with_altered_images_is_refused(data, store_dir, run, capsys):
    """Before: it resumed silently from the altered images."""
    _rewrite_checkpoint(run / CHECKPOINT, tensors=lambda t: t["images"][0, 0, 0].add_(0.5))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        _run(data, store_dir, run, iterations=6)
    assert main(_cli_distill(store_dir, run, "--iterations", "6", "--resume")) == 1
    assert "fails its checksum" in _one_line(capsys, "distill")


def test_a_checkpoint_with_an_altered_state_is_refused(data, store_dir, run):
    _rewrite_checkpoint(run / CHECKPOINT, state=lambda s: s.update(iteration=2))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        _run(data, store_dir, run, iterations=6)


def test_a_checkpoint_holding_nan_says_so(data, store_dir, run):
    """Before: the resumed run diverged at once, blaming lr_img."""
    _rewrite_checkpoint(run / CHECKPOINT, tensors=lambda t: t["images"][0, 0, 0].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=r"holds non-finite values \(NaN/Inf in images\)") as err:
        _run(data, store_dir, run, iterations=6)
    assert "lr_img" not in str(err.value)


def test_a_checkpoint_missing_a_tensor_is_refused(data, store_dir, run):
    _rewrite_checkpoint(run / CHECKPOINT, tensors=lambda t: t.pop("img_velocity"))
    with pytest.raises(CheckpointError, match=r"lacks the field\(s\) \['img_velocity'\]"):
        _run(data, store_dir, run, iterations=6)


def test_step_sizes_may_change_on_resume_and_are_logged(data, store_dir, run):
    """Before: refused as a configuration change. The new values take effect from the checkpoint on:
    lr_lr = 0 leaves alpha exactly where the checkpoint had it, lr_img = 1e-30 leaves the images."""
    with safe_open(run / CHECKPOINT, "pt") as f:
        images_at_4, alpha_at_4 = f.get_tensor("images"), float(f.get_tensor("alpha")[0])
    first_log = json.loads((run / "metrics.json").read_text())["log"]
    result = _run(data, store_dir, run, iterations=8, lr_lr=0.0, lr_img=1e-30)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step_size_changes"] == [{"iteration": 4, "field": "lr_img", "from": 100.0, "to": 1e-30},
                                            {"iteration": 4, "field": "lr_lr", "from": 1e-7, "to": 0.0}]
    assert [e["alpha"] for e in metrics["log"][4:]] == [alpha_at_4] * 4
    assert torch.equal(result.images, images_at_4)
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in first_log]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in metrics["log"][:4]] == strip
    assert json.loads((run / "config.json").read_text())["distill"]["lr_img"] == 1e-30
    with pytest.raises(CheckpointError, match="another configuration: distill.syn_steps"):
        _run(data, store_dir, run, iterations=10, syn_steps=5)
