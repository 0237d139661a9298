"""One distillation run or baseline, computed once: loaded when its folder already holds it, resumed
when it was interrupted, computed otherwise; and independent runs in parallel processes.

A run directory that holds a different configuration is never overwritten (`RunMismatchError`).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import available_cores
from .config import DistillConfig, EvalConfig
from .data import Dataset
from .device import configure_threads, resolve_device
from .distill import (CHECKPOINT, LEGACY_COMPUTE, AlphaNonPositiveWarning, DistillResult, DivergenceError, distill,
                      load_synthetic, run_config)
from .evaluate import EvalResult, full_data_baseline, random_real_baseline
from .networks import NetConfig
from .notebook import config_key
from .storage import TrajectoryStore, atomic_write_json, load_store

# Fields that may differ between a run directory and the request without changing what is computed.
_IGNORED = {"checkpoint_every"}


@dataclass
class RunResult(DistillResult):
    """A `DistillResult` that also says where it came from: 'computed', 'resumed' or 'loaded'."""

    name: str = ""
    status: str = "computed"

    @property
    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.log]

    @property
    def seconds_per_iteration(self) -> float:
        """Median wall-clock seconds of one iteration (as measured when the run was computed)."""
        seconds = sorted(entry["seconds"] for entry in self.log)
        return seconds[len(seconds) // 2] if seconds else math.nan


def _differences(on_disk: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(on_disk) | set(wanted)):
        a, b = on_disk.get(key), wanted.get(key)
        if key in _IGNORED:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: on disk {a!r} vs requested {b!r}")
    return out


class RunMismatchError(ValueError):
    """A run directory that holds a run with another configuration (it is never overwritten)."""


def run_or_load(name: str, distill_cfg: DistillConfig, store: TrajectoryStore, dataset: Dataset,
                eval_cfg: EvalConfig | None = None, runs_dir: str | Path = "runs", device=None,
                progress: bool = False) -> RunResult:
    """The run `runs_dir/name`: loaded if finished with this configuration, resumed from its checkpoint if
    interrupted (or asked for more iterations), computed if absent. A directory holding another
    configuration raises `RunMismatchError` naming both sides; a run that diverged before raises again."""
    run_dir = Path(runs_dir) / name
    wanted = run_config(distill_cfg, store, dataset, eval_cfg, device)
    config_file = run_dir / "config.json"
    status = "computed"
    if config_file.exists():
        on_disk = {k: v for k, v in json.loads(config_file.read_text()).items() if k in wanted}
        on_disk.setdefault("compute", LEGACY_COMPUTE)
        done = _iterations_done(run_dir)
        diff = _differences({**on_disk, "distill": {**on_disk.get("distill", {}), "iterations": None}},
                            {**wanted, "distill": {**wanted["distill"], "iterations": None}})
        if diff:
            raise RunMismatchError(f"{run_dir} holds a run with another configuration: " + "; ".join(diff) +
                                   ". Choose another run name or runs_dir (nothing was overwritten).")
        if done > distill_cfg.iterations:
            raise RunMismatchError(f"{run_dir} holds a run of {done} iterations, more than the "
                                   f"{distill_cfg.iterations} requested; its state at iteration "
                                   f"{distill_cfg.iterations} was not kept. Ask for {done} or choose another run name.")
        diverged = run_dir / "diverged.json"
        if diverged.exists():
            raise DivergenceError(json.loads(diverged.read_text())["error"])
        if done == distill_cfg.iterations and (run_dir / "synthetic_final.safetensors").exists():
            return _load_run(name, run_dir)
        if (run_dir / CHECKPOINT).exists():
            status = "resumed"
        else:  # stopped before its first checkpoint: nothing to keep, the same config starts over
            for leftover in ("config.json", "metrics.json", "synthetic_best.safetensors"):
                (run_dir / leftover).unlink(missing_ok=True)
    try:
        result = distill(distill_cfg, store, dataset, eval_cfg, run_dir, resume=status == "resumed", device=device,
                         progress=progress, run_info={"run_name": name})
    except DivergenceError as err:
        atomic_write_json(run_dir / "diverged.json", {"error": str(err)})
        raise
    return RunResult(**vars(result), name=name, status=status)


def _iterations_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.json"
    return int(json.loads(metrics.read_text())["iteration"]) if metrics.exists() else 0


def _load_run(name: str, run_dir: Path) -> RunResult:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    images, labels, alpha = load_synthetic(run_dir / "synthetic_final.safetensors")
    config = json.loads((run_dir / "config.json").read_text())
    return RunResult(images, labels, alpha, metrics["log"], metrics["evals"], run_dir, metrics["best"], config,
                     name=name, status="loaded")


def default_workers(device=None) -> int:
    """How many independent runs to compute at once: one per CPU core (each process single-threaded) on a
    CPU, one on a GPU. On this book's 2-core reference machine one MTT iteration takes 2.8 s on one thread
    and 2.05 s on two (book/performance.md), so two single-thread runs side by side do 1.4x the work of
    one run on both cores. Each run is computed on one thread either way, so its result does not depend
    on the number of workers."""
    return 1 if resolve_device(device).type != "cpu" else max(1, available_cores())


def _worker_init() -> None:
    configure_threads(1)


@lru_cache(maxsize=8)
def _worker_store(path: str) -> TrajectoryStore:
    return load_store(path)


def _compute_run(name: str, cfg: DistillConfig, store_path: str, dataset: Dataset, ev: EvalConfig | None,
                 runs_dir: str, device) -> str | None:
    """In a worker: compute (or resume) one run into its run directory; the parent loads it afterwards."""
    try:
        _quiet_run_or_load(name, cfg, _worker_store(store_path), dataset, ev, runs_dir, device)
    except DivergenceError as err:
        return str(err)
    return None


def _compute_baseline(kind: str, dataset: Dataset, net: NetConfig, cfg: EvalConfig, runs_dir: str, ipc, lr: float,
                      device) -> None:
    baseline_or_load(kind, dataset, net, cfg, runs_dir, ipc=ipc, lr=lr, device=device)


def parallel_jobs(fn, jobs: list[tuple], workers: int, progress: bool = False, desc: str = "runs") -> list:
    """fn(*job) for every job, in `workers` spawned single-threaded processes (in this process when there
    is one worker or one job). Results come back in job order; an exception in a job is raised here."""
    if not jobs:
        return []
    bar = None
    if progress:
        # Imported only for a bar, as in distill and experts: in a kernel without ipywidgets, importing
        # tqdm.auto prints a warning with a file path under the cell (chapter 4 shows no bar on digits).
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=desc, leave=False)
    if workers <= 1 or len(jobs) == 1:
        out = []
        for job in jobs:
            out.append(fn(*job))
            if bar is not None:
                bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_worker_init,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
            out = [None] * len(jobs)
            for future in as_completed(futures):
                out[futures[future]] = future.result()
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return out


def _quiet_run_or_load(*args) -> RunResult:
    # Each row of a comparison lists the iterations where alpha <= 0 (`alpha_nonpositive_iterations`),
    # so the per-run warning would only repeat it, once per run and process.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlphaNonPositiveWarning)
        return run_or_load(*args)


def _finished(run_dir: Path, cfg: DistillConfig) -> bool:
    return (run_dir / "diverged.json").exists() or (
        _iterations_done(run_dir) == cfg.iterations and (run_dir / "synthetic_final.safetensors").exists())


def _baseline_path(kind: str, dataset: Dataset, net: NetConfig, eval_cfg: EvalConfig, runs_dir, ipc, lr) -> Path:
    desc = dataset.describe()
    key = config_key({k: desc[k] for k in ("name", "image_size", "zca", "num_train")}, net.to_dict(),
                     eval_cfg.to_dict(), kind, ipc, lr)
    return Path(runs_dir) / "baselines" / f"{desc['name']}-{kind}{f'-ipc{ipc}' if ipc else ''}-{key}.json"


def baseline_or_load(kind: str, dataset: Dataset, net: NetConfig, eval_cfg: EvalConfig, runs_dir: str | Path = "runs",
                     ipc: int | None = None, lr: float = 0.01, device=None) -> list[EvalResult]:
    """The random-real (`ipc` images per class) or full-data baseline under `eval_cfg`, cached as JSON."""
    if kind not in ("random_real", "full"):
        raise ValueError(f"baseline {kind!r} unknown; choose random_real or full")
    if kind == "random_real" and not ipc:
        raise ValueError("the random_real baseline needs ipc")
    path = _baseline_path(kind, dataset, net, eval_cfg, runs_dir, ipc, lr)
    if path.exists():
        return [EvalResult(r["arch"], r["accuracies"]) for r in json.loads(path.read_text())["results"]]
    if kind == "random_real":
        results = random_real_baseline(dataset, ipc, net, eval_cfg, lr=lr, seed=eval_cfg.seed, device=device)
    else:
        results = full_data_baseline(dataset, net, eval_cfg, lr=lr, device=device)
    atomic_write_json(path, {"kind": kind, "ipc": ipc, "lr": lr, "eval": eval_cfg.to_dict(), "net": net.to_dict(),
                             "results": [r.to_dict() for r in results]})
    return results


def random_real_subsets(dataset: Dataset, ipc: int, net: NetConfig, eval_cfg: EvalConfig, subsets: int,
                        runs_dir: str | Path = "runs", lr: float = 0.01, device=None, workers: int = 1,
                        progress: bool = False) -> list[EvalResult]:
    """The random-real baseline on `subsets` different random subsets (subset k drawn, and its networks
    seeded, with eval_cfg.seed + k), each cached; one EvalResult (first architecture) per subset."""
    cfgs = [eval_cfg.replace(seed=eval_cfg.seed + k) for k in range(subsets)]
    jobs = [("random_real", dataset, net, c, str(runs_dir), ipc, lr, device) for c in cfgs
            if not _baseline_path("random_real", dataset, net, c, runs_dir, ipc, lr).exists()]
    parallel_jobs(_compute_baseline, jobs, workers, progress, desc=f"random real IPC {ipc}")
    return [baseline_or_load("random_real", dataset, net, c, runs_dir, ipc=ipc, lr=lr, device=device)[0] for c in cfgs]
