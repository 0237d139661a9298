"""Chapter 4's tables against hand-computed cases: the paired gains, the method difference and its verdict,
the convergence table, the stability measures and the alpha counts."""

import math

import pytest

from mctlib.comparison import Comparison
from mctlib.report import accuracy_summary, alpha_summary, convergence_summary, difference_summary, stability_summary

START = [0.50, 0.40, 0.60]
FINAL = {"MTT": [0.60, 0.52, 0.69], "MCT": [0.62, 0.52, 0.70]}


def _rows():
    rows = []
    for label, finals in FINAL.items():
        for seed, (s, f) in enumerate(zip(START, finals)):
            rows.append({"label": label, "seed": seed, "status": "computed", "initial_acc": s, "final_acc": f,
                         "best_acc": max(s, f), "final_skipped": False, "auc": (s + f) / 2,
                         "eval_curve": [(0, s), (10, f)], "loss_noise": 0.1 if label == "MTT" else 0.05,
                         "alpha_nonpositive_iterations": [2, 3] if (label, seed) == ("MCT", 1) else [],
                         "iterations": 10, "skipped_evals": []})
    return Comparison(rows)


def test_accuracy_summary_pairs_each_gain_by_seed():
    controls = {("MTT", 0): 0.55, ("MTT", 1): 0.45, ("MTT", 2): 0.62,
                ("MCT", 0): 0.55, ("MCT", 1): 0.45, ("MCT", 2): 0.62}
    out = accuracy_summary(_rows(), [0.40, 0.50], controls, margin=0.01)
    v = out.values
    # MTT final - start: 0.10, 0.12, 0.09 -> mean 10.33, s = 0.015275, t(0.975, 2) = 4.3027
    half = 4.3026527 * 0.0152753 / math.sqrt(3)
    assert v["mtt_gain"] == pytest.approx(10.3333, abs=1e-3)
    assert v["mtt_gain_low"] == pytest.approx(100 * (0.103333 - half), abs=1e-3)
    assert v["mtt_alpha_gain"] == pytest.approx(4.0) and v["mtt_image_gain"] == pytest.approx(6.3333, abs=1e-3)
    assert v["random_real"] == pytest.approx(45.0) and v["random_real_std"] == pytest.approx(100 * math.sqrt(0.005))
    assert f"+10.33 [{100 * (0.103333 - half):+.2f}, {100 * (0.103333 + half):+.2f}]" in out.markdown
    assert "| random real | 2 subsets |" in out.markdown and "excludes zero (higher)" in v["mtt_gain_text"]


def test_a_skipped_final_evaluation_is_counted_not_replaced():
    table = _rows()
    table.rows[0] = {**table.rows[0], "final_acc": math.nan, "final_skipped": True}
    out = accuracy_summary(table, [0.4, 0.5], {}, margin=0.01)
    assert out.values["mtt_final_skipped"] == 1 and "(1 skipped)" in out.markdown
    assert out.values["mtt_final"] == pytest.approx(100 * (0.52 + 0.69) / 2)


def test_difference_summary_reads_the_interval_against_the_margin():
    # MCT - MTT final: 0.02, 0.00, 0.01 -> mean 1.00, s = 0.01, CI 1.00 -/+ 2.48 points
    narrow = difference_summary(_rows(), margin=0.01)
    assert narrow.values["final"] == pytest.approx(1.0)
    assert narrow.values["final_low"] == pytest.approx(100 * (0.01 - 4.3026527 * 0.01 / math.sqrt(3)), abs=1e-6)
    assert narrow.values["final_verdict"] == "inconclusive"
    assert difference_summary(_rows(), margin=0.05).values["final_verdict"] == "equivalent"
    assert "| final accuracy | +2.00, +0.00, +1.00 |" in narrow.markdown


def test_convergence_summary_per_iteration_and_over_the_run():
    out = convergence_summary(_rows(), margin=0.01)
    assert out.values["iterations"] == [0, 10]
    assert out.values["diff_0"] == 0 and out.values["mtt_10"] == pytest.approx(100 * sum(FINAL["MTT"]) / 3)
    # area difference = half the final difference per seed: 0.01, 0, 0.005
    assert out.values["auc_diff"] == pytest.approx(0.5)


def test_stability_and_alpha_counts():
    main = _rows()
    out = stability_summary(main, main, margin_noise=0.01)
    assert out.values["mtt_sampling_std"] == pytest.approx(100 * 0.0850490, abs=1e-4)  # std of 0.60, 0.52, 0.69
    assert out.values["loss_noise_diff"] == pytest.approx(-0.05)
    assert "overlap" in out.values["sampling_std_text"]  # the same runs on both sides
    steady = Comparison([{**r, "final_acc": 0.6 + 0.0001 * r["seed"]} if r["label"] == "MCT" else r
                         for r in main.rows])
    assert stability_summary(steady, main, 0.01).values["sampling_std_text"].startswith(
        "MCT's interval lies wholly below MTT's")
    counts = alpha_summary(main)
    assert counts["mct_alpha_nonpositive_iterations"] == 2 and counts["mct_alpha_nonpositive_runs"] == 1
    assert counts["mtt_alpha_nonpositive_iterations"] == 0 and counts["mct_iterations"] == 30
