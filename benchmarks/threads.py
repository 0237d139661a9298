"""Section threads: thread counts, OpenMP wait policies and the allocator tuning, as found and contended."""

from __future__ import annotations

import subprocess
import sys

from mctlib import available_cores

from .child import run_child
from .common import Sizes


def section_threads(sizes: Sizes, stores: dict, log) -> dict:
    """MTT unrolled iterations under thread counts, OpenMP wait policies and the allocator tuning,
    on the machine as it is ("as found") and with one busy process of our own per available core
    competing for the cores ("contended": what a shared machine does to each setting)."""
    configs = [("1 thread", 1, True, None), ("1 thread, allocator untuned", 1, False, None),
               ("2 threads", 2, True, None), ("2 threads, OMP passive", 2, True, "PASSIVE")]
    conditions = [("as found", 0)] + ([("contended", available_cores())] if sizes.thread_contention else [])
    rows = []
    for condition, contenders in conditions:
        for label, threads, tuned, policy in configs[:sizes.thread_settings]:
            if condition == "contended" and not tuned:
                continue  # the allocator is not what contention is about
            spec = {"kind": "distill", "method": "mtt", "mode": "unrolled", "syn_steps": sizes.syn_steps,
                    "iterations": sizes.thread_iterations, "warmup": 1, "store": stores["full"], "threads": threads,
                    "tune_allocator": tuned, "device": "cpu", "env": {"OMP_WAIT_POLICY": policy}}
            busy = _start_contenders(contenders)
            try:
                res = run_child(spec)
            finally:
                _stop(busy)
            rows.append({"label": label, "condition": condition, "contenders": contenders, "threads": threads,
                         "tune_allocator": tuned, "omp_wait_policy": policy, **res})
            log(f"threads {label} ({condition}): " + (res.get("error") or f"{res['iteration_seconds']['median']:.3f} "
                                                      f"s/it wall, {res['cpu_seconds_per_iteration']:.3f} s CPU"))
    return {"rows": rows}


def _start_contenders(n: int) -> list:
    """n busy-looping Python processes (ours), to emulate other jobs sharing the cores."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()
