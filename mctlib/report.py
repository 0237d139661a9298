"""Chapter 4's tables and verdicts, read from comparisons: each builder returns the Markdown the chapter
displays and the numbers its prose glues, so a chapter cell is a call and a display.

Accuracies are fractions in the comparisons and percentage points here. Every difference is paired by
seed and carries its 95 % t-interval; verdicts read it against zero and the equivalence margin (in
points) that the chapter fixes before its runs (`stats.verdict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .comparison import Comparison
from .stats import describe_difference, paired, std_interval, summary_stats, t_interval, verdict


@dataclass
class Summary:
    """A table as Markdown and the numbers (and sentences) behind it, keyed for glue."""

    markdown: str
    values: dict = field(default_factory=dict)


def _pct(stats: dict, digits: int = 1) -> str:
    """'72.1 ± 0.8' (mean ± sample std, in points) or '72.1' for one value; '–' for none."""
    if stats["n"] == 0:
        return "–"
    if stats["n"] == 1:
        return f"{100 * stats['mean']:.{digits}f}"
    return f"{100 * stats['mean']:.{digits}f} ± {100 * stats['std']:.{digits}f}"


def _ci(interval: dict, digits: int = 2) -> str:
    """'+1.23 [−0.40, +2.86]' in points, or the single value."""
    if interval["n"] == 0:
        return "–"
    if interval["n"] == 1:
        return f"{100 * interval['mean']:+.{digits}f} (one seed)"
    return f"{100 * interval['mean']:+.{digits}f} [{100 * interval['low']:+.{digits}f}, {100 * interval['high']:+.{digits}f}]"


def _record(values: dict, name: str, interval: dict, margin: float) -> None:
    values[name] = 100 * interval["mean"] if interval["n"] else math.nan
    values[name + "_low"] = 100 * interval["low"] if interval["n"] > 1 else math.nan
    values[name + "_high"] = 100 * interval["high"] if interval["n"] > 1 else math.nan
    values[name + "_text"] = describe_difference(interval, margin)


def accuracy_summary(table: Comparison, random_real: Iterable[float], controls: Mapping[tuple[str, int], float],
                     margin: float, labels: tuple[str, ...] = ("MTT", "MCT")) -> Summary:
    """Per method: its own start (the iteration-0 evaluation: the initial real subset with the initial
    alpha), best and final accuracy (mean ± std over seeds), and three paired gains with 95 % CIs: final
    over start, the learned-alpha control over start (what learning alpha alone buys), and final over the
    control (what learning the images buys). Random real subsets are the unpaired reference row."""
    rr = summary_stats(random_real)
    values = {"random_real": 100 * rr["mean"], "random_real_std": 100 * rr["std"] if rr["n"] > 1 else math.nan,
              "random_real_subsets": rr["n"]}
    lines = ["| | runs | start (own subset) | best | final | final − start | α only: control − start "
             "| images: final − control |", "|---|---:|---|---|---|---|---|---|",
             f"| random real | {rr['n']} subsets | | | {_pct(rr)} | | | |"]
    for label in labels:
        m = label.lower()
        start = table.per_seed(label, "initial_acc")
        final = table.per_seed(label, "final_acc")
        control = {seed: controls.get((label, seed), math.nan) for seed in final}
        gain, alpha_gain, image_gain = paired(start, final), paired(start, control), paired(control, final)
        skipped = sum(bool(r.get("final_skipped")) for r in table.select(label) if r["status"] != "diverged")
        st_start, st_best, st_final = (summary_stats(table.per_seed(label, k).values())
                                       for k in ("initial_acc", "best_acc", "final_acc"))
        values.update({f"{m}_seeds": len(final), f"{m}_start": 100 * st_start["mean"],
                       f"{m}_best": 100 * st_best["mean"], f"{m}_final": 100 * st_final["mean"],
                       f"{m}_final_std": 100 * st_final["std"] if st_final["n"] > 1 else math.nan,
                       f"{m}_final_skipped": skipped})
        _record(values, f"{m}_gain", gain, margin)
        _record(values, f"{m}_alpha_gain", alpha_gain, margin)
        _record(values, f"{m}_image_gain", image_gain, margin)
        final_cell = _pct(st_final) + (f" ({skipped} skipped)" if skipped else "")
        lines.append(f"| {label} | {len(final)} | {_pct(st_start)} | {_pct(st_best)} | {final_cell} | {_ci(gain)} | "
                     f"{_ci(alpha_gain)} | {_ci(image_gain)} |")
    lines.append("\nTest accuracy (%): mean ± sample standard deviation over seeds (random real: over subsets). "
                 "Gains are paired by seed: mean [95 % t-interval, n − 1 degrees of freedom], in points.")
    return Summary("\n".join(lines), values)


QUANTITIES = (("final_acc", "final accuracy"), ("best_acc", "best accuracy"),
              ("auc", "mean accuracy over the run (area under the curve)"))


def difference_summary(table: Comparison, margin: float, a: str = "MTT", b: str = "MCT",
                       quantities: tuple[tuple[str, str], ...] = QUANTITIES) -> Summary:
    """b − a seed by seed for each quantity, with its 95 % CI and the verdict against ±margin points."""
    lines = [f"| {b} − {a} | per seed | mean [95 % CI] | verdict (margin ±{100 * margin:g}) |", "|---|---|---|---|"]
    values = {}
    for key, words in quantities:
        interval = table.paired(a, b, key)
        per_seed = ", ".join(f"{100 * d:+.2f}" for d in interval["differences"]) or "–"
        lines.append(f"| {words} | {per_seed} | {_ci(interval)} | {verdict(interval, margin)} |")
        _record(values, key.replace("_acc", ""), interval, margin)
        values[key.replace("_acc", "") + "_verdict"] = verdict(interval, margin)
    lines.append("\nPoints; a verdict reads the interval: 'higher'/'lower' when it excludes zero, 'equivalent' "
                 "when it lies inside the margin fixed before the runs, 'inconclusive' otherwise.")
    return Summary("\n".join(lines), values)


def convergence_summary(table: Comparison, margin: float, a: str = "MTT", b: str = "MCT") -> Summary:
    """Accuracy at each evaluation point (mean ± std per method, b − a paired with its CI), and the verdict
    chosen in advance: the paired difference in mean accuracy over the run (area under the curve)."""
    iterations = sorted({it for r in table.rows if r["status"] != "diverged" for it, _ in r["eval_curve"]})
    lines = [f"| iteration | {a} | {b} | {b} − {a} [95 % CI] |", "|---:|---|---|---|"]
    values = {}
    for it in iterations:
        per = {label: summary_stats(table.per_seed(label, iteration=it).values()) for label in (a, b)}
        diff = table.paired(a, b, iteration=it)
        lines.append(f"| {it} | {_pct(per[a])} | {_pct(per[b])} | {_ci(diff)} |")
        values[f"{a.lower()}_{it}"] = 100 * per[a]["mean"]
        values[f"{b.lower()}_{it}"] = 100 * per[b]["mean"]
        _record(values, f"diff_{it}", diff, margin)
    auc = table.paired(a, b, "auc")
    _record(values, "auc_diff", auc, margin)
    values["auc_verdict"] = verdict(auc, margin)
    for label in (a, b):
        values[f"{label.lower()}_auc"] = 100 * summary_stats(table.per_seed(label, "auc").values())["mean"]
    values["iterations"] = iterations
    lines.append(f"| mean over the run | {values[a.lower() + '_auc']:.1f} | {values[b.lower() + '_auc']:.1f} | "
                 f"{_ci(auc)} |")
    lines.append("\nTest accuracy (%), mean ± sample standard deviation over seeds; the last row is the area under "
                 "each seed's accuracy curve over the run, divided by its length.")
    return Summary("\n".join(lines), values)


def stability_summary(sampling: Comparison, main: Comparison, margin_noise: float,
                      labels: tuple[str, ...] = ("MTT", "MCT")) -> Summary:
    """Two measures per method. The spread of the final accuracy across sampling seeds with the initial
    images and the evaluation networks fixed (`sampling`: only the windows differ), with its chi-square
    95 % interval; and the matching loss's noise over the whole run (`stats.successive_noise`, relative
    to its level) over the main comparison's seeds, with the paired difference."""
    lines = ["| | final accuracy over sampling seeds | its std [95 % interval] | loss noise over the run |",
             "|---|---|---|---|"]
    values = {}
    for label in labels:
        m = label.lower()
        finals = std_interval(sampling.per_seed(label, "final_acc").values())
        noise = summary_stats(main.per_seed(label, "loss_noise").values())
        values.update({f"{m}_sampling_seeds": finals["n"], f"{m}_sampling_std": 100 * finals["std"],
                       f"{m}_sampling_std_low": 100 * finals["std_low"],
                       f"{m}_sampling_std_high": 100 * finals["std_high"],
                       f"{m}_loss_noise": noise["mean"], f"{m}_loss_noise_std": noise["std"]})
        lines.append(f"| {label} | {_pct(finals, 2)} ({finals['n']} seeds) | {100 * finals['std']:.2f} "
                     f"[{100 * finals['std_low']:.2f}, {100 * finals['std_high']:.2f}] | "
                     f"{noise['mean']:.1%} ± {noise['std']:.1%} |")
    a, b = labels
    lo = {m: values[f"{m.lower()}_sampling_std_low"] for m in labels}
    hi = {m: values[f"{m.lower()}_sampling_std_high"] for m in labels}
    if hi[b] < lo[a] or hi[a] < lo[b]:
        low, high = (b, a) if hi[b] < lo[a] else (a, b)
        values["sampling_std_text"] = f"{low}'s interval lies wholly below {high}'s: {low} is the more stable here"
    else:
        values["sampling_std_text"] = (f"the two intervals overlap, so with {values[a.lower() + '_sampling_seeds']} "
                                       "sampling seeds each the spreads do not tell the methods apart")
    if values[f"{b.lower()}_sampling_std"] > 0:
        values["sampling_std_ratio"] = values[f"{a.lower()}_sampling_std"] / values[f"{b.lower()}_sampling_std"]
    else:
        values["sampling_std_ratio"] = math.inf
    noise_diff = main.paired(a, b, "loss_noise")
    values["loss_noise_diff"] = noise_diff["mean"]
    values["loss_noise_diff_text"] = describe_difference(noise_diff, margin_noise, scale=100,
                                                         unit="percentage points")
    lines.append("\nAccuracy in %; loss noise: the standard deviation of successive changes of the matching loss "
                 "over √2, relative to its mean, mean ± std over the main comparison's seeds.")
    return Summary("\n".join(lines), values)


def alpha_summary(table: Comparison, labels: tuple[str, ...] = ("MTT", "MCT")) -> dict:
    """Per method: iterations with alpha <= 0 (summed over runs), of how many, in how many runs; and the
    evaluations skipped for it."""
    out = {}
    for label in labels:
        rows = [r for r in table.select(label) if r["status"] != "diverged"]
        m = label.lower()
        out[f"{m}_alpha_nonpositive_iterations"] = sum(len(r["alpha_nonpositive_iterations"]) for r in rows)
        out[f"{m}_iterations"] = sum(r["iterations"] for r in rows)
        out[f"{m}_alpha_nonpositive_runs"] = sum(bool(r["alpha_nonpositive_iterations"]) for r in rows)
        out[f"{m}_skipped_evals"] = sum(len(r["skipped_evals"]) for r in rows)
    return out


def interval_text(values: Iterable[float], scale: float = 100.0, digits: int = 1) -> str:
    """'72.1 (95 % CI 71.2 to 73.0)' for a mean over seeds."""
    t = t_interval(values)
    if t["n"] < 2:
        return f"{scale * t['mean']:.{digits}f}"
    return f"{scale * t['mean']:.{digits}f} (95 % CI {scale * t['low']:.{digits}f} to {scale * t['high']:.{digits}f})"
