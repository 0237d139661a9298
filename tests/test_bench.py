"""The bench (benchmarks/, `make bench`): a smoke test of `--quick` (the JSON's structure, numbers positive)
and the helpers.

No speed target lives here: timings on a shared CPU are noise at this size. The figures themselves
come from a full run (`python -m benchmarks`) and are discussed in book/performance.md.
"""

import json

import pytest
import torch

from benchmarks.child import child_env
from benchmarks.cli import main as bench_main
from benchmarks.common import FORMAT, MODES, QUICK, TARGET_MTT_UNROLLED_SECONDS
from benchmarks.evaluation import compute_floor
from benchmarks.memory import memory_checks
from mctlib.check.timings import METHODS, stats
from mctlib.device import configure_threads

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    out, md, figures = folder / "bench.json", folder / "bench.md", folder / "figures"
    threads = torch.get_num_threads()
    try:
        code = bench_main(["--quick", "--out", str(out), "--markdown", str(md), "--figures", str(figures)])
    finally:
        torch.set_num_threads(threads)  # the bench configures this process; leave it as it was
    assert code == 0
    return json.loads(out.read_text()), out, md, figures


def _positive_stats(s):
    return s["n"] >= 1 and s["median"] > 0 and s["q1"] <= s["median"] <= s["q3"]


def test_quick_json_has_every_section(quick):
    result = quick[0]
    assert result["format"] == FORMAT and result["quick"] is True
    for key in ("experts", "distill", "memory", "eval", "pool", "reference", "threads", "precision", "gpu", "changes",
                "machine"):
        assert key in result, key
    m = result["machine"]
    assert m["cpu_cores"] >= 1 and m["cpu_model"]
    assert result["settings"]["threads"] >= 1


def test_distill_rows_cover_methods_and_modes_with_positive_numbers(quick):
    rows = quick[0]["distill"]["rows"]
    assert {(r["method"], r["mode"]) for r in rows} == {(m, g) for m in METHODS for g in MODES}
    for r in rows:
        assert "error" not in r, r.get("error")
        assert _positive_stats(r["iteration_seconds"]) and r["final_loss"] > 0
        assert r["cpu_seconds_per_iteration"] > 0 and r["peak_mb"] > 0
        assert r["config"]["sampling"] == ("integer" if r["method"] == "mtt" else "continuous")
        assert r["config"]["record"] == ("full" if r["method"] == "mtt" else "convex")
    target = quick[0]["distill"]["target"]
    assert target["target_s"] == TARGET_MTT_UNROLLED_SECONDS and target["comparable"] is False


def test_memory_rows_and_checks(quick):
    mem = quick[0]["memory"]
    assert mem["syn_steps"] == list(QUICK.memory_steps)
    assert len(mem["rows"]) == len(MODES) * len(mem["syn_steps"])
    assert all(r["peak_mb"] > 0 for r in mem["rows"])
    checks = mem["checks"]
    assert set(MODES) <= set(checks) and checks["checkpointed"]["num_params"] > 0


def test_eval_ensemble_and_sequential_agree(quick):
    ev = quick[0]["eval"]
    variants = ev["variants"]
    assert set(variants) == {"ensemble", "sequential", "ensemble_vmap", "ensemble_torch_pool"}
    for v in variants.values():
        assert _positive_stats(v["seconds"]) and len(v["accuracies"]) == ev["num_eval"]
        assert all(0.0 <= a <= 1.0 for a in v["accuracies"])
    # The CPU ensemble (one graph, networks in a loop) computes exactly what separate runs compute.
    assert variants["ensemble"]["max_param_diff_vs_sequential"] <= 1e-6
    assert variants["ensemble_vmap"]["max_param_diff_vs_sequential"] <= 1e-3
    assert variants["ensemble"]["speedup_vs_sequential"] > 0
    # torch's pooling differs from AvgPool2x2 in rounding only
    assert variants["ensemble_torch_pool"]["max_param_diff_vs_sequential"] <= 1e-3
    floor = ev["compute_floor"]
    assert floor["flops"] == floor["flops_per_network_step"] * ev["num_eval"] * ev["epochs"]  # one batch per epoch
    assert floor["floor_seconds"] > 0 and floor["max_speedup_vs_sequential"] > 0


def test_compute_floor_counts_the_convnet_flops_by_hand():
    """The FLOP count behind the floor, against the ConvNet's convolutions and linear layer by hand."""
    from mctlib.data import load_dataset, real_images_per_class
    from mctlib.networks import FlatModel, NetConfig, build_network
    from mctlib.training import SGDRecipe

    net = NetConfig(channels=1, image_size=8, width=4, depth=2)
    model = FlatModel(build_network(net, seed=0))
    ds = load_dataset("digits", image_size=8)
    images, labels = real_images_per_class(ds.train_images, ds.train_labels, 10, 2, torch.Generator().manual_seed(0))
    n = images.shape[0]
    conv1, conv2 = n * 8 * 8 * 4 * 1 * 9 * 2, n * 4 * 4 * 4 * 4 * 9 * 2  # output pixels x out x in x 3x3 x 2
    pool1, pool2 = n * 4 * 4 * 8 * 4 * 2, n * 4 * 2 * 4 * 2 * 2  # the pooling matmuls: rows x W x W/2 x 2
    linear = n * 16 * 10 * 2
    # backward: weight gradients of every layer, input gradients of all but the first convolution
    expected = (conv1 + conv2 + pool1 + pool2 + linear) + (conv1 + conv2 + linear) + (conv2 + pool1 + pool2 + linear)
    f = compute_floor(model, model.flatten()[None], images, labels, SGDRecipe(lr=0.01, epochs=3), [0],
                             None, sequential_seconds=1.0)
    assert f["flops_per_network_step"] == expected and f["flops"] == 3 * expected
    # several minibatches per epoch: the same total arithmetic per epoch, split over the steps
    f2 = compute_floor(model, model.flatten()[None].repeat(2, 1), images, labels,
                              SGDRecipe(lr=0.01, epochs=3, batch_size=5), [0, 1], None, sequential_seconds=1.0)
    assert f2["steps_per_epoch"] == 4 and f2["flops"] == 2 * 3 * expected
    assert f2["flops_per_network_step"] == expected / 4


def test_experts_bytes_per_record_kind(quick):
    x = quick[0]["experts"]
    b = x["bytes_per_expert"]
    assert set(b) == {"full", "convex_k4", "convex_k2", "convex_k2_seed"}
    assert 0 < b["convex_k2_seed"] < b["convex_k2"] < b["full"]
    assert x["experts_per_minute"] > 0


def test_gpu_rows_say_when_nothing_was_measured(quick):
    gpu = quick[0]["gpu"]
    # One row per distinct student shape and mode: MTT and MCT share theirs at IPC 10 and 50 (same
    # syn_steps, batch_syn), so those are timed once and labelled "mtt+mct".
    from mctlib.config import get_preset

    shapes = {(ipc, get_preset(f"{m}-cifar10-ipc{ipc}").distill.syn_steps) for m in METHODS for ipc in (1, 10, 50)}
    keys = [(r["ipc"], r["syn_steps"], r["mode"]) for r in gpu["rows"]]
    assert len(keys) == len(set(keys)) == len(shapes) * len(MODES)
    assert {r["method"] for r in gpu["rows"] if r["ipc"] in (10, 50)} == {"mtt+mct"}
    if not torch.cuda.is_available():
        assert gpu["status"] == "no CUDA device"
        assert all(r["status"] == "no CUDA device" for r in gpu["rows"])
    else:
        assert all("match_seconds" in r or "error" in r for r in gpu["rows"])


def test_precision_rows(quick):
    rows = {(r["precision"], r["channels_last"]): r for r in quick[0]["precision"]["rows"]}
    same = rows[("fp32", True)]  # channels-last is a memory layout: the same numbers up to rounding
    assert same["loss_rel_diff"] < 1e-5 and same["image_grad_cosine"] > 0.9999
    bf16 = rows[("bf16", False)]
    assert bf16["loss_rel_diff"] >= 0 and -1 <= bf16["image_grad_cosine"] <= 1


def test_threads_and_changes(quick):
    result = quick[0]
    labels = [r["label"] for r in result["threads"]["rows"]]
    assert labels == ["1 thread", "1 thread, allocator untuned"]
    changes = {c["change"] for c in result["changes"]}
    assert any(c.startswith("allocator tuning") for c in changes)
    assert any(c.startswith("CPU ensemble as a loop") for c in changes)
    assert all(c["before"] > 0 and c["after"] > 0 for c in result["changes"])


def test_table_markdown_figures_and_replot(quick, tmp_path, capsys):
    result, out, md, figures = quick
    text = md.read_text()
    assert "| method | gradient mode |" in text
    assert "no CUDA device" in text or torch.cuda.is_available()
    names = sorted(p.name for p in figures.glob("*.png"))
    assert names == ["bench_before_after.png", "bench_memory_vs_syn_steps.png", "bench_seconds_per_iteration.png",
                     "bench_threads.png"]
    assert bench_main(["--replot", str(out), "--figures", str(tmp_path)]) == 0
    assert "Distillation, digits bench config" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.png"))) == 4


# --- helpers (fast) ------------------------------------------------------------------------------

def test_stats_median_quartiles():
    s = stats([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["n"], s["median"], s["q1"], s["q3"], s["iqr"], s["min"], s["max"]) == (5, 3.0, 2.0, 4.0, 2.0, 1.0, 5.0)
    assert stats([2.0])["iqr"] == 0.0 and stats([]) == {"n": 0}


def test_memory_checks_flag_flat_and_growing():
    rows = [{"mode": m, "syn_steps": n, "peak_mb": p} for m, n, p in [
        ("constant_memory", 10, 100.0), ("constant_memory", 80, 105.0),
        ("unrolled", 10, 500.0), ("unrolled", 80, 4000.0),
        ("checkpointed", 10, 120.0), ("checkpointed", 80, 150.0)]]
    checks = memory_checks(rows, (10, 80), {"full": "/nonexistent"})
    assert checks["constant_memory"]["flat"] and checks["unrolled"]["grows"]
    assert checks["unrolled"]["ratio"] == pytest.approx(8.0)


def test_unknown_section_and_bad_iterations_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_main(["--sections", "distill,warp"])
    assert "warp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["--iterations", "0"])


def test_configure_threads_sets_and_validates():
    before = torch.get_num_threads()
    try:
        info = configure_threads(1, tune_allocator=False)
        assert info["threads"] == 1 == torch.get_num_threads() and info["allocator_tuned"] is False
        assert configure_threads(None)["threads"] >= 1
        with pytest.raises(ValueError, match="threads"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_child_env_sets_and_unsets(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "OMP_WAIT_POLICY" not in child_env({"env": {"OMP_WAIT_POLICY": None}})
    assert child_env({"env": {"OMP_WAIT_POLICY": "ACTIVE"}})["OMP_WAIT_POLICY"] == "ACTIVE"
    assert child_env({})["OMP_WAIT_POLICY"] == "PASSIVE"  # inherited when the spec says nothing


def test_reference_rows_pair_the_original_loop_with_the_engine(quick):
    ref = quick[0]["reference"]
    assert ref["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    for row in ref["rows"]:
        assert "error" not in row, row.get("error")
        assert row["impl"] in ("reference", "engine") and _positive_stats(row["match_seconds"])
    # every setting the original could run under has both implementations, and a speed-up
    assert ref["speedups"] and all(x["speedup"] > 0 for x in ref["speedups"])
    assert {x["setting"] for x in ref["speedups"]} == {r["setting"] for r in ref["rows"] if r["impl"] == "reference"}


def test_pool_section_times_both_poolings(quick):
    pool = quick[0]["pool"]
    assert set(pool["variants"]) == {"torch_avg_pool2d", "AvgPool2x2"}
    assert all(_positive_stats(v["seconds"]) for v in pool["variants"].values())
    assert pool["image_grad_rel_err"] < 0.1  # rounding only (amplified by the unroll)
