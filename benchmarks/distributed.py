"""The `distributed` bench section: one process against two ranks on the same cores, in one run.

- experts per minute: `mctlib experts` (the digits IPC 10 preset's network, 8 experts × 3 epochs) as one process
  with one thread, and as 2 gloo ranks with one thread each (the manifest's own timing: training
  and writing, not the start-up of Python);
- distillation seconds per iteration at the digits IPC 10 config (mtt, unrolled, syn_steps 20), as
  1 process x 1 thread, 1 process x 2 threads (the single-process default on 2 cores: OpenMP
  threads passive) and 2 ranks x 1 thread;
- peak memory per rank (rise of the peak resident set over the start) at syn_steps 20 and 80 (lr_lr
  LONG_UNROLL_LR_LR at 80).

Each configuration runs in fresh processes; the ranks are started with the environment torchrun
gives its workers. `python -m benchmarks --sections distributed` runs it; `section_distributed(log, quick)` is its entry.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mctlib.config import get_preset
from mctlib.data import load_dataset
from mctlib.device import configure_threads
from mctlib.distill import distill
from mctlib.distributed import launched, setup, teardown
from mctlib.storage import load_store

TAG = "MCTLIB-BENCH-DISTRIBUTED "
PRESET = "mtt-digits-ipc10"
# The preset's lr_lr (1e-5) belongs to syn_steps 20: at syn_steps 80 on the bench's short experts alpha leaves
# its range within two iterations and the images run away (measured). The long-unroll rows measure memory and
# time, which do not depend on lr_lr, so they run with a step under which those iterations stay finite.
LONG_UNROLL_LR_LR = 1e-7


def _env(threads: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MCTLIB_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    env["OMP_WAIT_POLICY"] = "PASSIVE"   # what `python -m mctlib` sets on a small machine
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def _launch(cmd: list[str], ranks: int, threads: int, timeout: float = 900.0) -> list[subprocess.CompletedProcess]:
    """`cmd` as one process (ranks = 0: no process group) or as `ranks` ranks with torchrun's environment."""
    if ranks == 0:
        return [subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, timeout=timeout)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(cmd, env=_env(threads, {"RANK": r, "WORLD_SIZE": ranks, "LOCAL_RANK": r,
                                                      "LOCAL_WORLD_SIZE": ranks, "MASTER_ADDR": "127.0.0.1",
                                                      "MASTER_PORT": port}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def _results(done: list[subprocess.CompletedProcess]) -> list[dict]:
    rows = []
    for d in done:
        found = [json.loads(line[len(TAG):]) for line in d.stdout.splitlines() if line.startswith(TAG)]
        rows.append(found[-1] if found else {"error": f"exit {d.returncode}: {d.stderr.strip()[-600:]}"})
    return rows


def _experts(work: Path, name: str, ranks: int, num_experts: int, epochs: int) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "mctlib", "experts", "--preset", PRESET, "--num-experts", str(num_experts),
           "--epochs", str(epochs), "--record", "full", "--ensemble-size", "1", "--no-progress", "--device", "cpu",
           "--out", str(out)]
    done = _launch(cmd, ranks, 1)
    if any(d.returncode for d in done):
        return {"error": " | ".join(d.stderr.strip()[-600:] for d in done if d.returncode)}
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    return {"processes": max(ranks, 1), "threads_per_process": 1, "seconds": stats["seconds"],
            "experts_per_minute": stats["experts_per_minute"], "store": str(out)}


def _distill(store: str, ranks: int, threads: int, syn_steps: int, iterations: int, warmup: int,
             lr_lr: float | None = None) -> dict:
    spec = {"store": store, "syn_steps": syn_steps, "iterations": iterations + warmup, "warmup": warmup}
    if lr_lr is not None:
        spec["lr_lr"] = lr_lr
    cmd = [sys.executable, "-m", "benchmarks.distributed", "--child", json.dumps(spec)]
    rows = _results(_launch(cmd, ranks, threads))
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        return {"error": " | ".join(errors)}
    seconds = rows[0]["iteration_seconds"]
    return {"processes": max(ranks, 1), "threads_per_process": threads, "syn_steps": syn_steps,
            "seconds_per_iteration_median": statistics.median(seconds), "iteration_seconds": seconds,
            "peak_mb_per_rank": [r["peak_mb"] for r in rows], "final_loss": rows[0]["final_loss"],
            "loadavg": rows[0]["loadavg"]}


def section_distributed(log, quick: bool = False) -> dict:
    """1 process x 1 thread against 2 ranks x 1 thread (and 1 x 2 threads) on this machine's cores."""
    experts, epochs = (2, 3) if quick else (8, 3)
    iterations, warmup = (1, 1) if quick else (4, 1)
    steps = (2, 4) if quick else (20, 80)
    out: dict = {"config": {"preset": PRESET, "num_experts": experts, "expert_epochs_trained": epochs,
                            "gradient_mode": "unrolled", "iterations": iterations, "warmup": warmup,
                            "syn_steps": list(steps), "lr_lr_long_unroll": LONG_UNROLL_LR_LR},
                          "experts": [], "distill": []}
    with tempfile.TemporaryDirectory(prefix="mctlib-bench-dist-") as tmp:
        work = Path(tmp)
        for name, ranks in (("one", 0), ("two", 2)):
            row = _experts(work, name, ranks, experts, epochs)
            out["experts"].append(row)
            log(f"experts, {row.get('processes')} process(es) x 1 thread: "
                + (f"{row['experts_per_minute']:.2f} experts/min" if "error" not in row else row["error"]))
        store = out["experts"][0].get("store")
        if store is None:
            return out
        configs = [(steps[0], 0, 1), (steps[0], 0, 2), (steps[0], 2, 1), (steps[1], 0, 1), (steps[1], 2, 1)]
        for syn_steps, ranks, threads in configs:
            n = iterations if syn_steps == steps[0] else max(1, iterations // 2)
            row = _distill(store, ranks, threads, syn_steps, n, warmup,
                           lr_lr=None if syn_steps == steps[0] else LONG_UNROLL_LR_LR)
            out["distill"].append(row)
            log(f"distill syn_steps {syn_steps}, {max(ranks, 1)} process(es) x {threads} thread(s): "
                + (f"{row['seconds_per_iteration_median']:.2f} s/it, peak "
                   f"{', '.join(f'{m:.0f}' for m in row['peak_mb_per_rank'])} MB per rank"
                   if "error" not in row else row["error"]))
    for row in out["experts"]:
        row.pop("store", None)
    out["speedups"] = _speedups(out, steps[0])
    return out


def _speedups(out: dict, steps: int) -> dict:
    ex = {r["processes"]: r for r in out["experts"] if "error" not in r}
    d = {(r["processes"], r["threads_per_process"]): r for r in out["distill"]
         if "error" not in r and r["syn_steps"] == steps}
    res = {}
    if 1 in ex and 2 in ex:
        res["experts_2_ranks_over_1_process"] = ex[2]["experts_per_minute"] / ex[1]["experts_per_minute"]
    if (1, 1) in d and (2, 1) in d:
        res["distill_2_ranks_over_1_process_1_thread"] = (d[(1, 1)]["seconds_per_iteration_median"]
                                                          / d[(2, 1)]["seconds_per_iteration_median"])
    if (1, 2) in d and (2, 1) in d:
        res["distill_2_ranks_over_1_process_2_threads"] = (d[(1, 2)]["seconds_per_iteration_median"]
                                                           / d[(2, 1)]["seconds_per_iteration_median"])
    return res


def format_rows(result: dict) -> str:
    lines = ["distributed (CPU, gloo; fresh processes; wall clock on a possibly shared machine)"]
    for r in result.get("experts", []):
        lines.append(f"  experts  {r.get('processes')} x 1 thread: " + (
            f"{r['experts_per_minute']:.2f} experts/min" if "error" not in r else r["error"]))
    for r in result.get("distill", []):
        lines.append(f"  distill  syn_steps {r.get('syn_steps')}, {r.get('processes')} x {r.get('threads_per_process')}"
                     " thread(s): " + (f"{r['seconds_per_iteration_median']:.2f} s/it, peak per rank "
                                       f"{', '.join(f'{m:.0f}' for m in r['peak_mb_per_rank'])} MB"
                                       if "error" not in r else r["error"]))
    for k, v in result.get("speedups", {}).items():
        lines.append(f"  {k}: {v:.2f}x")
    return "\n".join(lines)


# -- child ------------------------------------------------------------------------------------

def _peak_probe():
    """Rise of this process's peak resident set (VmHWM, reset now) over its resident set now, in MB."""
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    Path("/proc/self/clear_refs").write_text("5")
    base = rss()
    return lambda: (hwm() - base) / 2**20


def _child(spec: dict) -> dict:
    configure_threads()
    group = setup("cpu", "gloo", 600) if launched() else None
    store = load_store(spec["store"])
    dataset = load_dataset("digits")
    epochs = store.records[0].epochs
    cfg = get_preset(PRESET).distill
    max_start = float(min(cfg.max_start_epoch, epochs - cfg.expert_epochs))  # the bench's short experts
    cfg = cfg.replace(syn_steps=spec["syn_steps"], iterations=spec["iterations"], eval_every=0,
                      checkpoint_every=10**6, max_start_epoch=max_start, lr_lr=spec.get("lr_lr", cfg.lr_lr))
    probe = _peak_probe()
    result = distill(cfg, store, dataset, progress=False, group=group, device="cpu")
    peak = probe()
    if group is not None:
        teardown()
    return {"iteration_seconds": [e["seconds"] for e in result.log[spec["warmup"]:]], "peak_mb": peak,
            "final_loss": result.log[-1]["loss"], "threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg())}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(TAG + json.dumps(_child(json.loads(sys.argv[2]))), flush=True)
    else:
        # `python -m benchmarks.distributed [--quick]`: the section alone.
        started = time.perf_counter()
        res = section_distributed(lambda m: print(f"[{time.perf_counter() - started:6.1f} s] {m}", flush=True),
                                  quick="--quick" in sys.argv)
        print(format_rows(res))
        print(json.dumps(res, indent=2))
