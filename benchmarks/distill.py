"""Section distill: seconds per distillation iteration and peak memory per method x gradient mode (digits, CPU)."""

from __future__ import annotations


from .child import run_child
from .common import FULL, METHODS, MODES, ORIGINAL_MTT_SECONDS, Sizes, TARGET_MTT_UNROLLED_SECONDS


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
            log(_row_text(rows[-1]))
    out = {"rows": rows, "reference": {"original_mtt_seconds": ORIGINAL_MTT_SECONDS,
                                       "target_mtt_unrolled_seconds": TARGET_MTT_UNROLLED_SECONDS}}
    mtt = next(r for r in rows if r["method"] == "mtt" and r["mode"] == "unrolled")
    if "iteration_seconds" in mtt:
        med = mtt["iteration_seconds"]["median"]
        out["target"] = {"mtt_unrolled_median_s": med, "target_s": TARGET_MTT_UNROLLED_SECONDS,
                         "met": med <= TARGET_MTT_UNROLLED_SECONDS,
                         "cpu_seconds_median": mtt["match_cpu_seconds"]["median"],
                         "comparable": sizes == FULL}
    return out


def _row_text(row: dict) -> str:
    if "error" in row:
        return f"{row.get('method', '')} {row.get('mode', '')}: {row['error']}"
    sec = row.get("iteration_seconds") or row.get("match_seconds")
    return (f"{row.get('method', '')} {row.get('mode', '')} syn_steps {row.get('config', {}).get('syn_steps', '')}: "
            f"{sec['median']:.3f} s/it (IQR {sec['iqr']:.3f}), CPU {row['match_cpu_seconds']['median']:.3f} s, "
            f"peak {row['peak_mb']:.1f} MB")
