"""Chapter 4's library side: runs are loaded, resumed or refused rather than recomputed or
overwritten; MTT and MCT are compared from the same experts; the published commands are real."""

import ast
import json
import shlex
from pathlib import Path

import pytest
import torch

from mctlib import runs as runs_module
from mctlib.cli import make_parser
from mctlib.comparison import ABLATIONS, Comparison, Variant, ablation_variants, compare_methods, run_ablation, run_name, run_variants
from mctlib.cost import estimate_cost
from mctlib.published import IMPLEMENTED, PUBLISHED, command_argv, markdown_table, published_table
from mctlib.records import FULL, bytes_on_disk, convexified_store
from mctlib.runs import RunMismatchError, baseline_or_load, random_real_subsets, run_or_load
from mctlib.config import DistillConfig, EvalConfig, ExpertConfig, get_preset
from mctlib.distill import DivergenceError
from mctlib.experts import make_experts

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(ipc=1, syn_steps=3, expert_epochs=2.0, max_start_epoch=4.0, lr_img=100.0, lr_lr=1e-7,
             iterations=4, eval_every=2, checkpoint_every=2)
EVAL = EvalConfig(num_eval=1, epochs=3, batch_size=64)


@pytest.fixture(scope="module")
def store_full(digits8, tiny_net, tmp_path_factory):
    cfg = ExpertConfig(num_experts=2, epochs=6, lr=0.05, batch_size=64, dsa=False, record="full", seed=1)
    return make_experts(digits8, tiny_net, cfg, tmp_path_factory.mktemp("experts") / "experts-digits-full")


def test_run_or_load_computes_then_loads_without_recomputing(digits8, store_full, tmp_path, monkeypatch):
    cfg = DistillConfig(method="mtt", **SMALL)
    first = run_or_load("run", cfg, store_full, digits8, EVAL, tmp_path)
    assert first.status == "computed" and len(first.log) == 4 and [e["iteration"] for e in first.evals] == [0, 2, 4]

    def no_compute(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(runs_module, "distill", no_compute)
    again = run_or_load("run", cfg, store_full, digits8, EVAL, tmp_path)
    assert again.status == "loaded"
    assert torch.equal(again.images, first.images) and again.alpha == first.alpha
    assert again.log == first.log and again.best == first.best and again.final == first.final


def test_run_or_load_refuses_another_configuration_and_keeps_the_run(digits8, store_full, tmp_path):
    cfg = DistillConfig(method="mtt", **{**SMALL, "eval_every": 0})
    run_or_load("run", cfg, store_full, digits8, None, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(RunMismatchError, match=r"distill\.lr_img: on disk 100\.0 vs requested 50\.0"):
        run_or_load("run", cfg.replace(lr_img=50.0), store_full, digits8, None, tmp_path)
    with pytest.raises(RunMismatchError, match=r"eval: on disk None vs requested"):
        run_or_load("run", cfg, store_full, digits8, EVAL, tmp_path)
    with pytest.raises(RunMismatchError, match="more than the 2 requested"):
        run_or_load("run", cfg.replace(iterations=2), store_full, digits8, None, tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_run_or_load_resumes_a_partial_run_to_the_uninterrupted_result(digits8, store_full, tmp_path):
    cfg = DistillConfig(method="mct", **SMALL)
    convex = convexified_store(store_full)
    partial = run_or_load("run", cfg, convex, digits8, EVAL, tmp_path)
    assert partial.status == "computed" and len(partial.log) == 4
    resumed = run_or_load("run", cfg.replace(iterations=6), convex, digits8, EVAL, tmp_path)
    assert resumed.status == "resumed" and [e["iteration"] for e in resumed.log] == list(range(1, 7))
    straight = run_or_load("straight", cfg.replace(iterations=6), convex, digits8, EVAL, tmp_path)
    assert torch.equal(resumed.images, straight.images) and resumed.alpha == straight.alpha
    assert [e["iteration"] for e in resumed.evals] == [0, 2, 4, 6] and resumed.evals == straight.evals
    assert run_or_load("run", cfg.replace(iterations=6), convex, digits8, EVAL, tmp_path).status == "loaded"


def test_run_or_load_resumes_a_run_killed_between_checkpoints(digits8, store_full, tmp_path, monkeypatch):
    import mctlib.distill as engine

    cfg = DistillConfig(method="mtt", **{**SMALL, "iterations": 6})
    real, calls = engine.evaluate_synthetic, []

    def dies_at_the_last_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # evaluations at 0, 2, 4, 6: killed at 6, after the checkpoint of 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate_synthetic", dies_at_the_last_evaluation)
    with pytest.raises(KeyboardInterrupt):
        run_or_load("run", cfg, store_full, digits8, EVAL, tmp_path)
    monkeypatch.setattr(engine, "evaluate_synthetic", real)
    assert not (tmp_path / "run" / "synthetic_final.safetensors").exists()
    resumed = run_or_load("run", cfg, store_full, digits8, EVAL, tmp_path)
    straight = run_or_load("straight", cfg, store_full, digits8, EVAL, tmp_path)
    assert resumed.status == "resumed" and torch.equal(resumed.images, straight.images)
    assert [e["iteration"] for e in resumed.log] == list(range(1, 7)) and resumed.alpha == straight.alpha
    assert [e["iteration"] for e in resumed.evals] == [0, 2, 4, 6] and resumed.evals == straight.evals


def test_a_diverged_run_is_remembered_not_recomputed(digits8, store_full, tmp_path, monkeypatch):
    cfg = DistillConfig(method="mtt", **{**SMALL, "eval_every": 0, "lr_lr": 1e4})
    rows = run_variants([Variant("MTT", cfg, FULL)], [0], digits8, store_full, None, tmp_path).rows
    assert rows[0]["status"] == "diverged" and "diverged at iteration" in rows[0]["error"]
    monkeypatch.setattr(runs_module, "distill", lambda *a, **k: pytest.fail("recomputed a diverged run"))
    with pytest.raises(DivergenceError):
        run_or_load(run_name(cfg.replace(seed=0), FULL, store_full, None), cfg.replace(seed=0), store_full,
                      digits8, None, tmp_path)


def test_compare_methods_runs_both_methods_from_the_same_experts(digits8, store_full, tmp_path):
    configs = [DistillConfig(method="mtt", **SMALL), DistillConfig(method="mct", **SMALL)]
    table = compare_methods(digits8, configs, [0, 1], store_full, None, EVAL, tmp_path)
    assert [(r["label"], r["seed"]) for r in table.rows] == [("MTT", 0), ("MTT", 1), ("MCT", 0), ("MCT", 1)]
    assert {r["record"] for r in table.select("MTT")} == {"full buffer"}
    assert {r["sampling"] for r in table.select("MCT")} == {"continuous"}
    for r in table.rows:
        assert r["status"] == "computed" and 0 <= r["best_acc"] <= 1 and r["final_acc"] <= r["best_acc"]
        assert len(r["loss_curve"]) == 4 and r["seconds_per_iteration"] > 0
    convex = convexified_store(store_full)
    assert convex.manifest["converted_from"] == str(store_full.path)
    assert [e["init_seed"] for e in convex.manifest["experts"]] == [e["init_seed"] for e in store_full.manifest["experts"]]
    summary = {s["label"]: s for s in table.summary()}
    assert summary["MCT"]["seeds"] == 2 and summary["MTT"]["best_acc_std"] >= 0
    assert table.curves("MCT")["iterations"] == [0, 2, 4]
    again = compare_methods(digits8, configs, [0, 1], store_full, convex, EVAL, tmp_path)
    assert {r["status"] for r in again.rows} == {"loaded"}
    assert "MCT" in again.format()
    # The full buffer takes (E+1)/K times the bytes of the convexified record, less the beta table.
    assert bytes_on_disk(store_full) > 1.4 * bytes_on_disk(convex)


def test_ablations_vary_one_choice_and_share_the_base_run(digits8, store_full, tmp_path):
    base = DistillConfig(method="mct", **{**SMALL, "iterations": 2, "eval_every": 0})
    specs = {kind: ablation_variants(kind, base) for kind in ABLATIONS}
    assert [v.label for v in specs["sampling"]] == ["continuous", "integer"]
    assert [v.record.beta_schedule for v in specs["beta_schedule"]] == ["arc_length", "uniform", "projected"]
    assert [v.record.num_waypoints for v in specs["num_waypoints"]] == [4, 2]
    assert [v.distill.gradient_mode for v in specs["gradient_mode"]] == ["unrolled", "constant_memory", "checkpointed"]
    first = run_ablation("num_waypoints", base, [0], digits8, store_full, None, tmp_path)
    second = run_ablation("gradient_mode", base, [0], digits8, store_full, None, tmp_path)
    assert [r["status"] for r in first.rows] == ["computed", "computed"]
    assert [r["status"] for r in second.rows] == ["loaded", "computed", "computed"]
    with pytest.raises(ValueError, match="method 'mtt'"):
        ablation_variants("sampling", base.replace(method="mtt"))


def test_baselines_are_cached(digits8, tiny_net, tmp_path, monkeypatch):
    first = baseline_or_load("random_real", digits8, tiny_net, EVAL, tmp_path, ipc=1)
    monkeypatch.setattr(runs_module, "random_real_baseline", lambda *a, **k: pytest.fail("recomputed a baseline"))
    assert baseline_or_load("random_real", digits8, tiny_net, EVAL, tmp_path, ipc=1)[0].accuracies == \
        first[0].accuracies


def _notebook_parameters() -> set[str]:
    nb = json.loads((ROOT / "notebooks" / "04_experiments.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {node.target.id for node in tree.body if isinstance(node, ast.AnnAssign)}


def test_published_table_commands_are_real():
    rows = published_table()
    assert len(rows) == len(PUBLISHED) and {r["method"] for r in rows} >= {"mtt", "mct", "full"}
    mct_c10 = next(r for r in rows if (r["method"], r["dataset"], r["ipc"]) == ("mct", "cifar10", 1))
    assert mct_c10["accuracy"] == 48.48 and mct_c10["preset"] == "mct-cifar10-ipc1" and not mct_c10["approximate"]
    assert any(" convexify " in c for c in mct_c10["cli"])
    assert all(r["approximate"] for r in rows if r["method"] == "mct" and r["dataset"] != "cifar10")
    parser = make_parser()
    notebook_params = _notebook_parameters()
    for r in rows:
        if r["method"] not in IMPLEMENTED:
            assert not r["cli"] and r["papermill"] is None
            continue
        for command in r["cli"]:
            args = parser.parse_args(command_argv(command))
            if getattr(args, "preset", None):
                get_preset(args.preset)
        words = shlex.split(r["papermill"])
        assert words[:2] == ["papermill", "notebooks/04_experiments.ipynb"]
        names = [words[i + 1] for i, w in enumerate(words) if w == "-p"]
        assert names and set(names) <= notebook_params, set(names) - notebook_params
    assert "| MCT | cifar10 | 1 | 48.48 ± 0.23 |" in markdown_table(rows)


def test_cost_estimate_scales_with_the_student_steps():
    preset = get_preset("mtt-digits-ipc1")
    short = estimate_cost(preset)
    long = estimate_cost(preset.__class__(**{**vars(preset), "distill": preset.distill.replace(syn_steps=40)}))
    assert short["flops_per_iteration"] > 0 and short["gpu_bytes"] > short["activation_bytes"] > 0
    assert long["flops_per_iteration"] == pytest.approx(2 * short["flops_per_iteration"], rel=0.05)
    assert long["activation_bytes"] == pytest.approx(2 * short["activation_bytes"], rel=0.1)


def test_parallel_runs_equal_runs_in_this_process(digits8, store_full, tmp_path):
    # Both computed on one thread (the module runs single-threaded; workers set one thread each): the
    # same seed gives the same bits whichever process computes it.
    cfg = DistillConfig(method="mtt", **SMALL)
    serial = compare_methods(digits8, [cfg], [0, 1], store_full, None, EVAL, tmp_path / "serial")
    parallel = compare_methods(digits8, [cfg], [0, 1], store_full, None, EVAL, tmp_path / "parallel", workers=2)
    for seed in (0, 1):
        a, b = serial.runs[("MTT", seed)], parallel.runs[("MTT", seed)]
        assert a.status == "computed" and b.status == "loaded"  # computed by a worker, loaded here
        assert torch.equal(a.images, b.images) and a.alpha == b.alpha
        assert [e["loss"] for e in a.log] == [e["loss"] for e in b.log] and a.evals == b.evals


def test_eval_at_adds_evaluations_to_eval_every():
    cfg = DistillConfig(method="mtt", **{**SMALL, "iterations": 6, "eval_every": 6, "eval_at": [1, 4]})
    assert cfg.eval_at == (1, 4) and DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="eval_at"):
        DistillConfig(method="mtt", **{**SMALL, "eval_at": [0]})


def test_eval_at_evaluates_at_those_iterations(digits8, store_full, tmp_path):
    cfg = DistillConfig(method="mtt", **{**SMALL, "iterations": 5, "eval_every": 5, "eval_at": [1, 3]})
    result = run_or_load("run", cfg, store_full, digits8, EVAL, tmp_path)
    assert [e["iteration"] for e in result.evals] == [0, 1, 3, 5]


def test_paired_difference_by_seed_hand_computed():
    rows = [{"label": "MTT", "seed": s, "status": "computed", "final_acc": a} for s, a in ((0, 0.80), (1, 0.90), (2, 0.70))]
    rows += [{"label": "MCT", "seed": s, "status": "computed", "final_acc": a} for s, a in ((0, 0.85), (1, 0.90), (2, 0.80))]
    rows += [{"label": "MCT", "seed": 3, "status": "computed", "final_acc": 0.1}]  # unpaired: left out
    paired = Comparison(rows).paired("MTT", "MCT")
    assert paired["seeds"] == [0, 1, 2] and paired["differences"] == pytest.approx([0.05, 0.0, 0.10])
    assert paired["mean"] == pytest.approx(0.05)
    assert paired["std"] == pytest.approx(0.05)  # sqrt((0 + 0.0025 + 0.0025) / 2)
    assert paired["sem"] == pytest.approx(0.05 / 3 ** 0.5)


def test_random_real_subsets_are_different_draws_each_cached(digits8, tiny_net, tmp_path, monkeypatch):
    results = random_real_subsets(digits8, 1, tiny_net, EVAL, 3, tmp_path, workers=1)
    assert len(results) == 3 and len({tuple(r.accuracies) for r in results}) > 1
    assert len(list((tmp_path / "baselines").glob("*.json"))) == 3

    def no_compute(*args, **kwargs):
        raise AssertionError("a cached baseline was recomputed")

    monkeypatch.setattr(runs_module, "random_real_baseline", no_compute)
    again = random_real_subsets(digits8, 1, tiny_net, EVAL, 3, tmp_path, workers=2)
    assert [r.accuracies for r in again] == [r.accuracies for r in results]


def test_per_seed_at_an_iteration_skips_missing_evaluations_and_words_the_difference():
    rows = [{"label": "MTT", "seed": 0, "status": "computed", "eval_curve": [(0, 0.5), (10, 0.6)]},
            {"label": "MTT", "seed": 1, "status": "computed", "eval_curve": [(0, 0.5)]},  # skipped at 10
            {"label": "MCT", "seed": 0, "status": "computed", "eval_curve": [(0, 0.5), (10, 0.7)]},
            {"label": "MCT", "seed": 1, "status": "computed", "eval_curve": [(0, 0.5), (10, 0.8)]}]
    table = Comparison(rows)
    assert table.per_seed("MTT", iteration=10) == {0: 0.6}
    assert table.paired("MTT", "MCT", iteration=10)["differences"] == pytest.approx([0.1])
    curves = table.curves("MCT")
    assert curves["iterations"] == [0, 10] and curves["acc_mean"] == pytest.approx([0.5, 0.75])
    assert table.curves("MTT")["counts"] == [2, 1]
