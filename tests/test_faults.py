"""Real runs killed with SIGKILL at several points, and the outcome of the user's next command.

Each run is a separate `python -m mctlib` process on 8x8 digits with a tiny ConvNet. A kill at an
exact point (half-way through writing a checkpoint's bytes, after an expert trained) comes from
`KILLER` below: it wraps one mctlib function so that the process sends itself SIGKILL there; the
files on disk are then whatever the real code had written when the kernel stopped it.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mctlib.config import ExpertConfig
from mctlib.data import load_dataset
from mctlib.distill import CHECKPOINT, load_synthetic
from mctlib.experts import make_experts
from mctlib.networks import NetConfig
from mctlib.storage import load_store, save_convexified

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MCTLIB_THREADS": "1"}
NET = NetConfig(channels=1, num_classes=10, image_size=8, width=16, depth=2)
DATA_FLAGS = ["--dataset", "digits", "--data-image-size", "8"]
NET_FLAGS = ["--net-width", "16", "--net-depth", "2"]

# Runs `python -m mctlib ARGV...` with one mctlib function wrapped so that the process SIGKILLs itself:
#   checkpoint-half N  : half-way through writing the bytes of the N-th checkpoint (inside atomic_write_bytes)
#   expert-trained N   : once the N-th ensemble of experts has trained (before any file is written)
KILLER = r'''
import os, signal, sys

import mctlib.rundir, mctlib.experts

mode, n = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if mode == "checkpoint-half":
    real_write, real_fdopen = mctlib.rundir.atomic_write_bytes, os.fdopen

    class HalfWriter:  # the file object atomic_write_bytes writes through: half the bytes reach disk
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            die()

    def write(path, data):
        if path.name == "checkpoint.safetensors":
            calls["n"] += 1
            if calls["n"] == n:
                os.fdopen = lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k))
        return real_write(path, data)

    mctlib.rundir.atomic_write_bytes = write
elif mode == "expert-trained":
    real_accuracy = mctlib.experts.accuracy

    def accuracy(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            die()
        return real_accuracy(*args, **kwargs)

    mctlib.experts.accuracy = accuracy

from mctlib.cli import main

sys.exit(main(sys.argv[3:]))
'''


def _mctlib(*argv: str, check: bool = False) -> subprocess.CompletedProcess:
    """The user's next command, run in this process (only the killed runs need a process of their own)."""
    import contextlib
    import io

    from mctlib.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    done = subprocess.CompletedProcess(argv, code, "", err.getvalue())
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _killed(mode: str, n: int, *argv: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILLER, mode, str(n), *argv], env=ENV, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, f"not killed at {mode} {n}: rc {done.returncode}\n{done.stderr}"


def _one_line_error(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"mctlib {command}: error: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A convexified store (K = 3) of two 6-epoch experts of the tiny ConvNet."""
    root = tmp_path_factory.mktemp("faults")
    data = load_dataset("digits", image_size=8)
    full = make_experts(data, NET, ExpertConfig(num_experts=2, epochs=6, record="full", batch_size=128), root / "full")
    save_convexified(full, root / "convex", num_waypoints=3)
    return root / "convex"


def _distill(store: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--store", str(store), "--out", str(out), "--no-progress", "--device", "cpu", *DATA_FLAGS,
            "--method", "mct", "--ipc", "1", "--syn-steps", "5", "--expert-epochs", "2", "--max-start-epoch", "3",
            "--lr-img", "100", "--lr-lr", "1e-7", "--iterations", "30", "--eval-every", "0", *extra]


@pytest.fixture(scope="module")
def whole(store, tmp_path_factory) -> tuple:
    """The synthetic set of the same run, never interrupted."""
    out = tmp_path_factory.mktemp("whole") / "run"
    _mctlib(*_distill(store, out, "--checkpoint-every", "10"), check=True)
    return load_synthetic(out / "synthetic_final.safetensors")


def test_a_run_killed_before_its_first_checkpoint_is_continued_by_resume(store, whole, tmp_path):
    """Before: only config.json was left; without --resume the run was refused as existing, with --resume
    as having nothing to resume. After: --resume starts it over and it ends where an uninterrupted run does."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mctlib", *_distill(store, out, "--checkpoint-every", "1000")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (out / "config.json").exists() and not (out / CHECKPOINT).exists()

    again = _mctlib(*_distill(store, out, "--checkpoint-every", "1000"))
    assert "--resume" in _one_line_error(again, "distill")            # the message names the next command ...
    _mctlib(*_distill(store, out, "--checkpoint-every", "1000", "--resume"), check=True)   # ... which works
    resumed = load_synthetic(out / "synthetic_final.safetensors")
    assert torch.equal(resumed[0], whole[0]) and resumed[2] == whole[2]

    # The start of a run with other settings is not taken over by a resume with these.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_bytes((out / "config.json").read_bytes())
    refused = _mctlib(*_distill(store, other, "--syn-steps", "4", "--resume"))
    assert "syn_steps" in _one_line_error(refused, "distill")


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_one_before(store, whole, tmp_path):
    out = tmp_path / "run"
    _killed("checkpoint-half", 2, *_distill(store, out, "--checkpoint-every", "10"))
    partial = list(out.glob(".checkpoint.safetensors.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0      # killed half-way through the bytes ...
    assert (out / CHECKPOINT).exists()                              # ... the rename never happened
    _mctlib(*_distill(store, out, "--checkpoint-every", "10", "--resume"), check=True)
    resumed = load_synthetic(out / "synthetic_final.safetensors")
    assert torch.equal(resumed[0], whole[0]) and resumed[2] == whole[2]
    assert not list(out.glob(".*.tmp")), "the interrupted write's temporary file was left behind"


def _experts(out: Path, *extra: str) -> list[str]:
    return ["experts", "--out", str(out), "--num-experts", "2", "--epochs", "4", "--record", "full",
            "--batch-size", "128", "--no-progress", "--device", "cpu", "--ensemble-size", "1", *DATA_FLAGS,
            *NET_FLAGS, *extra]


def test_experts_killed_after_training_some_leave_nothing_and_the_next_command_works(tmp_path):
    out = tmp_path / "experts"
    _killed("expert-trained", 1, *_experts(out))
    assert not out.exists()  # nothing is written before every expert has trained
    refused = _mctlib(*_distill(out, tmp_path / "run"))
    assert "not a trajectory store" in _one_line_error(refused, "distill")
    _mctlib(*_experts(out), check=True)
    assert len(load_store(out).records) == 2


def test_experts_killed_while_writing_leave_no_store_and_no_temporary_files_after_a_rerun(tmp_path):
    """A kill between expert files: no manifest (so no store), and the rerun cleans the half-written files."""
    out = tmp_path / "experts"
    code = KILLER.replace('elif mode == "expert-trained":', '''elif mode == "expert-file":
    import mctlib.storage
    real_write = mctlib.storage.atomic_write_bytes

    def write(path, data):
        if path.name == "expert_001.safetensors":
            real_write(path.parent / ".expert_001.safetensors.x.tmp", data[: len(data) // 2])
            die()
        return real_write(path, data)

    mctlib.storage.atomic_write_bytes = write
elif mode == "expert-trained":''')
    done = subprocess.run([sys.executable, "-c", code, "expert-file", "1", *_experts(out)], env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (out / "expert_000.safetensors").exists() and not (out / "manifest.json").exists()
    refused = _mctlib(*_distill(out, tmp_path / "run"))
    assert "no manifest.json" in _one_line_error(refused, "distill")
    _mctlib(*_experts(out), check=True)
    assert len(load_store(out).records) == 2 and not list(out.glob(".*.tmp"))


CACHED = r'''
import os, signal, sys

import mctlib.experts
from mctlib.config import ExpertConfig
from mctlib.data import load_dataset
from mctlib.networks import NetConfig
from mctlib.notebook import cached_experts

if sys.argv[2] == "kill":
    mctlib.experts.accuracy = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
data = load_dataset("digits", image_size=8)
net = NetConfig(channels=1, num_classes=10, image_size=8, width=16, depth=2)
cached_experts(data, net, ExpertConfig(num_experts=2, epochs=3, record="full", batch_size=128), sys.argv[1])
'''


def test_cached_experts_killed_mid_training_leaves_no_folder_after_the_next_call(tmp_path):
    """Before: the killed call's empty `.experts-*` folder stayed in the runs folder for good."""
    root = tmp_path / "runs"
    killed = subprocess.run([sys.executable, "-c", CACHED, str(root), "kill"], env=ENV, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list(root.glob(".experts-*"))) == 1   # what a kill leaves: nothing can clean up after SIGKILL
    from mctlib.notebook import cached_experts

    data = load_dataset("digits", image_size=8)
    store = cached_experts(data, NET, ExpertConfig(num_experts=2, epochs=3, record="full", batch_size=128), root)
    assert len(store.records) == 2 and (store.path / "manifest.json").exists()
    assert not list(root.glob(".experts-*")), "the abandoned folder is still there"


def test_a_live_cached_experts_folder_is_left_alone(tmp_path):
    from mctlib.notebook import remove_abandoned_folders

    import socket

    mine = tmp_path / f".experts-{socket.gethostname()}-{os.getpid()}-abc"
    mine.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f".experts-{socket.gethostname()}-{gone.pid}-def"
    dead.mkdir()
    other_host = tmp_path / f".experts-another-host-{gone.pid}-ghi"
    other_host.mkdir()
    assert remove_abandoned_folders(tmp_path) == [dead]
    assert mine.exists() and other_host.exists() and not dead.exists()


def test_the_divergence_hint_is_a_command_that_continues_the_run(store, tmp_path, capsys):
    """`--lr-img 1e9` ran away to 5e7-sized pixels and exited 0. Now it stops at once, keeps the last good
    state, and names the command that continues; following the hints ends in a finished run."""
    from mctlib.cli import main

    out = tmp_path / "run"
    argv = _distill(store, out, "--lr-img", "1e9", "--iterations", "6", "--checkpoint-every", "3")
    assert main(argv) == 1
    tried = []
    for _ in range(12):
        err = capsys.readouterr().err
        line = _one_line_error(subprocess.CompletedProcess([], 1, "", err), "distill")
        assert "ran away" in line and str(out / CHECKPOINT) in line
        command = shlex.split(line.split("; to continue from it: ")[1])
        assert command[:3] == ["python", "-m", "mctlib"] and command.count("--lr-img") == 1
        tried.append(float(command[command.index("--lr-img") + 1]))
        if main(command[3:]) == 0:
            break
    else:
        pytest.fail(f"still diverging after lr_img {tried}")
    print(f"[faults] lr_img tried after 1e9, following the hints: {tried}")
    assert tried == sorted(tried, reverse=True) and tried[0] == 1e8
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iteration"] == 6 and metrics["step_size_changes"][0]["from"] == 1e9
    assert [c["to"] for c in metrics["step_size_changes"]] == tried


# ------------------------------------------------------------------ artifacts verified, one writer, one line

def _lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


def _only_error(done: subprocess.CompletedProcess, command: str, *words: str) -> str:
    """The command failed with exactly one line on stderr: the error, naming `words`, no usage block."""
    lines = _lines(done)
    assert done.returncode not in (0, None) and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"mctlib {command}: error: ") and "usage:" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


SMALL_RUN = ["--iterations", "4", "--checkpoint-every", "2", "--eval-every", "2", "--eval-num-eval", "2",
             "--eval-epochs", "3"]


@pytest.fixture(scope="module")
def run_dir(store, tmp_path_factory) -> Path:
    """A finished 4-iteration run with evaluations, so it has both synthetic sets."""
    out = tmp_path_factory.mktemp("run") / "run"
    _mctlib(*_distill(store, out, *SMALL_RUN), check=True)
    return out


def _evaluate(synthetic: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--synthetic", str(synthetic), "--out", str(out), "--num-eval", "2", "--epochs", "3",
            "--no-progress", "--device", "cpu", *extra]


@pytest.mark.parametrize("where", ["pixel", "label", "alpha"])
def test_a_synthetic_set_with_one_flipped_bit_is_refused(run_dir, tmp_path, where):
    """Before: `evaluate` reported 18.67 % or 15.56 % instead of 15.11 %, exit 0. After: its checksum fails."""
    from safetensors import safe_open

    with safe_open(run_dir / "synthetic_best.safetensors", "pt") as f:
        start = 8 + int.from_bytes((run_dir / "synthetic_best.safetensors").read_bytes()[:8], "little")
        name = {"pixel": "images", "label": "labels", "alpha": "alpha"}[where]
        offsets = json.loads((run_dir / "synthetic_best.safetensors").read_bytes()[8:start])[name]["data_offsets"]
        assert f.get_tensor(name).numel() > 0
    data = bytearray((run_dir / "synthetic_best.safetensors").read_bytes())
    data[start + offsets[0]] ^= 1                                     # one bit of the first element
    bad = tmp_path / "synthetic_best.safetensors"
    bad.write_bytes(bytes(data))
    from mctlib.rundir import SyntheticSetError, read_synthetic

    with pytest.raises(SyntheticSetError, match="fails its checksum"):
        read_synthetic(bad)
    _only_error(_mctlib(*_evaluate(bad, tmp_path / "ev")), "evaluate", "fails its checksum", str(bad))
    assert not (tmp_path / "ev").exists()


def test_a_synthetic_set_must_hold_ipc_images_of_every_class(run_dir, tmp_path):
    """Written with a valid checksum but two images of class 0 and none of class 1 (what a buggy writer or a
    hand-made set could hold): refused, naming the counts per class."""
    from mctlib.rundir import SyntheticSetError, read_synthetic, save_synthetic

    good = read_synthetic(run_dir / "synthetic_final.safetensors")
    assert good.settings["ipc"] == 1 and good.labels.tolist() == list(range(10))
    labels = good.labels.clone()
    labels[1] = 0
    save_synthetic(tmp_path / "s.safetensors", good.images, labels, good.alpha, good.settings, good.info)
    with pytest.raises(SyntheticSetError, match=r"labels per class \[2, 0, 1, 1, 1, 1, 1, 1, 1, 1\]"):
        read_synthetic(tmp_path / "s.safetensors")


def test_a_synthetic_set_from_before_checksums_is_refused_with_how_to_recreate_it(run_dir, tmp_path):
    from safetensors.torch import save_file

    from mctlib.rundir import read_synthetic

    good = read_synthetic(run_dir / "synthetic_final.safetensors")
    old = tmp_path / "old.safetensors"
    save_file({"images": good.images, "labels": good.labels, "alpha": torch.tensor([good.alpha])}, old,
              metadata={"format": "mctlib-synthetic-v1", "info": "{}"})
    _only_error(_mctlib(*_evaluate(old, tmp_path / "ev")), "evaluate", "older mctlib", "distill it again")


def test_evaluate_uses_the_settings_inside_the_set_and_refuses_an_edited_config_json(run_dir, tmp_path):
    """Before: an edited activation in the config.json beside the set gave 10.22 % instead of 14.00 %, and a set
    copied without its config.json was evaluated on a default network of width 128. After: the network and
    data come from the checksummed set; a config.json that disagrees with it is refused."""
    _mctlib(*_evaluate(run_dir / "synthetic_best.safetensors", tmp_path / "beside"), check=True)
    alone = tmp_path / "copy"
    alone.mkdir()
    shutil.copy(run_dir / "synthetic_best.safetensors", alone)
    _mctlib(*_evaluate(alone / "synthetic_best.safetensors", tmp_path / "alone"), check=True)
    beside, copied = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("beside", "alone"))
    assert copied["config"]["net"]["width"] == 16 and copied["results"] == beside["results"]

    edited = tmp_path / "edited"
    shutil.copytree(run_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config["net"]["activation"] = "sigmoid"
    (edited / "config.json").write_text(json.dumps(config))
    _only_error(_mctlib(*_evaluate(edited / "synthetic_best.safetensors", tmp_path / "ev")), "evaluate",
                "net.activation: config.json 'sigmoid' vs synthetic set 'relu'")
    assert not (tmp_path / "ev").exists()


def test_evaluate_refuses_baseline_flags_beside_a_synthetic_set(run_dir, tmp_path):
    """Before: `--lr 0.5` was silently ignored (the set trains with its alpha)."""
    _only_error(_mctlib(*_evaluate(run_dir / "synthetic_best.safetensors", tmp_path / "ev", "--lr", "0.5")),
                "evaluate", "--lr is for the baselines")


def test_evaluate_stops_on_divergence_naming_the_lr_to_lower(tmp_path):
    """Before: `--baseline random_real --ipc 1 --lr 1e3` exited 0 with exactly 10.00 % (or a traceback)."""
    done = _mctlib("evaluate", "--baseline", "random_real", "--ipc", "1", "--lr", "1e3", "--out", str(tmp_path / "ev"),
                   "--num-eval", "2", "--epochs", "20", "--no-progress", "--device", "cpu", *DATA_FLAGS, *NET_FLAGS)
    _only_error(done, "evaluate", "evaluation diverged", "lower --lr, e.g. 100")
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_networks_whose_logits_overflow_are_refused_not_scored():
    """Weights so large that every logit is inf: each argmax is class 0, a chance-level score that looks like
    a result. check_outputs refuses them (hand-made case: the tiny ConvNet's weights times 1e30)."""
    from mctlib.evaluate import EvaluationDivergedError, check_outputs
    from mctlib.networks import FlatModel, build_network

    model = FlatModel(build_network(NET))
    images = load_dataset("digits", image_size=8).test_images[:16]
    check_outputs(model, model.flatten()[None], images, "convnet", 0.01)      # healthy: passes
    with pytest.raises(EvaluationDivergedError, match="logits on the test images overflow.*e.g. 100"):
        check_outputs(model, model.flatten()[None] * 1e30, images, "convnet", 1e3)


def _wait(test, proc: subprocess.Popen, limit: float = 120.0) -> None:
    end = time.time() + limit
    while not test():
        assert proc.poll() is None and time.time() < end, "the first writer ended before it could be raced"
        time.sleep(0.02)


def test_one_writer_per_run_folder_and_a_killed_writer_does_not_block(store, tmp_path):
    """Before: two distill runs into one --out, 0.5 s apart with seeds 0 and 1, both exited 0 and only the
    second's result was left; a --resume while the run was live also ran. After: the second writer and the
    live --resume stop at once with one line naming the folder and the first's PID; once the first is
    killed (SIGKILL: no cleanup), its lock file is left but blocks nothing."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "mctlib", *_distill(store, out, "--iterations", "100000",
                                                                       "--checkpoint-every", "1")],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / ".run.lock"
        _wait(lambda: (out / CHECKPOINT).exists(), first)
        assert lock.read_text().split()[0] == str(first.pid)
        for extra in (("--seed", "1"), ("--resume",)):
            _only_error(_mctlib(*_distill(store, out, "--iterations", "100000", *extra)), "distill",
                        str(out), f"process {first.pid}")
    finally:
        first.kill()
        first.wait()
    assert lock.exists()                        # SIGKILL: the file stays, the kernel dropped the lock
    _mctlib(*_distill(store, out, "--iterations", "1", "--resume"), check=True)
    assert not lock.exists() and (out / "synthetic_final.safetensors").exists()


def test_one_writer_per_store_folder(tmp_path):
    """Before: of two `experts` runs into one folder, the loser reported "corrupt or truncated"."""
    out = tmp_path / "experts"
    first = subprocess.Popen([sys.executable, "-m", "mctlib", *_experts(out, "--epochs", "200")], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: (tmp_path / ".experts.lock").exists() and (tmp_path / ".experts.lock").read_text(), first)
        _only_error(_mctlib(*_experts(out)), "experts", str(out), f"process {first.pid}")
    finally:
        first.kill()
        first.wait()
    _mctlib(*_experts(out), check=True)


@pytest.mark.parametrize("argv, words", [
    (["experts", "--lr", "1e300"], ["--lr 1e+300", "float32"]),
    (["experts", "--weight-decay", "1e300"], ["--weight-decay", "float32"]),
    (["evaluate", "--baseline", "full", "--lr", "1e300"], ["--lr 1e+300", "float32"]),
    (["evaluate", "--baseline", "full", "--weight-decay", "1e300"], ["--weight-decay", "float32"]),
    (["distill", "--eval-weight-decay", "1e300"], ["--eval-weight-decay", "float32"]),
    (["experts", "--data-image-size", "1000000000"], ["--data-image-size", "at most 1024"]),
    (["experts", "--lr", "1e4"], ["expert training diverged at epoch", "lower --lr (now 10000), e.g. 1000"]),
    (["distill", "--lr-teacher", "1e300"], ["--lr-teacher", "float32"]),
    (["distill", "--seed", "-1"], ["--seed -1"]),
    (["experts", "--seed", "-1"], ["--seed -1"]),
    (["experts", "--epochs", "2", "--record", "convex"], ["--num-waypoints", "set num_waypoints <= 3 or more epochs"]),
    (["distill", "--dist-timeout", "-1"], ["--dist-timeout", "'-1'"]),
    (["distill", "--dist-timeout", "nan"], ["--dist-timeout", "'nan'"]),
    (["experts", "--dist-backend", "foo"], ["--dist-backend", "'foo'"]),
    (["distill", "--eval-at", "99"], ["--eval-at", "<= iterations = 30"]),
    (["distill", "--precision", "tf32"], ["--precision tf32", "fp32"]),
    (["distill", "--out", "STORE"], ["is the store"]),
    (["distill", "--store", "RUN"], ["is a distillation run folder, not a trajectory store"]),
    (["distill", "--store", "FILE"], ["is a file, not a trajectory store"]),
    (["experts", "--out", "RUN"], ["holds a run, not a trajectory store"]),
    (["evaluate", "--baseline", "full", "--out", "RUN"], ["holds a run"]),
    (["distill", "--iterations", "99999999999999999999999"], ["--iterations", "64-bit"]),
    (["experts", "--num-experts", "99999999999999999999999"], ["--num-experts", "64-bit"]),
    (["experts", "--net-width", "100000"], ["parameters", "GiB", "--net-width"]),
    (["evaluate", "--baseline", "full", "--net-width", "1000000000"], ["cannot even be computed", "--net-width"]),
    (["distill", "--ipc", "1000"], ["IPC 1000 is impossible"]),      # found once the data is loaded: no folder left
], ids=lambda x: " ".join(x) if isinstance(x, list) and x[0] in ("experts", "distill", "evaluate") else "")
def test_a_bad_value_is_one_line_before_anything_is_created(store, run_dir, tmp_path, argv, words):
    """Before: tracebacks (float32 overflow, huge image sizes), words that named no flag or the wrong one, values
    accepted and then ignored or recorded wrongly, and an 18-line usage block above each message. After: one
    line naming the flag, with a pointer to --help for a bad value, and nothing on disk."""
    out = tmp_path / "out"
    where = {"STORE": str(store), "RUN": str(run_dir), "FILE": str(store / "manifest.json")}
    argv = [where.get(a, a) for a in argv]
    command, flags = argv[0], argv[1:]
    base = {"experts": _experts(out), "evaluate": ["evaluate", "--out", str(out), "--device", "cpu", "--no-progress",
                                                     *DATA_FLAGS, *NET_FLAGS],
            "distill": _distill(store, out)}[command]
    if "--out" in flags:
        base = [a for i, a in enumerate(base) if not (a == "--out" or i and base[i - 1] == "--out")]
    if "--store" in flags:
        base = [a for i, a in enumerate(base) if not (a == "--store" or i and base[i - 1] == "--store")]
    line = _only_error(_mctlib(*base, *flags), command, *words)
    assert "Traceback" not in line and not out.exists() and not list(tmp_path.glob(".*.lock"))


def test_experts_with_few_epochs_and_full_records_do_not_need_waypoints(tmp_path):
    """Before: `--epochs 1 --record full` failed on --num-waypoints, which does not apply to full records."""
    _mctlib(*_experts(tmp_path / "e", "--epochs", "1", "--num-experts", "1"), check=True)
    assert load_store(tmp_path / "e").records[0].epochs == 1


def test_two_identical_runs_write_identical_synthetic_sets_and_canonical_metadata(store, run_dir, tmp_path):
    """Before: equal tensors, different bytes (safetensors writes a metadata map in random key order)."""
    again = tmp_path / "again"
    _mctlib(*_distill(store, again, *SMALL_RUN), check=True)
    for name in ("synthetic_best.safetensors", "synthetic_final.safetensors"):
        assert (again / name).read_bytes() == (run_dir / name).read_bytes(), name
    data = (again / CHECKPOINT).read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = header["__metadata__"]
    assert list(meta) == ["mctlib"] and meta["mctlib"] == json.dumps(json.loads(meta["mctlib"]), sort_keys=True,
                                                                    separators=(",", ":"))


def test_the_alpha_notice_is_one_line_of_the_run_s_output(store, tmp_path):
    """Before: a two-line Python warning with its source line. alpha_0 = 1e-4 with lr_lr 1e-3 crosses zero."""
    done = _mctlib(*_distill(store, tmp_path / "run", "--iterations", "4", "--lr-teacher", "1e-4", "--lr-lr", "1e-3"),
                   check=True)
    notes = _lines(done)
    assert len(notes) == 1 and notes[0].startswith("mctlib distill: note: the learned lr alpha crossed zero"), notes
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["alpha_nonpositive_iterations"]


def test_torchrun_experts_equal_one_process_at_the_same_threads_per_process(tmp_path):
    """README/reproduce: 2 ranks give experts byte-identical to 1 process running with as many threads as
    each rank. Checked at 2 threads per process (the 1-thread case is in test_distributed.py)."""
    env = {**ENV, "MCTLIB_THREADS": "2", "OMP_NUM_THREADS": "2"}
    argv = _experts(tmp_path / "x", "--num-experts", "2", "--epochs", "2")
    argv = [a for i, a in enumerate(argv) if not (a == "--out" or i and argv[i - 1] == "--out")]
    one = subprocess.run([sys.executable, "-m", "mctlib", *argv, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mctlib", *argv, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    for name in ("expert_000.safetensors", "expert_001.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    threads = [json.loads((tmp_path / d / "manifest.json").read_text())["versions"]["cpu_threads"]
               for d in ("one", "two")]
    assert threads == [2, 2]


def test_running_out_of_memory_is_one_line_naming_the_sizes(tmp_path, monkeypatch):
    """Sizes that pass every check but do not fit (a wide network trained as a big ensemble, say) end in one
    line instead of the allocator's traceback. The allocator's own error is raised where training starts."""
    import mctlib.experts

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 36000000000 bytes. Error code 12")

    monkeypatch.setattr(mctlib.experts, "make_experts", no_memory)
    _only_error(_mctlib(*_experts(tmp_path / "e")), "experts", "out of memory (tried to allocate 36000000000 bytes)",
                "--net-width")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("content, words", [
    ("[]", "is not a run's config (it lacks compute, dataset"),
    ('{"net": 5}', "is not a run's config (it lacks compute, dataset, distill, eval, store)"),
    ("\xff", "is corrupt"),
])
def test_a_damaged_config_json_of_a_started_run_is_one_line(store, tmp_path, content, words):
    """A run stopped before its first checkpoint leaves config.json alone; damaged, it gave a traceback
    (a list) or a line of several hundred characters (every missing section printed whole)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(content, encoding="latin-1")
    line = _only_error(_mctlib(*_distill(store, out, "--resume")), "distill", words)
    assert len(line) < 300


def test_a_checkpoint_of_another_configuration_lists_a_few_differences_and_counts_the_rest(run_dir, store, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    done = _mctlib(*_distill(store, copy, *SMALL_RUN, "--resume", "--syn-steps", "3", "--ipc", "2", "--seed", "4",
                             "--momentum", "0.4", "--lr-teacher", "0.02", "--eval-epochs", "2"))
    line = _only_error(done, "distill", "distill.ipc: checkpoint 1 vs now 2", "and 2 more")
    assert len(line) < 400
