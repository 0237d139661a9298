"""Section memory: peak memory against syn_steps for each gradient mode."""

from __future__ import annotations

from mctlib.storage import load_store

from .child import run_child
from .common import MODES, Sizes
from .distill import row_text


def section_memory(sizes: Sizes, stores: dict, threads, log) -> dict:
    """Peak memory against syn_steps for each gradient mode (method mtt, digits, CPU)."""
    rows = []
    for mode in MODES:
        for steps in sizes.memory_steps:
            spec = {"kind": "distill", "method": "mtt", "mode": mode, "syn_steps": steps,
                    "iterations": sizes.memory_iterations, "warmup": 0, "store": stores["full"], "threads": threads,
                    "device": "cpu"}
            res = run_child(spec)
            rows.append({"mode": mode, "syn_steps": steps, **res})
            log(row_text({"method": "mtt", "mode": mode, **res}))
    out = {"syn_steps": list(sizes.memory_steps), "rows": rows}
    out["checks"] = memory_checks(rows, sizes.memory_steps, stores)
    return out


def memory_checks(rows: list[dict], steps: tuple[int, ...], stores: dict) -> dict:
    """constant_memory flat (<= 1.1x), unrolled growing, checkpointed growing by ~N parameter vectors."""
    def peak(mode, n):
        row = next((r for r in rows if r["mode"] == mode and r["syn_steps"] == n and "peak_mb" in r), None)
        return None if row is None else row["peak_mb"]

    lo, hi = steps[0], steps[-1]
    checks = {"from": lo, "to": hi}
    try:
        d = load_store(stores["full"]).manifest["num_params"]
    except Exception:  # noqa: BLE001 - the check is informative only
        d = None
    for mode in MODES:
        a, b = peak(mode, lo), peak(mode, hi)
        if a is None or b is None:
            continue
        checks[mode] = {"peak_mb_from": a, "peak_mb_to": b, "ratio": b / a if a > 0 else None,
                        "growth_mb": b - a}
    if "constant_memory" in checks and checks["constant_memory"]["ratio"] is not None:
        checks["constant_memory"]["flat"] = checks["constant_memory"]["ratio"] <= 1.1
    if "unrolled" in checks:
        checks["unrolled"]["grows"] = checks["unrolled"]["growth_mb"] > 0
    if d is not None and "checkpointed" in checks:
        expected = (hi - lo) * d * 4 / 2**20
        checks["checkpointed"]["expected_growth_mb"] = expected
        checks["checkpointed"]["num_params"] = d
    return checks
