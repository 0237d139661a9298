"""Section distill: seconds per distillation iteration and peak memory per method x gradient mode (digits, CPU)."""

from __future__ import annotations

from mctlib.check.timings import METHODS

from .child import run_child
from .common import FULL, MODES, ORIGINAL_MTT_SECONDS, TARGET_MTT_UNROLLED_SECONDS, Sizes


def section_distill(sizes: Sizes, stores: dict, threads, log) -> dict:
    """Seconds per iteration and peak memory per method x gradient mode (digits, CPU)."""
    rows = []
    for method in METHODS:
        store = stores["full" if method == "mtt" else "convex_k4"]
        for mode in MODES:
            spec = {"kind": "distill", "method": method, "mode": mode, "syn_steps": sizes.syn_steps,
                    "iterations": sizes.iterations, "warmup": sizes.warmup, "store": store, "threads": threads,
                    "device": "cpu"}
            res = run_child(spec)
            rows.append({"method": method, "mode": mode, "device": "cpu", **res})
            log(row_text(rows[-1]))
    out = {"rows": rows, "reference": {"original_mtt_seconds": ORIGINAL_MTT_SECONDS,
                                       "target_mtt_unrolled_seconds": TARGET_MTT_UNROLLED_SECONDS}}
    mtt = next(r for r in rows if r["method"] == "mtt" and r["mode"] == "unrolled")
    if "iteration_seconds" in mtt:
        med = mtt["iteration_seconds"]["median"]
        out["target"] = {"mtt_unrolled_median_s": med, "target_s": TARGET_MTT_UNROLLED_SECONDS,
                         "met": med <= TARGET_MTT_UNROLLED_SECONDS,
                         "cpu_seconds_per_iteration": mtt["cpu_seconds_per_iteration"],
                         "comparable": sizes == FULL}
    return out


def row_text(row: dict) -> str:
    """One log line for a distillation row."""
    if "error" in row:
        return f"{row.get('method', '')} {row.get('mode', '')}: {row['error']}"
    sec = row["iteration_seconds"]
    return (f"{row.get('method', '')} {row.get('mode', '')} syn_steps {row.get('config', {}).get('syn_steps', '')}: "
            f"{sec['median']:.3f} s/it (IQR {sec['iqr']:.3f}), CPU {row['cpu_seconds_per_iteration']:.3f} s, "
            f"peak {row['peak_mb']:.1f} MB")
