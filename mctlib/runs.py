"""One distillation run or baseline, computed once: loaded when its folder already holds it, resumed
when it was interrupted, computed otherwise; and independent runs in parallel processes.

A run directory that holds a different configuration is never overwritten (`RunMismatchError`).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .config import DistillConfig, EvalConfig
from .data import Dataset
from .distill import AlphaNonPositiveWarning, DistillResult, DivergenceError, distill, initial_synthetic, run_config
from .evaluate import EvalResult, evaluate_synthetic, full_data_baseline, random_real_baseline
from .networks import NetConfig
from .notebook import config_key
from .rundir import CHECKPOINT, LEGACY_COMPUTE, config_differences, listed, load_synthetic
from .storage import TrajectoryStore, atomic_write_json, load_store
from .workers import parallel_jobs

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


class RunMismatchError(ValueError):
    """A run directory that holds a run with another configuration (it is never overwritten)."""


def run_or_load(name: str, distill_cfg: DistillConfig, store: TrajectoryStore, dataset: Dataset,
                eval_cfg: EvalConfig | None = None, runs_dir: str | Path = "runs", device=None,
                progress: bool = False, initial_eval: list | None = None) -> RunResult:
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
        diff = config_differences({**on_disk, "distill": {**on_disk.get("distill", {}), "iterations": None}},
                                  {**wanted, "distill": {**wanted["distill"], "iterations": None}}, _IGNORED,
                                  left="on disk", right="requested")
        if diff:
            raise RunMismatchError(f"{run_dir} holds a run with another configuration: " + listed(diff) +
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
                         progress=progress, run_info={"run_name": name}, initial_eval=initial_eval)
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


@lru_cache(maxsize=8)
def _worker_store(path: str) -> TrajectoryStore:
    return load_store(path)


def _compute_run(name: str, cfg: DistillConfig, store_path: str, dataset: Dataset, ev: EvalConfig | None,
                 runs_dir: str, device, initial_eval: list | None = None) -> str | None:
    """In a worker: compute (or resume) one run into its run directory; the parent loads it afterwards."""
    try:
        _quiet_run_or_load(name, cfg, _worker_store(store_path), dataset, ev, runs_dir, device, False, initial_eval)
    except DivergenceError as err:
        return str(err)
    return None


def _compute_baseline(kind: str, dataset: Dataset, net: NetConfig, cfg: EvalConfig, runs_dir: str, ipc, lr: float,
                      device, init: DistillConfig | None = None) -> None:
    baseline_or_load(kind, dataset, net, cfg, runs_dir, ipc=ipc, lr=lr, device=device, init=init)


def _quiet_run_or_load(*args) -> RunResult:
    # Each row of a comparison lists the iterations where alpha <= 0 (`alpha_nonpositive_iterations`),
    # so the per-run warning would only repeat it, once per run and process.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlphaNonPositiveWarning)
        return run_or_load(*args)


def _finished(run_dir: Path, cfg: DistillConfig) -> bool:
    return (run_dir / "diverged.json").exists() or (
        _iterations_done(run_dir) == cfg.iterations and (run_dir / "synthetic_final.safetensors").exists())


BASELINES = ("random_real", "full", "initial_images")


def _baseline_path(kind: str, dataset: Dataset, net: NetConfig, eval_cfg: EvalConfig, runs_dir, ipc, lr,
                   init: DistillConfig | None = None) -> Path:
    desc = dataset.describe()
    start = None if init is None else (init.ipc, init.seed if init.init_seed is None else init.init_seed, init.init)
    key = config_key({k: desc[k] for k in ("name", "image_size", "zca", "num_train")}, net.to_dict(),
                     eval_cfg.to_dict(), kind, ipc, lr, *(() if start is None else (start,)))
    return Path(runs_dir) / "baselines" / f"{desc['name']}-{kind}{f'-ipc{ipc}' if ipc else ''}-{key}.json"


def baseline_or_load(kind: str, dataset: Dataset, net: NetConfig, eval_cfg: EvalConfig, runs_dir: str | Path = "runs",
                     ipc: int | None = None, lr: float = 0.01, device=None,
                     init: DistillConfig | None = None) -> list[EvalResult]:
    """A reference evaluation under `eval_cfg`, cached as JSON: 'random_real' (`ipc` random images per
    class), 'full' (the whole training set), or 'initial_images' (the initial synthetic set S_0 of the
    distillation config `init`, trained with lr `lr`: with a run's final alpha this is the control that
    separates learning alpha from learning the images)."""
    if kind not in BASELINES:
        raise ValueError(f"baseline {kind!r} unknown; choose one of {', '.join(BASELINES)}")
    if kind == "random_real" and not ipc:
        raise ValueError("the random_real baseline needs ipc")
    if kind == "initial_images":
        if init is None:
            raise ValueError("the initial_images baseline needs the distillation config whose S_0 it evaluates")
        ipc = init.ipc
    path = _baseline_path(kind, dataset, net, eval_cfg, runs_dir, ipc, lr, init)
    if path.exists():
        return [EvalResult(r["arch"], r["accuracies"]) for r in json.loads(path.read_text())["results"]]
    if kind == "random_real":
        results = random_real_baseline(dataset, ipc, net, eval_cfg, lr=lr, seed=eval_cfg.seed, device=device)
    elif kind == "full":
        results = full_data_baseline(dataset, net, eval_cfg, lr=lr, device=device)
    else:
        images, labels = initial_synthetic(dataset, init)
        results = evaluate_synthetic(images, labels, lr, dataset, net, eval_cfg, device)
    atomic_write_json(path, {"kind": kind, "ipc": ipc, "lr": lr, "eval": eval_cfg.to_dict(), "net": net.to_dict(),
                             **({} if init is None else {"init": init.to_dict()}),
                             "results": [r.to_dict() for r in results]})
    return results


def baselines_or_load(jobs: list[dict], dataset: Dataset, net: NetConfig, runs_dir: str | Path = "runs", device=None,
                      workers: int = 1, progress: bool = False, desc: str = "baselines",
                      archs: bool = False) -> list:
    """Several `baseline_or_load` calls (each a dict of its keyword arguments: kind, eval_cfg, ipc, lr,
    init), those not yet cached computed in parallel processes (each distinct one once); the first
    architecture's result of each, or with `archs` the list of every architecture's."""
    def path(job):
        return _baseline_path(job["kind"], dataset, net, job["eval_cfg"], runs_dir, job.get("ipc"),
                              job.get("lr", 0.01), job.get("init"))

    pending = {path(j): (j["kind"], dataset, net, j["eval_cfg"], str(runs_dir), j.get("ipc"), j.get("lr", 0.01), device,
                         j.get("init")) for j in jobs if not path(j).exists()}  # each distinct one once
    pending = list(pending.values())
    parallel_jobs(_compute_baseline, pending, workers, progress, desc=desc)
    results = [baseline_or_load(j["kind"], dataset, net, j["eval_cfg"], runs_dir, j.get("ipc"), j.get("lr", 0.01),
                                device, j.get("init")) for j in jobs]
    return results if archs else [r[0] for r in results]


def random_real_subsets(dataset: Dataset, ipc: int, net: NetConfig, eval_cfg: EvalConfig, subsets: int,
                        runs_dir: str | Path = "runs", lr: float = 0.01, device=None, workers: int = 1,
                        progress: bool = False) -> list[EvalResult]:
    """The random-real baseline on `subsets` different random subsets (subset k drawn, and its networks
    seeded, with eval_cfg.seed + k), each cached; one EvalResult (first architecture) per subset."""
    jobs = [{"kind": "random_real", "eval_cfg": eval_cfg.replace(seed=eval_cfg.seed + k), "ipc": ipc, "lr": lr}
            for k in range(subsets)]
    return baselines_or_load(jobs, dataset, net, runs_dir, device, workers, progress, desc=f"random real IPC {ipc}")
