"""`python -m benchmarks` (`make bench`): the entry point that runs the chosen sections and reports them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mctlib.device import configure_threads

from .child import RESULT_TAG, child
from .common import DEFAULT_OUT, FORMAT, FULL, QUICK, machine
from .distill import section_distill
from .distributed import section_distributed
from .evaluation import section_eval
from .experts import section_experts
from .gpu import section_gpu
from .memory import section_memory
from .pool import section_pool
from .precision import section_precision
from .figures import write_figures
from .report import changes, format_table
from .threads import section_threads
from .versus_reference import section_reference


SECTIONS = ("experts", "distill", "memory", "eval", "pool", "reference", "threads", "precision", "gpu")
# Run only when named: several fresh processes per row (benchmarks/distributed.py).
OPTIONAL_SECTIONS = ("distributed",)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="The engine's speed and memory, measured with their spread.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and single repeats (a smoke test, not figures)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON file to write (default {DEFAULT_OUT})")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (all by default), or {','.join(OPTIONAL_SECTIONS)}")
    p.add_argument("--iterations", type=int, default=None, help="timed distillation iterations per configuration "
                   f"(default {FULL.iterations}; {QUICK.iterations} with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: device.configure_threads)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"), help="GPU section precision")
    p.add_argument("--channels-last", action="store_true", help="GPU section: channels-last images")
    p.add_argument("--figures", default=None, help="folder for the PNG figures (default: none)")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    p.add_argument("--replot", default=None, help="draw figures/table from an existing bench JSON and exit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    if args.child is not None:
        result = child(json.loads(args.child))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        _report(result, args)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS) - set(OPTIONAL_SECTIONS))
    if unknown:
        make_parser().error(f"--sections: unknown {unknown}; choose from {list(SECTIONS + OPTIONAL_SECTIONS)}")
    if args.iterations is not None and args.iterations < 1:
        make_parser().error("--iterations must be >= 1")
    sizes = QUICK if args.quick else FULL
    if args.iterations is not None:
        sizes = dataclasses.replace(sizes, iterations=args.iterations)

    settings = configure_threads(args.threads)
    started = time.perf_counter()
    result = {"format": FORMAT, "command": ["python", "-m", "benchmarks", *(argv or [])], "quick": args.quick,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sizes": dataclasses.asdict(sizes), "settings": settings,
              "machine": machine(), "sections": sections}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mctlib-bench-") as tmp:
        work = Path(tmp)
        needs_stores = any(s in sections for s in ("experts", "distill", "memory", "threads"))
        if needs_stores:
            result["experts"] = section_experts(sizes, work, log)
            stores = result["experts"]["stores"]
        if "distill" in sections:
            result["distill"] = section_distill(sizes, stores, args.threads, log)
        if "memory" in sections:
            result["memory"] = section_memory(sizes, stores, args.threads, log)
        if "eval" in sections:
            result["eval"] = section_eval(sizes, log)
        if "pool" in sections:
            result["pool"] = section_pool(sizes, log)
        if "reference" in sections:
            result["reference"] = section_reference(sizes, log)
        if "threads" in sections:
            result["threads"] = section_threads(sizes, stores, log)
        if "precision" in sections:
            result["precision"] = section_precision(sizes, log)
        if "gpu" in sections:
            result["gpu"] = section_gpu(sizes, args.precision, args.channels_last, log)
        if "distributed" in sections:
            result["distributed"] = section_distributed(log, quick=args.quick)
        if "experts" in result:
            result["experts"]["stores"] = {k: "(temporary)" for k in result["experts"]["stores"]}
    result["changes"] = changes(result)
    result["seconds"] = time.perf_counter() - started
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps(result, indent=2) + "\n")
    _report(result, args)
    print(f"-> {out}")
    return 0


def _report(result: dict, args) -> None:
    print(format_table(result))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(format_table(result, markdown=True) + "\n")
    if args.figures:
        for path in write_figures(result, Path(args.figures)):
            print(f"figure -> {path}")
