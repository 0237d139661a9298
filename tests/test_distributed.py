"""Several processes give the results of one (distributed.py), on CPU with gloo and 2 ranks.

Each multi-process check launches real ranks: torchrun for the worker script (tests/distributed_worker.py)
and for `mctlib experts`, or two `python -m mctlib` processes given the environment torchrun would give
them, where a test kills one rank on purpose (torchrun would stop the other itself).

Tolerance: 2 ranks sum each student gradient in two parts, so losses, alpha and images may differ from
one process in float32 rounding only; they are compared at rtol = atol = 1e-5 (the differences seen
are about 5e-7 on pixels of magnitude ~2). Expert files and evaluation accuracies are compared exactly.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mctlib.config import DistillConfig, ExpertConfig
from mctlib.distill import distill
from mctlib.distributed import DistributedError, Group, check_resume_world_size, setup, shard_bounds
from mctlib.evaluate import evaluate_synthetic
from mctlib.experts import make_experts

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import EVAL, MODES, SMALL, store_labels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)
TIMEOUT = 60  # --dist-timeout of the kill tests (gloo notices a dead peer's closed socket at once)
# A stalled rank is noticed only by the timeout, so a healthy rank must never fall this far behind the other:
# the ranks do the same work (each reads versions() before the start barrier), and they ran within a 3 s
# timeout on this 2-core machine under a load average of 5.5.
STALL = 5
pytestmark = pytest.mark.usefixtures("one_thread")


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MCTLIB_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _torchrun(*args, timeout=240, ranks=2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(args: list, world: int = 2) -> list[subprocess.Popen]:
    """`python -m mctlib ARGS` as `world` ranks, with the environment torchrun gives its workers."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "mctlib", *map(str, args)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=_env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, LOCAL_WORLD_SIZE=world,
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(world)]


def _wait_for(path_test, procs, limit=300.0) -> None:
    end = time.monotonic() + limit
    while not path_test():
        if time.monotonic() > end or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError("the run ended or stalled before the point at which a rank was to be killed: "
                                 + " | ".join(p.communicate()[1][-400:] for p in procs))
        time.sleep(0.02)


def _kill_rank_1_and_check_rank_0(procs, sig=signal.SIGKILL, timeout=TIMEOUT) -> str:
    """Rank 1 killed (its sockets close) or stopped (only the collective timeout can tell): rank 0 must
    stop within the timeout with one line."""
    procs[1].send_signal(sig)
    tick = time.monotonic()
    _, err = procs[0].communicate(timeout=timeout + 120)
    elapsed = time.monotonic() - tick
    procs[1].kill()
    procs[1].communicate()
    # The error comes at the timeout at the latest; the margin is for printing and leaving Python on a
    # machine whose cores other jobs share (a hang would run into communicate's limit above).
    assert elapsed < timeout + 30, f"rank 0 did not stop within the collective timeout ({elapsed:.1f} s)"
    assert procs[0].returncode == 1
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "lost contact with the other ranks" in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def data(digits8_all):
    return digits8_all


@pytest.fixture(scope="module")
def store(tiny_stores):
    """Full buffers of two 6-epoch experts of the tiny ConvNet (conftest's tiny_stores)."""
    return tiny_stores["mtt"]


@pytest.fixture(scope="module")
def two_ranks(store, tmp_path_factory):
    """Everything the worker computed on 2 ranks: {rank: saved}, and its output folder."""
    out = tmp_path_factory.mktemp("two_ranks")
    done = _torchrun("tests/distributed_worker.py", store.path, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r: torch.load(out / f"rank{r}.pt") for r in (0, 1)}, out


@pytest.mark.parametrize("mode", MODES)
def test_distillation_on_two_ranks_equals_one_process(data, store, two_ranks, mode):
    saved, _ = two_ranks
    one = distill(DistillConfig(gradient_mode=mode, **SMALL), store, data, progress=False)
    two = saved[0][mode]
    torch.testing.assert_close(two["losses"], [e["loss"] for e in one.log], **TOL)
    torch.testing.assert_close(two["alpha"], one.alpha, **TOL)
    torch.testing.assert_close(two["images"], one.images, **TOL)
    # The ranks hold the same S and alpha bit for bit: they apply the same summed gradient.
    assert torch.equal(saved[1][mode]["images"], two["images"]) and saved[1][mode]["alpha"] == two["alpha"]
    assert not torch.equal(two["images"], store_images_at_start(data))  # the run did move S


def store_images_at_start(data):
    from mctlib.distill import initial_synthetic

    return initial_synthetic(data, DistillConfig(**SMALL))[0]


def test_evaluation_on_two_ranks_gives_the_accuracies_of_one_process(data, store, two_ranks):
    saved, _ = two_ranks
    images = saved[0]["checkpointed"]["images"]
    one = evaluate_synthetic(images, store_labels({"images": images}), 0.01, data, store.net, EVAL)
    assert [e["accuracies"] for e in saved[0]["eval"]] == [r.accuracies for r in one]
    assert saved[1]["eval"] == saved[0]["eval"] and len(one[0].accuracies) == 3


def test_a_resumed_two_rank_run_equals_an_uninterrupted_one(two_ranks):
    saved, _ = two_ranks
    resumed, whole = saved[0]["resumed"], saved[0]["whole"]
    assert torch.equal(resumed["images"], whole["images"]) and resumed["alpha"] == whole["alpha"]
    assert [e["loss"] for e in resumed["log"]] == [e["loss"] for e in whole["log"]]


def test_resuming_with_another_number_of_processes_is_refused_with_the_command_to_use(data, store, two_ranks,
                                                                                      tmp_path):
    _, out = two_ranks
    cfg = DistillConfig(gradient_mode="checkpointed", **SMALL)
    with pytest.raises(DistributedError, match=r"2-process run and this is a 1-process run; resume it with 2 "
                                               r"process\(es\): torchrun --nproc_per_node=2"):
        distill(cfg, store, data, run_dir=out / "whole", resume=True, progress=False)
    distill(cfg.replace(iterations=1), store, data, run_dir=tmp_path / "one", progress=False)
    with pytest.raises(DistributedError, match=r"1-process run and this is a 3-process run; .*mctlib distill"):
        check_resume_world_size(tmp_path / "one", 3)


def test_the_shards_cover_the_synthetic_set_once_even_when_the_ranks_do_not_divide_it():
    for n in (1, 7, 10, 20, 33):
        for world in range(1, n + 1):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert {hi - lo for lo, hi in bounds} <= {n // world, -(-n // world)}


def test_three_ranks_on_twenty_images_shards_of_six_seven_and_seven_equal_one_process(data, store, tmp_path):
    done = _torchrun("tests/distributed_worker.py", store.path, tmp_path, "unrolled,checkpointed", ranks=3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [shard_bounds(20, r, 3) for r in range(3)] == [(0, 6), (6, 13), (13, 20)]
    for mode in ("unrolled", "checkpointed"):
        one = distill(DistillConfig(gradient_mode=mode, **SMALL), store, data, progress=False)
        three = [torch.load(tmp_path / f"rank{r}.pt")[mode] for r in range(3)]
        torch.testing.assert_close(three[0]["losses"], [e["loss"] for e in one.log], **TOL)
        torch.testing.assert_close(three[0]["images"], one.images, **TOL)
        assert all(torch.equal(t["images"], three[0]["images"]) for t in three)


def test_every_evaluation_network_of_every_architecture_trains_on_exactly_one_rank():
    for archs, num_eval, world in ((1, 3, 2), (3, 5, 2), (2, 3, 4), (2, 1, 3)):
        groups = [Group(r, world, r, world, torch.device("cpu"), "gloo", 5) for r in range(world)]
        shares = [g.members(archs, num_eval) for g in groups]
        for a in range(archs):
            assert sorted(i for share in shares for i in share[a]) == list(range(num_eval))
        counts = [sum(map(len, share)) for share in shares]
        assert max(counts) - min(counts) <= 1  # dealt out over all architectures together


def test_bench_speedups_are_ratios_of_the_rows():
    from benchmarks.distributed import _speedups, format_rows

    def row(processes, threads, seconds, peaks):
        return {"processes": processes, "threads_per_process": threads, "syn_steps": 20,
                "seconds_per_iteration_median": seconds, "peak_mb_per_rank": peaks}

    result = {"experts": [{"processes": 1, "experts_per_minute": 10.0}, {"processes": 2, "experts_per_minute": 18.0}],
              "distill": [row(1, 1, 3.0, [300.0]), row(1, 2, 2.4, [300.0]), row(2, 1, 2.0, [170.0, 171.0])]}
    result["speedups"] = _speedups(result, 20)
    assert result["speedups"] == pytest.approx({"experts_2_ranks_over_1_process": 1.8,
                                                "distill_2_ranks_over_1_process_1_thread": 1.5,
                                                "distill_2_ranks_over_1_process_2_threads": 1.2})
    assert "170, 171 MB" in format_rows(result)


def test_more_ranks_than_synthetic_images_are_refused_before_any_work(data, store):
    group = Group(rank=0, world_size=30, local_rank=0, local_world_size=30, device=torch.device("cpu"),
                  backend="gloo", timeout_s=5)
    with pytest.raises(DistributedError, match="30 ranks but the synthetic set has 20 images"):
        distill(DistillConfig(**SMALL), store, data, progress=False, group=group)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_nccl_without_a_gpu_is_one_line_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MCTLIB_THREADS", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(DistributedError, match="nccl needs a CUDA GPU"):
        setup("auto", "nccl")
    from mctlib.cli import main

    code = main(["experts", "--out", str(tmp_path / "s"), "--dist-backend", "nccl", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("mctlib experts: error: --dist-backend nccl needs")
    assert not (tmp_path / "s").exists()


def test_a_bad_collective_timeout_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MCTLIB_DIST_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="MCTLIB_DIST_TIMEOUT='soon' is not a number"):
        setup("cpu", "gloo")
    with pytest.raises(DistributedError, match="positive, finite"):
        setup("cpu", "gloo", -1.0)


EXPERT_ARGS = ["--dataset", "digits", "--data-image-size", "8", "--net-width", "16", "--net-depth", "2",
               "--num-experts", "4", "--epochs", "3", "--batch-size", "128", "--record", "full",
               "--ensemble-size", "1", "--no-progress", "--device", "cpu"]
EXPERTS = ExpertConfig(num_experts=4, epochs=3, batch_size=128, record="full")


def _same_store(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) == 5
    for name in files:
        if name != "manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):  # wall times are the only difference a store may have from another run of itself
        del m["stats"]["seconds"], m["stats"]["experts_per_minute"]
    assert ma == mb


@pytest.fixture(scope="module")
def one_process_store(data, store, tmp_path_factory):
    # Ensembles of one, as the 2-rank runs below: the manifest records the ensemble size.
    return make_experts(data, store.net, EXPERTS, tmp_path_factory.mktemp("experts") / "one", ensemble_size=1).path


def test_experts_on_two_ranks_are_byte_identical_to_one_process(one_process_store, tmp_path):
    done = _torchrun("-m", "mctlib", "experts", *EXPERT_ARGS, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    _same_store(one_process_store, tmp_path / "two")


def test_a_killed_expert_run_stops_the_other_rank_and_restarts_where_it_stopped(one_process_store, tmp_path):
    out = tmp_path / "two"
    args = ["experts", *EXPERT_ARGS, "--out", out, "--dist-timeout", TIMEOUT]
    procs = _ranks(args)
    _wait_for(lambda: any(out.glob(".experts-progress/expert_*.json")), procs)
    line = _kill_rank_1_and_check_rank_0(procs)
    assert line.startswith("mctlib experts: error: rank 0 of 2 lost contact")
    assert not (out / "manifest.json").exists()
    procs = _ranks(args)
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "kept" in errs[0] and "finished expert(s) of an interrupted run" in errs[0]
    _same_store(one_process_store, out)


def test_a_killed_distill_rank_stops_the_other_and_the_resumed_run_equals_an_uninterrupted_one(store, two_ranks,
                                                                                               tmp_path):
    saved, _ = two_ranks
    out = tmp_path / "run"
    flags = {"--method": "mtt", "--gradient-mode": "checkpointed", "--ipc": 2, "--syn-steps": 4,
             "--expert-epochs": 2, "--max-start-epoch": 3, "--lr-img": 100, "--lr-lr": 1e-5, "--batch-syn": 7,
             "--iterations": 8, "--eval-every": 0, "--checkpoint-every": 1}
    args = ["distill", "--store", store.path, "--out", out, "--dataset", "digits", "--data-image-size", 8,
            "--no-progress", "--device", "cpu", "--dist-timeout", TIMEOUT,
            *[str(x) for kv in flags.items() for x in kv]]
    procs = _ranks(args)
    _wait_for(lambda: (out / "checkpoint.safetensors").exists(), procs)
    line = _kill_rank_1_and_check_rank_0(procs)
    assert line.startswith("mctlib distill: error: rank 0 of 2 lost contact") and "--resume" in line
    procs = _ranks(args + ["--resume"])
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    from mctlib.distill import load_synthetic

    images, _, alpha = load_synthetic(out / "synthetic_final.safetensors")
    whole = saved[0]["whole"]  # the worker's uninterrupted 2-rank run of the same settings
    assert torch.equal(images, whole["images"]) and alpha == whole["alpha"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["loss"] for e in metrics["log"]] == [e["loss"] for e in whole["log"]]


def test_a_stalled_rank_makes_the_other_stop_at_the_collective_timeout(store, tmp_path):
    out = tmp_path / "run"
    args = ["distill", "--store", store.path, "--out", out, "--dataset", "digits", "--data-image-size", 8,
            "--no-progress", "--device", "cpu", "--dist-timeout", STALL, "--method", "mtt", "--ipc", 2, "--syn-steps", 4,
            "--expert-epochs", 2, "--max-start-epoch", 3, "--iterations", 400, "--eval-every", 0,
            "--checkpoint-every", 1]
    procs = _ranks(args)
    _wait_for(lambda: (out / "checkpoint.safetensors").exists(), procs)
    line = _kill_rank_1_and_check_rank_0(procs, signal.SIGSTOP, timeout=STALL)
    assert line.startswith("mctlib distill: error: rank 0 of 2 lost contact") and f"{STALL} s collective timeout" in line
    assert f"Timed out waiting {STALL * 1000}ms" in line  # gloo's own timeout fired, not a closed socket
