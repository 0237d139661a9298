"""Statistics for comparing methods honestly (METHOD.md "Comparing two methods honestly")."""

from __future__ import annotations

import math
import statistics
from typing import Iterable


def summary_stats(values: Iterable[float]) -> dict:
    """n, mean, sample standard deviation (n - 1) and standard error of the mean of `values`; NaN (a
    quantity a run could not measure, e.g. loss noise over a one-iteration half) is left out."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(values)
    mean = statistics.fmean(values) if n else math.nan
    std = statistics.stdev(values) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "sem": std / math.sqrt(n) if n > 1 else math.nan}


def describe_difference(stats: dict, scale: float = 100.0, unit: str = "points") -> str:
    """A paired difference in words, with its uncertainty: 'within noise' only when its mean is less than
    two standard errors from zero. With few seeds that is a lenient bar (with 5 seeds, two standard
    errors is a two-sided t-test at about the 12% level), so 'more than two standard errors' is
    evidence of a difference, not proof."""
    n, mean, sem = stats["n"], stats["mean"], stats["sem"]
    if n == 0:
        return "no paired runs"
    if n == 1:
        return f"{scale * mean:+.2f} {unit} from a single seed, so without an uncertainty"
    if all(d == 0 for d in stats.get("differences", [mean])):
        return f"zero: the two methods scored the same in each of the {n} seeds"
    if n == 2:
        diffs = ", ".join(f"{scale * d:+.2f}" for d in stats["differences"])
        return (f"{scale * mean:+.2f} {unit} on average ({diffs} in the two seeds); two seeds are too few for a "
                "standard error to mean much")
    text = f"{scale * mean:+.2f} ± {scale * sem:.2f} {unit} (mean ± standard error over {n} seeds)"
    if abs(mean) < 2 * sem:
        return text + ", within noise: less than two standard errors from zero"
    return text + ", more than two standard errors from zero"
