"""`python -m mctlib check --device DEVICE`: the engine verified on a device, then timed.

A user's acceptance test of their own machine (`make check-gpu` on a GPU): the checks of `checks`
(each gradient mode against CPU float64, the two exact modes against each other, the evaluation
ensemble against sequential training, tf32/bf16 against fp32, no host synchronisation inside a
match, bit-identical and resumable distillation, deterministic kernels), then the timings of
`timings` (book/performance.md, "On a GPU: the acceptance check"). Prints a table, writes JSON, and
exits 1 if any check failed. On the CPU the whole check is sized to take well under a minute:
`tests/test_check.py` runs it, so it cannot rot. `reference` is the original MTT loop the engine is
timed against.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path

from ..device import PRECISIONS, configure_threads, determinism, device_name, resolve_device, versions
from ..storage import atomic_write_json
from .checks import (SIZES, CheckSizes, check_checkpointed_equals_unrolled, check_ensemble_equals_sequential,
                     check_modes_vs_float64, check_no_host_sync, check_precisions, check_reproducible, digits,
                     result, tiny_store)
from .timings import format_timings, timings

FORMAT = "mctlib-check-v1"


def run_check(device: str = "cpu", precision: str = "fp32", sizes: CheckSizes = SIZES, log=print,
              timed: bool = True) -> dict:
    """Every check (and, if `timed`, the timings) on `device`; returns the JSON-ready result."""
    device = resolve_device(device)
    if device.type == "cpu":
        configure_threads()
    started = time.perf_counter()
    data = digits()
    checks: list[dict] = []

    def add(outcome):
        for r in outcome if isinstance(outcome, list) else [outcome]:
            checks.append(r)
            log(f"[{time.perf_counter() - started:5.1f} s] {'PASS' if r['passed'] else 'FAIL'}  {r['check']}: "
                f"{r['detail']}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add(check_modes_vs_float64(device, precision, sizes))
        add(check_checkpointed_equals_unrolled(device, precision, sizes))
        add(check_ensemble_equals_sequential(device, sizes, data))
        add(check_precisions(device, sizes, data))
        add(check_no_host_sync(device, precision, sizes))
        with tempfile.TemporaryDirectory(prefix="mctlib-check-") as tmp:
            store, experts_per_minute = tiny_store(device, sizes, data, Path(tmp))
            add(check_reproducible(device, precision, sizes, store, data, Path(tmp)))
    # torch warns (device.configure_determinism: warn_only) when a kernel has no deterministic version.
    kernels = sorted({str(w.message).splitlines()[0] for w in caught if "deterministic" in str(w.message)})
    add(result("deterministic_kernels", not kernels, "every kernel the checks ran has a deterministic version"
               if not kernels else f"{len(kernels)} without one: {'; '.join(kernels)[:300]}", kernels=kernels))
    out = {"format": FORMAT, "device": str(device), "device_name": device_name(device), "precision": precision,
           "determinism": determinism(), "versions": versions(device), "sizes": dataclasses.asdict(sizes),
           "checks": checks, "passed": all(c["passed"] for c in checks)}
    if timed:
        out["timings"] = timings(device, precision, sizes, data, experts_per_minute, log)
        log(f"[{time.perf_counter() - started:5.1f} s] timings done")
    out["seconds"] = time.perf_counter() - started
    return out


def format_check(outcome: dict) -> str:
    """The check's result as the table it prints."""
    lines = [f"mctlib check on {outcome['device_name']} at {outcome['precision']}: "
             f"{'all passed' if outcome['passed'] else 'FAILED'} ({outcome['seconds']:.0f} s)", ""]
    width = max(len(c["check"]) for c in outcome["checks"])
    lines += [f"{'PASS' if c['passed'] else 'FAIL'}  {c['check'].ljust(width)}  {c['detail']}"
              for c in outcome["checks"]]
    if outcome.get("timings"):
        lines += ["", *format_timings(outcome["timings"])]
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mctlib check", description="Check the engine on a device against CPU float64 "
                                "and time it; exits 1 if any check fails.")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="precision of the checked runs")
    p.add_argument("--out", default=None, help="JSON file to write (default runs/check/check-<device>.json)")
    p.add_argument("--no-timings", action="store_true", help="run the checks only")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = make_parser().parse_args(argv)
    try:
        outcome = run_check(args.device, args.precision, timed=not args.no_timings)
    except ValueError as err:  # e.g. --device cuda without a GPU
        print(f"mctlib check: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/check/check-{outcome['device'].replace(':', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, outcome)
    print()
    print(format_check(outcome))
    print(f"-> {out}")
    return 0 if outcome["passed"] else 1
