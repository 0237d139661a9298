"""Real runs killed with SIGKILL at several points, and the outcome of the user's next command.

Each run is a separate `python -m mctlib` process on 8x8 digits with a tiny ConvNet. A kill at an
exact point (half-way through writing a checkpoint's bytes, after an expert trained) comes from
`KILLER` below: it wraps one mctlib function so that the process sends itself SIGKILL there; the
files on disk are then whatever the real code had written when the kernel stopped it.
"""

import os
import shlex
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
