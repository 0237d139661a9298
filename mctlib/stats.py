"""Statistics for comparing methods honestly (METHOD.md "Comparing two methods honestly"), chapter 4.

Every comparison is paired by seed and reported as a mean with its 95 % t-interval (n - 1 degrees of
freedom). A verdict reads the interval against zero and against an equivalence margin fixed before the
runs: "higher" or "lower" when the interval excludes zero, "equivalent" when it lies inside the margin,
"inconclusive" otherwise. Convergence is judged over all evaluation points at once, by the area under
the accuracy curve; stability by standard deviations with their chi-square intervals.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping

from scipy import stats as _scipy

CONFIDENCE = 0.95


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def summary_stats(values: Iterable[float]) -> dict:
    """n, mean, sample standard deviation (n - 1) and standard error of the mean of `values`; NaN (a
    quantity a run could not measure, e.g. loss noise over a one-iteration half) is left out."""
    values = _finite(values)
    n = len(values)
    mean = statistics.fmean(values) if n else math.nan
    std = statistics.stdev(values) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "sem": std / math.sqrt(n) if n > 1 else math.nan}


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> dict:
    """`summary_stats` plus the two-sided t-interval for the mean: mean ± t_{(1+c)/2, n-1} · sem.
    With one value (or none) the interval is undefined (NaN), never a zero-width interval."""
    out = summary_stats(values)
    n = out["n"]
    t = float(_scipy.t.ppf((1 + confidence) / 2, n - 1)) if n > 1 else math.nan
    half = t * out["sem"] if n > 1 else math.nan
    return out | {"t": t, "df": n - 1 if n > 1 else 0, "confidence": confidence,
                  "low": out["mean"] - half, "high": out["mean"] + half}


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE) -> dict:
    """b minus a, key by key (seeds present in both with finite values), with its t-interval: the
    per-seed `differences`, the `seeds` used, and everything `t_interval` gives."""
    seeds = sorted(s for s in set(a) & set(b) if not (math.isnan(float(a[s])) or math.isnan(float(b[s]))))
    diffs = [float(b[s]) - float(a[s]) for s in seeds]
    return t_interval(diffs, confidence) | {"seeds": seeds, "differences": diffs}


def verdict(interval: dict, margin: float) -> str:
    """'higher' (the interval lies above zero), 'lower' (below zero), 'equivalent' (inside ±margin),
    'inconclusive' (it crosses zero and reaches past the margin), or 'no interval' (fewer than two
    pairs). `margin` is the equivalence margin, fixed before the runs, in the interval's units."""
    if interval["n"] < 2 or math.isnan(interval["low"]):
        return "no interval"
    if all(d == 0 for d in interval.get("differences", [interval["mean"]])):
        return "equivalent"
    if interval["low"] > 0:
        return "higher"
    if interval["high"] < 0:
        return "lower"
    if -margin < interval["low"] and interval["high"] < margin:
        return "equivalent"
    return "inconclusive"


def describe_interval(interval: dict, scale: float = 100.0, unit: str = "points", digits: int = 2) -> str:
    """'+1.23 points (95 % CI −0.40 to +2.86; 5 seeds)': the mean and its t-interval, scaled."""
    n = interval["n"]
    if n == 0:
        return "no paired runs"
    mean = f"{scale * interval['mean']:+.{digits}f} {unit}"
    if n == 1:
        return f"{mean} from a single seed, without an interval"
    level = f"{100 * interval.get('confidence', CONFIDENCE):.0f} %"
    return (f"{mean} ({level} CI {scale * interval['low']:+.{digits}f} to {scale * interval['high']:+.{digits}f}; "
            f"{n} seeds)")


def describe_difference(interval: dict, margin: float, scale: float = 100.0, unit: str = "points",
                        digits: int = 2) -> str:
    """A paired difference in words: `describe_interval` and what `verdict` reads from it against zero
    and the equivalence margin ±margin (in the interval's units before scaling)."""
    text = describe_interval(interval, scale, unit, digits)
    word = verdict(interval, margin)
    one = unit.endswith("s") and abs(scale * margin) == 1  # "±1 point", "±2 points"
    m = f"±{scale * margin:.{digits}g} {unit[:-1] if one else unit}"
    return text + {
        "higher": ": the interval excludes zero (higher)",
        "lower": ": the interval excludes zero (lower)",
        "equivalent": f": inside the equivalence margin of {m}",
        "inconclusive": f": the interval includes zero and reaches past the margin of {m}, so neither a "
                        "difference nor an equivalence is shown",
        "no interval": "",
    }[word]


def std_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> dict:
    """Sample standard deviation with its chi-square interval: s·sqrt((n-1)/χ²_{(1+c)/2}) to
    s·sqrt((n-1)/χ²_{(1-c)/2}) (normal data). With a handful of values the interval is wide, which is
    the point: a spread measured on 3 to 5 runs is itself uncertain."""
    out = summary_stats(values)
    n, s = out["n"], out["std"]
    if n < 2:
        return out | {"std_low": math.nan, "std_high": math.nan}
    df = n - 1
    low = s * math.sqrt(df / float(_scipy.chi2.ppf((1 + confidence) / 2, df)))
    high = s * math.sqrt(df / float(_scipy.chi2.ppf((1 - confidence) / 2, df)))
    return out | {"std_low": low, "std_high": high}


def area_under_curve(iterations: Iterable[int], values: Iterable[float]) -> float:
    """Mean of a curve over its iterations: the trapezoid area under (iteration, value) divided by the
    span from the first to the last iteration. For an accuracy curve this is the accuracy averaged over
    the whole run, so a method that gets there sooner scores higher even when both end level."""
    points = sorted(zip(iterations, values))
    if len(points) < 2:
        raise ValueError(f"an area under a curve needs at least two points, got {len(points)}")
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def iterations_to_threshold(iterations: Iterable[int], values: Iterable[float], threshold: float) -> float:
    """The first evaluated iteration at which the curve reaches `threshold` (inf if it never does)."""
    for it, value in sorted(zip(iterations, values)):
        if value >= threshold:
            return float(it)
    return math.inf


def successive_noise(values: Iterable[float]) -> float:
    """Noise of a series around its trend, relative to its level: the standard deviation of successive
    differences over sqrt(2), divided by the mean. A slow trend barely moves successive differences, so
    this measures the iteration-to-iteration jitter of the matching loss over the whole run."""
    values = _finite(values)
    if len(values) < 3:
        return math.nan
    steps = [b - a for a, b in zip(values, values[1:])]
    return statistics.stdev(steps) / math.sqrt(2) / statistics.fmean(values)
