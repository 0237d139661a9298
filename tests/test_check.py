"""`python -m mctlib check`: its CPU form runs here in full (checks and timings at digits size), so the
command the GPU half relies on (`make check-gpu`) cannot rot; a check that fails is reported as failed."""

import json

import pytest
import torch

from mctlib import check
from mctlib.check import checks


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("check") / "check.json"
    threads = torch.get_num_threads()
    try:
        code = check.main(["--device", "cpu", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the check configures this process; leave it as it was
    return code, json.loads(out.read_text())


def test_every_cpu_check_passes(cpu_check):
    code, result = cpu_check
    failed = [f"{c['check']}: {c['detail']}" for c in result["checks"] if not c["passed"]]
    assert not failed and result["passed"] and code == 0
    names = {c["check"] for c in result["checks"]}
    assert names == {*(f"modes_vs_float64[{m}]" for m in checks.MODES), "checkpointed_equals_unrolled",
                     "ensemble_equals_sequential", "precision_vs_fp32[tf32]", "precision_vs_fp32[bf16]",
                     "no_host_sync", "bit_reproducible", "resume_equals_uninterrupted", "deterministic_kernels"}


def test_the_json_records_device_precision_and_timings(cpu_check):
    _, result = cpu_check
    assert result["format"] == check.FORMAT and result["device_name"] == "cpu" and result["precision"] == "fp32"
    assert result["versions"]["gpu"] is None
    t = result["timings"]
    impls = {(r["impl"], r["mode"]) for r in t["match"]["rows"]}
    assert impls == {("engine", m) for m in checks.MODES} | {("original loop", "unrolled")}
    assert all(r["seconds"]["median"] > 0 for r in t["match"]["rows"])
    assert t["eval"]["nets"] == 5 and t["eval"]["speedup"] > 0 and t["experts_per_minute"]["value"] > 0


def test_a_check_outside_its_tolerance_fails(monkeypatch):
    # The same comparison with a tolerance no float32 run can meet: it must be reported as failed.
    monkeypatch.setitem(checks.TOLERANCES, "fp32", {**checks.TOLERANCES["fp32"], "grad_rel": 0.0})
    results = checks.check_modes_vs_float64("cpu", "fp32", checks.SIZES)
    assert [r["passed"] for r in results] == [False, False, False]
    assert all(0 < r["grad_rel"] < 1e-4 for r in results)  # float32 rounding, not a wrong gradient


def test_a_failed_check_exits_1_and_still_writes_its_json(monkeypatch, tmp_path, capsys):
    failed = {"format": check.FORMAT, "device": "cpu", "device_name": "cpu", "precision": "fp32", "seconds": 1.0,
              "passed": False, "checks": [{"check": "bit_reproducible", "passed": False, "detail": "differ"}]}
    monkeypatch.setattr(check, "run_check", lambda *a, **k: failed)
    assert check.main(["--device", "cpu", "--out", str(tmp_path / "c.json")]) == 1
    assert json.loads((tmp_path / "c.json").read_text())["passed"] is False
    assert "FAIL  bit_reproducible" in capsys.readouterr().out


def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert check.main(["--device", "cuda"]) == 2
    assert "mctlib check: error: device 'cuda' was requested" in capsys.readouterr().err


def test_value_reads_are_recorded_with_their_values():
    # What the CPU form of no_host_sync counts: every read of a tensor's value into Python.
    t = torch.tensor([1.5, -2.0])
    with checks.ValueReads() as reads:
        t[0].item()
        float(t[1])
        bool(t[0] > 0)
        t.sum()  # stays a tensor: no read
    assert reads.values == [1.5, -2.0, 1.0]
