"""Chapter 4's comparison: what a run's row reports (its own start, its final evaluation and nothing in its
place), the paired gains, the lr_lr rule, and the learned-alpha control against an independent evaluation."""

import math

import pytest
import torch

from mctlib.comparison import (Comparison, Variant, _row, compare_methods, diverged, learned_alpha_controls,
                               lr_lr_rule, sampling_spread)
from mctlib.config import DistillConfig, EvalConfig, ExpertConfig
from mctlib.distill import distill, initial_synthetic
from mctlib.evaluate import evaluate_synthetic
from mctlib.experts import make_experts
from mctlib.records import FULL
from mctlib.runs import RunResult

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(ipc=1, syn_steps=3, expert_epochs=2.0, max_start_epoch=4.0, lr_img=100.0, lr_lr=1e-7,
             iterations=4, eval_every=4, checkpoint_every=4)
EVAL = EvalConfig(num_eval=1, epochs=3, batch_size=64)


def _result(evals, alphas=(0.01, 0.01, 0.01, 0.01), losses=(1.0, 0.9, 0.8, 0.7)):
    log = [{"iteration": i + 1, "loss": loss, "alpha": a, "seconds": 0.1} for i, (loss, a) in
           enumerate(zip(losses, alphas))]
    return RunResult(torch.zeros(1), torch.zeros(1), alphas[-1], log, evals, None, None, {}, name="r", status="loaded")


def _ok(it, acc):
    return {"iteration": it, "mean": acc, "std": 0.0, "accuracies": [acc]}


VARIANT = Variant("MCT", DistillConfig(method="mct", **SMALL), FULL)


def test_final_is_the_last_iteration_and_never_an_earlier_one():
    skipped = {"iteration": 4, "skipped": "alpha = -0.001 <= 0 at this iteration"}
    row = _row(VARIANT, 0, _result([_ok(0, 0.5), _ok(2, 0.7), skipped], alphas=(0.01, 0.01, 0.01, -0.001)), None)
    assert math.isnan(row["final_acc"]) and row["final_skipped"]
    assert row["initial_acc"] == 0.5
    assert math.isnan(row["auc"])  # a skipped point would make this seed's area cover other iterations
    done = _row(VARIANT, 0, _result([_ok(0, 0.5), _ok(2, 0.7), _ok(4, 0.6)]), None)
    assert done["final_acc"] == 0.6 and not done["final_skipped"]
    # trapezoids (0.5 + 0.7) + (0.7 + 0.6) over a span of 4
    assert done["auc"] == pytest.approx((0.5 + 0.7 + 0.7 + 0.6) / 4)
    assert done["first_loss"] == 1.0 and done["final_loss"] == pytest.approx(0.85)


def test_gain_pairs_each_run_with_its_own_start():
    rows = [{"label": "MTT", "seed": s, "status": "computed", "initial_acc": i, "final_acc": f}
            for s, (i, f) in enumerate([(0.50, 0.60), (0.40, 0.45), (0.55, 0.60)])]
    gain = Comparison(rows).gain("MTT")
    assert gain["differences"] == pytest.approx([0.10, 0.05, 0.05])
    assert gain["mean"] == pytest.approx(0.2 / 3)


def _comparison(diverging=False, runaway=False):
    # a loss above 1 matches worse than a student that does not move; 1.2 at the start is not a divergence
    row = {"label": "MTT", "seed": 0, "status": "diverged" if diverging else "computed",
           "first_loss": 1.2, "final_loss": 1.05 if runaway else 0.95}
    return Comparison([row, {**row, "label": "MCT", "status": "computed", "final_loss": 0.5}])


def test_lr_lr_rule_takes_the_largest_value_at_which_nothing_diverges():
    outcome = {1e-5: _comparison(diverging=True), 1e-6: _comparison(runaway=True), 1e-7: _comparison()}
    asked = []

    def compare(lr_lr):
        asked.append(lr_lr)
        return outcome[lr_lr]

    chosen, tried = lr_lr_rule([1e-7, 1e-5, 1e-6], compare)
    assert chosen == 1e-7 and asked == [1e-5, 1e-6, 1e-7] and set(tried) == {1e-5, 1e-6, 1e-7}
    assert diverged(tried[1e-6].rows[0]) and not diverged(tried[1e-7].rows[0])
    asked.clear()
    assert lr_lr_rule([1e-5, 1e-6], compare)[0] is None  # every candidate failed: none is chosen
    outcome[1e-5] = _comparison()
    assert lr_lr_rule([1e-5, 1e-6, 1e-7], compare)[0] == 1e-5


@pytest.fixture(scope="module")
def store_full(digits8, tiny_net, tmp_path_factory):
    cfg = ExpertConfig(num_experts=2, epochs=6, lr=0.05, batch_size=64, dsa=False, record="full", seed=1)
    return make_experts(digits8, tiny_net, cfg, tmp_path_factory.mktemp("experts") / "experts-digits-full")


def test_learned_alpha_control_equals_the_initial_images_trained_with_the_final_alpha(digits8, store_full,
                                                                                       tmp_path):
    configs = [DistillConfig(method="mtt", **SMALL), DistillConfig(method="mct", **SMALL)]
    table = compare_methods(digits8, configs, [0, 1], store_full, None, EVAL, tmp_path)
    controls = learned_alpha_controls(table, digits8, store_full.net, EVAL, tmp_path)
    assert set(controls) == {("MTT", 0), ("MTT", 1), ("MCT", 0), ("MCT", 1)}
    for (label, seed), acc in controls.items():
        run = table.runs[(label, seed)]
        images, labels = initial_synthetic(digits8, configs[0].replace(seed=seed))
        expected = evaluate_synthetic(images, labels, run.alpha, digits8, store_full.net, EVAL.replace(seed=seed))
        assert acc == expected[0].mean
    # cached: a second call evaluates nothing
    assert learned_alpha_controls(table, digits8, store_full.net, EVAL, tmp_path) == controls
    # the row's own start is the run's iteration-0 evaluation, the same for both methods of a seed
    for seed in (0, 1):
        assert table.per_seed("MTT", "initial_acc")[seed] == table.per_seed("MCT", "initial_acc")[seed]


def test_sampling_spread_fixes_the_images_and_networks_and_reuses_the_seed_run(digits8, store_full, tmp_path):
    configs = [DistillConfig(method="mtt", **SMALL), DistillConfig(method="mct", **SMALL)]
    main = compare_methods(digits8, configs, [0, 1], store_full, None, EVAL, tmp_path)
    spread = sampling_spread(digits8, configs, 0, 2, store_full, None, EVAL, tmp_path)
    for label in ("MTT", "MCT"):
        assert spread.runs[(label, 0)].status == "loaded"  # the main comparison's run of seed 0
        assert torch.equal(spread.runs[(label, 0)].images, main.runs[(label, 0)].images)
        # seed 1 here: seed 0's images and networks (same iteration-0 accuracy), other windows
        assert spread.per_seed(label, "initial_acc")[1] == spread.per_seed(label, "initial_acc")[0]
        assert not torch.equal(spread.runs[(label, 1)].images, spread.runs[(label, 0)].images)
        assert spread.runs[(label, 1)].log[0]["expert"] is not None
    # and the main comparison's seed 1 started from other images than seed 0
    assert main.per_seed("MTT", "initial_acc")[1] != main.per_seed("MTT", "initial_acc")[0] or not torch.equal(
        initial_synthetic(digits8, configs[0].replace(seed=1))[0], initial_synthetic(digits8, configs[0])[0])


def test_a_shared_initial_evaluation_is_the_one_each_run_would_make(digits8, store_full, tmp_path):
    configs = [DistillConfig(method="mtt", **SMALL), DistillConfig(method="mct", **SMALL)]
    table = compare_methods(digits8, configs, [0], store_full, None, EVAL, tmp_path / "shared")
    # one cached initial evaluation for the two methods of the seed
    assert len(list((tmp_path / "shared" / "baselines").glob("*initial_images*.json"))) == 1
    alone = distill(configs[0], store_full, digits8, EVAL, progress=False)
    shared = table.runs[("MTT", 0)]
    assert shared.evals == alone.evals and torch.equal(shared.images, alone.images)
    assert table.runs[("MCT", 0)].evals[0] == alone.evals[0]
