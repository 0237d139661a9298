"""The comparison behind chapter 4: MTT against MCT from the same experts, ablations, baselines,
and the published numbers with the commands that reproduce them.

Everything heavy goes through `run_or_load`, so a finished run is read back from its run
directory instead of recomputed, an interrupted one is resumed from its checkpoint, and a run
directory that holds a different configuration is never overwritten. The chapter only narrates.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch

from .config import DistillConfig, EvalConfig, Preset, get_preset, presets
from .data import Dataset
from .distill import (CHECKPOINT, LEGACY_COMPUTE, DistillResult, DivergenceError, distill, evaluated, load_synthetic,
                      run_config)
from .evaluate import EvalResult, full_data_baseline, random_real_baseline
from .networks import FlatModel, NetConfig, build_network
from .notebook import config_key
from .storage import TrajectoryStore, atomic_write_json, load_store, save_convexified

# ---------------------------------------------------------------------------------------------
# Trajectory records: the full buffer and its convexified forms, from the same experts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordSpec:
    """Which record of the experts a run matches: the full buffer, or a convexified one (K, beta, smoothing)."""

    kind: str = "convex"
    num_waypoints: int = 4
    beta_schedule: str = "arc_length"
    smooth: bool = True

    @property
    def label(self) -> str:
        if self.kind == "full":
            return "full buffer"
        return f"convex K={self.num_waypoints} {self.beta_schedule}" + ("" if self.smooth else " unsmoothed")


FULL = RecordSpec("full")


def record_spec(store: TrajectoryStore) -> RecordSpec:
    """The RecordSpec a loaded store holds."""
    if store.kind == "full":
        return FULL
    m = store.manifest
    return RecordSpec("convex", len(m["waypoint_epochs"]), m.get("beta_schedule") or m["recipe"]["beta_schedule"],
                      bool(m.get("smooth", m["recipe"].get("smooth", True))))


def convexified_store(store_full: TrajectoryStore, num_waypoints: int = 4, beta_schedule: str = "arc_length",
                      smooth: bool = True) -> TrajectoryStore:
    """The convexified record of `store_full`'s experts, saved next to it (loaded if already there).

    Same experts, same manifest facts as `mctlib convexify`: only the record differs, so MTT and
    MCT runs on the two stores compare the methods, not the experts.
    """
    if store_full.kind != "full":
        raise ValueError(f"{store_full.path} holds {store_full.kind} records; convexify needs full buffers")
    suffix = f"convex-K{num_waypoints}-{beta_schedule}" + ("" if smooth else "-unsmoothed")
    path = store_full.path.parent / f"{store_full.path.name}-{suffix}"
    if not (path / "manifest.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        try:
            save_convexified(store_full, tmp, num_waypoints, beta_schedule, smooth, overwrite=True)
            try:
                os.replace(tmp, path)
            except OSError:  # another process finished first: keep theirs
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    store = load_store(path, net=store_full.net, dataset=store_full.manifest["dataset"])
    if [e["init_seed"] for e in store.manifest["experts"]] != [e["init_seed"] for e in store_full.manifest["experts"]]:
        raise ValueError(f"{path} was convexified from other experts than {store_full.path}; move it away")
    return store


def store_for(spec: RecordSpec, store_full: TrajectoryStore) -> TrajectoryStore:
    """The store of `store_full`'s experts in the record `spec` asks for."""
    if spec.kind == "full":
        return store_full
    return convexified_store(store_full, spec.num_waypoints, spec.beta_schedule, spec.smooth)


def bytes_on_disk(store: TrajectoryStore) -> float:
    """Mean size in bytes of one expert's file, read from the file system (not from the manifest)."""
    sizes = [(store.path / e["file"]).stat().st_size for e in store.manifest["experts"]]
    return sum(sizes) / len(sizes)


# ---------------------------------------------------------------------------------------------
# One run: load it if it is done, resume it if it was interrupted, compute it otherwise
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Many runs: variants x seeds, and the tidy table they make
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One setting of a comparison: a label, the distillation config, and the record it matches."""

    label: str
    distill: DistillConfig
    record: RecordSpec


def run_name(cfg: DistillConfig, spec: RecordSpec, store_full: TrajectoryStore, eval_cfg: EvalConfig | None,
             prefix: str = "") -> str:
    """A readable, collision-free run name: method, IPC, seed and a hash of everything that is computed."""
    key = config_key(cfg.to_dict(), spec, store_full.path.name, eval_cfg.to_dict() if eval_cfg else None)
    return f"{prefix}{cfg.method}-ipc{cfg.ipc}-seed{cfg.seed}-{key}"


@dataclass
class Comparison:
    """Tidy rows (one per run) and the runs themselves, keyed by (label, seed)."""

    rows: list[dict]
    runs: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(r["label"] for r in self.rows))

    def select(self, label: str) -> list[dict]:
        return [r for r in self.rows if r["label"] == label]

    def summary(self) -> list[dict]:
        """Per label: mean and std across seeds of the best and final accuracies, seconds per iteration."""
        out = []
        for label in self.labels:
            rows = [r for r in self.select(label) if r["status"] != "diverged"]
            first = self.select(label)[0]
            entry = {k: first[k] for k in ("label", "method", "ipc", "sampling", "gradient_mode", "record")}
            entry["seeds"] = len(rows)
            entry["diverged"] = len(self.select(label)) - len(rows)
            for key in ("best_acc", "final_acc", "seconds_per_iteration", "final_loss", "loss_fluctuation", "alpha"):
                values = [r[key] for r in rows if r[key] is not None and not math.isnan(r[key])]
                entry[f"{key}_mean"] = statistics.fmean(values) if values else math.nan
                entry[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0 if values else math.nan
            out.append(entry)
        return out

    def curves(self, label: str) -> dict:
        """Accuracy vs iteration (mean and std across seeds) and each seed's matching-loss curve. An
        evaluation skipped in some run (alpha <= 0 at that iteration) leaves that seed out of that point."""
        rows = [r for r in self.select(label) if r["status"] != "diverged"]
        iterations = sorted({it for r in rows for it, _ in r["eval_curve"]})
        columns = [[dict(r["eval_curve"])[it] for r in rows if it in dict(r["eval_curve"])] for it in iterations]
        mean = [statistics.fmean(col) for col in columns]
        std = [statistics.pstdev(col) if len(col) > 1 else 0.0 for col in columns]
        return {"iterations": iterations, "acc_mean": mean, "acc_std": std, "counts": [len(c) for c in columns],
                "losses": [r.get("loss_curve", []) for r in rows], "seeds": [r["seed"] for r in rows]}

    def per_seed(self, label: str, key: str = "final_acc", iteration: int | None = None) -> dict[int, float]:
        """{seed: value} of the runs of `label` that finished: `key` of the row, or with `iteration` the
        accuracy evaluated at that iteration (seeds whose evaluation there was skipped are left out)."""
        rows = [r for r in self.select(label) if r["status"] != "diverged"]
        if iteration is None:
            return {r["seed"]: r[key] for r in rows}
        return {r["seed"]: dict(r["eval_curve"])[iteration] for r in rows if iteration in dict(r["eval_curve"])}

    def paired(self, label_a: str, label_b: str, key: str = "final_acc", iteration: int | None = None) -> dict:
        """label_b minus label_a, seed by seed (`per_seed`; only seeds where both have a value): the
        per-seed differences, their mean, sample standard deviation and standard error of the mean
        (std / sqrt(n)). Pairing by seed removes what the two runs of a seed share: the initial
        images and the evaluation networks' seeds."""
        a, b = self.per_seed(label_a, key, iteration), self.per_seed(label_b, key, iteration)
        seeds = sorted(set(a) & set(b))
        diffs = [b[s] - a[s] for s in seeds]
        return summary_stats(diffs) | {"seeds": seeds, "differences": diffs}

    def format(self) -> str:
        """The summary as a fixed-width text table (accuracies in %)."""
        lines = [f"{'setting':28s} {'ipc':>3s} {'seeds':>5s} {'best acc (%)':>14s} {'final acc (%)':>14s} {'s/it':>6s}"]
        for s in self.summary():
            lines.append(f"{s['label']:28s} {s['ipc']:3d} {s['seeds']:5d} "
                         f"{100 * s['best_acc_mean']:7.2f} ± {100 * s['best_acc_std']:4.2f} "
                         f"{100 * s['final_acc_mean']:7.2f} ± {100 * s['final_acc_std']:4.2f} "
                         f"{s['seconds_per_iteration_mean']:6.3f}")
        return "\n".join(lines)


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


def _row(variant: Variant, seed: int, result: RunResult | None, error: str | None) -> dict:
    cfg = variant.distill
    row = {"label": variant.label, "method": cfg.method, "ipc": cfg.ipc, "seed": seed,
           "sampling": cfg.resolved_sampling, "gradient_mode": cfg.gradient_mode, "record": variant.record.label,
           "status": "diverged" if error else result.status, "error": error}
    if result is None:
        return {**row, "best_acc": math.nan, "best_std": math.nan, "best_iteration": None, "final_acc": math.nan,
                "final_std": math.nan, "seconds_per_iteration": math.nan, "iterations": 0, "alpha": math.nan,
                "final_loss": math.nan, "loss_fluctuation": math.nan, "loss_curve": [], "eval_curve": [],
                "alpha_nonpositive_iterations": [], "skipped_evals": [],
                "run_dir": None}
    best, final = result.best, result.final
    tail = result.losses[-10:]
    late = result.losses[len(result.losses) // 2:]
    fluctuation = statistics.pstdev(late) / statistics.fmean(late) if len(late) > 1 else math.nan
    return {**row, "best_acc": best["mean"] if best else math.nan, "best_std": best["std"] if best else math.nan,
            "best_iteration": best["iteration"] if best else None,
            "final_acc": final["mean"] if final else math.nan, "final_std": final["std"] if final else math.nan,
            "seconds_per_iteration": result.seconds_per_iteration, "iterations": len(result.log),
            "alpha": result.alpha, "final_loss": statistics.fmean(tail) if tail else math.nan,
            "loss_fluctuation": fluctuation,
            "loss_curve": result.losses, "eval_curve": [(e["iteration"], e["mean"]) for e in evaluated(result.evals)],
            "alpha_nonpositive_iterations": result.alpha_nonpositive_iterations,
            "skipped_evals": [e for e in result.evals if "skipped" in e],
            "run_dir": str(result.run_dir)}


# ---------------------------------------------------------------------------------------------
# Independent runs in parallel: one single-threaded process per core
# ---------------------------------------------------------------------------------------------


def default_workers(device=None) -> int:
    """How many independent runs to compute at once: one per CPU core (each process single-threaded) on a
    CPU, one on a GPU. On this book's 2-core reference machine one MTT iteration takes 2.8 s on one thread
    and 2.05 s on two (book/performance.md), so two single-thread runs side by side do 1.4x the work of
    one run on both cores. Each run is computed on one thread either way, so its result does not depend
    on the number of workers."""
    from . import available_cores
    from .device import resolve_device

    return 1 if resolve_device(device).type != "cpu" else max(1, available_cores())


def _worker_init() -> None:
    from .device import configure_threads

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
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=desc, leave=False)
    if workers <= 1 or len(jobs) == 1:
        out = []
        for job in jobs:
            out.append(fn(*job))
            if bar is not None:
                bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

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
    import warnings

    from .distill import AlphaNonPositiveWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlphaNonPositiveWarning)
        return run_or_load(*args)


def _finished(run_dir: Path, cfg: DistillConfig) -> bool:
    return (run_dir / "diverged.json").exists() or (
        _iterations_done(run_dir) == cfg.iterations and (run_dir / "synthetic_final.safetensors").exists())


def run_variants(variants: Iterable[Variant], seeds: Iterable[int], dataset: Dataset, store_full: TrajectoryStore,
                 eval_cfg: EvalConfig | None, runs_dir: str | Path = "runs", stores: dict | None = None,
                 prefix: str = "", device=None, progress: bool = False, workers: int = 1) -> Comparison:
    """Every variant at every seed through `run_or_load`. The seed sets the initial subset, the window
    sampling and the evaluation networks; a run that diverges becomes a row with status 'diverged'.
    With workers > 1 the runs not yet on disk are computed in parallel processes (`parallel_jobs`)
    first, then every run is loaded."""
    stores = dict(stores or {})
    stores.setdefault(FULL, store_full)
    seeds = [int(s) for s in seeds]
    plan = []
    for variant in variants:
        if variant.record not in stores:
            stores[variant.record] = store_for(variant.record, store_full)
        store = stores[variant.record]
        for seed in seeds:
            cfg = variant.distill.replace(seed=int(seed))
            ev = eval_cfg.replace(seed=int(seed)) if eval_cfg is not None else None
            plan.append((variant, seed, run_name(cfg, variant.record, store_full, ev, prefix), cfg, store, ev))
    pending = [(name, cfg, str(store.path), dataset, ev, str(runs_dir), device)
               for _, _, name, cfg, store, ev in plan if not _finished(Path(runs_dir) / name, cfg)]
    if workers > 1 and len(pending) > 1:
        parallel_jobs(_compute_run, pending, workers, progress, desc="distillation runs")
    rows, runs = [], {}
    for variant, seed, name, cfg, store, ev in plan:
        try:
            result, error = _quiet_run_or_load(name, cfg, store, dataset, ev, runs_dir, device, progress), None
        except DivergenceError as err:
            result, error = None, str(err)
        rows.append(_row(variant, int(seed), result, error))
        runs[(variant.label, int(seed))] = result
    return Comparison(rows, runs)


def method_variants(configs: Iterable[str | DistillConfig | Variant]) -> list[Variant]:
    """Preset names or configs as variants: MTT on the full buffer, MCT on the convexified record
    (K, beta schedule and smoothing from the preset's expert recipe, else the defaults)."""
    out = []
    for c in configs:
        if isinstance(c, Variant):
            out.append(c)
            continue
        if isinstance(c, str):
            preset = get_preset(c)
            cfg, e = preset.distill, preset.expert
            spec = FULL if cfg.method == "mtt" else RecordSpec("convex", e.num_waypoints, e.beta_schedule, e.smooth)
        else:
            cfg = c
            spec = FULL if cfg.method == "mtt" else RecordSpec()
        out.append(Variant(cfg.method.upper(), cfg, spec))
    return out


def compare_methods(dataset: Dataset, configs: Iterable[str | DistillConfig | Variant], seeds: Iterable[int],
                    store_full: TrajectoryStore, store_convex: TrajectoryStore | None = None,
                    eval_cfg: EvalConfig | None = None, runs_dir: str | Path = "runs", prefix: str = "",
                    device=None, progress: bool = False, workers: int = 1) -> Comparison:
    """MTT (full buffer, integer starts) against MCT (convexified record, continuous tau), from the same
    experts: `store_convex` must be a convexification of `store_full` (made next to it when None)."""
    configs = list(configs)
    stores = {FULL: store_full}
    if store_convex is not None:
        if store_convex.manifest.get("converted_from") and \
                Path(store_convex.manifest["converted_from"]).name != store_full.path.name:
            raise ValueError(f"{store_convex.path} was convexified from {store_convex.manifest['converted_from']}, "
                             f"not from {store_full.path}: the methods would not share their experts")
        stores[record_spec(store_convex)] = store_convex
    convex = record_spec(store_convex) if store_convex is not None else None
    variants = [Variant(v.label, v.distill, convex) if convex and v.distill.method == "mct" else v
                for v in method_variants(configs)]
    if eval_cfg is None:
        names = [c for c in configs if isinstance(c, str)]
        eval_cfg = get_preset(names[0]).eval if names else None
    return run_variants(variants, seeds, dataset, store_full, eval_cfg, runs_dir, stores, prefix, device, progress,
                        workers)


# ---------------------------------------------------------------------------------------------
# Ablations of MCT's choices (one at a time, from the MCT base setting)
# ---------------------------------------------------------------------------------------------

ABLATIONS = ("sampling", "beta_schedule", "num_waypoints", "gradient_mode")


def ablation_variants(kind: str, base: DistillConfig, record: RecordSpec = RecordSpec()) -> list[Variant]:
    """The base MCT setting first, then each alternative of one choice (the labels):
    sampling (continuous / integer tau on the same convexified record), beta_schedule (arc_length /
    uniform / projected), num_waypoints (K4 / K2), gradient_mode (unrolled / constant_memory / checkpointed)."""
    if base.method != "mct":
        raise ValueError(f"ablations vary MCT's choices; the base config has method {base.method!r}")
    base = base.replace(sampling=None)
    if kind == "sampling":
        return [Variant("continuous", base, record), Variant("integer", base.replace(sampling="integer"), record)]
    if kind == "beta_schedule":
        return [Variant(s, base, RecordSpec("convex", record.num_waypoints, s, record.smooth))
                for s in ("arc_length", "uniform", "projected")]
    if kind == "num_waypoints":
        return [Variant(f"K{k}", base, RecordSpec("convex", k, record.beta_schedule, record.smooth)) for k in (4, 2)]
    if kind == "gradient_mode":
        return [Variant(m, base.replace(gradient_mode=m), record)
                for m in ("unrolled", "constant_memory", "checkpointed")]
    raise ValueError(f"unknown ablation {kind!r}; choose one of {list(ABLATIONS)}")


def run_ablation(kind: str, base: DistillConfig, seeds: Iterable[int], dataset: Dataset, store_full: TrajectoryStore,
                 eval_cfg: EvalConfig | None, runs_dir: str | Path = "runs", prefix: str = "", device=None,
                 progress: bool = False, workers: int = 1) -> Comparison:
    """One ablation; runs shared between ablations (the base setting) are computed once and loaded after."""
    return run_variants(ablation_variants(kind, base), seeds, dataset, store_full, eval_cfg, runs_dir,
                        prefix=prefix, device=device, progress=progress, workers=workers)


# ---------------------------------------------------------------------------------------------
# Baselines, cached like runs
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The published numbers and the commands that reproduce them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """One reported accuracy (ConvNet, %), as METHOD.md "Reported accuracies" lists it."""

    method: str        # mtt, mct, tesla, ftd, datm, full
    dataset: str       # cifar10, cifar100, tiny_imagenet
    ipc: int | None    # None: the full training set
    accuracy: float
    std: float | None = None
    source: str = ""


def _rows(method: str, dataset: str, values: tuple[float, ...], source: str) -> list[Published]:
    return [Published(method, dataset, ipc, acc, None, source) for ipc, acc in zip((1, 10, 50), values)]


PUBLISHED: tuple[Published, ...] = tuple(
    _rows("mtt", "cifar10", (46.3, 65.3, 71.6), "MTT paper")
    + _rows("mtt", "cifar100", (24.3, 40.1, 47.7), "MTT paper")
    + _rows("mtt", "tiny_imagenet", (8.8, 23.2, 28.0), "MTT paper")
    + _rows("tesla", "cifar10", (48.5, 66.4, 72.6), "TESLA paper")
    + _rows("ftd", "cifar10", (46.0, 65.3, 73.2), "FTD paper")
    + _rows("datm", "cifar10", (46.9, 66.8, 76.1), "DATM paper")
    + _rows("datm", "cifar100", (27.9, 47.2, 55.0), "DATM paper")
    + [Published("mct", "cifar10", 1, 48.48, 0.23, "MCT authors' logs"),
       Published("mct", "cifar100", 10, 41.64, None, "MCT authors' logs"),
       Published("mct", "cifar100", 50, 46.62, None, "MCT authors' logs"),
       Published("full", "cifar10", None, 84.8, None, "full training set"),
       Published("full", "cifar100", None, 56.2, None, "full training set"),
       Published("full", "tiny_imagenet", None, 37.6, None, "full training set")]
)
IMPLEMENTED = ("mtt", "mct", "full")
PAPER_ROOT = "runs/paper"
FULL_DATA_EPOCHS = 300  # full-data networks: 300 epochs of the whole set (the synthetic sets get 1000)


def preset_name(method: str, dataset: str, ipc: int) -> str:
    return f"{method}-{dataset.replace('_', '')}-ipc{ipc}"


def experiment_preset(method: str, dataset: str, ipc: int) -> tuple[Preset, bool]:
    """(preset, approximate) for `method` on `dataset` at `ipc`. The MCT authors published commands for
    CIFAR-10 only; elsewhere MCT takes MTT's preset for the same dataset and IPC with method 'mct'
    (approximate = True: not the authors' settings)."""
    name = preset_name(method, dataset, ipc)
    if name in presets():
        return get_preset(name), False
    if dataset == "digits":  # any IPC on digits: the IPC 1 setting with ipc changed
        base = get_preset(preset_name(method, dataset, 1))
        return Preset(name, base.data, base.net, base.expert, base.distill.replace(ipc=ipc), base.eval,
                      note=f"digits IPC {ipc}: the IPC 1 setting with ipc = {ipc}"), True
    if method != "mct":
        raise ValueError(f"no preset {name!r}; available: {sorted(presets())}")
    base = get_preset(preset_name("mtt", dataset, ipc))
    distill_cfg = base.distill.replace(method="mct", lr_teacher=base.expert.lr)
    expert = base.expert.replace(record="convex")
    return Preset(name, base.data, base.net, expert, distill_cfg, base.eval,
                  note=f"approximate: MTT's published {dataset} IPC {ipc} hyperparameters with method 'mct'"), True


def _store_dir(preset: Preset, root: str) -> str:
    return f"{root}/experts-{preset.data.name}" + ("-zca" if preset.data.zca else "")


def reproduce_commands(method: str, dataset: str, ipc: int | None, root: str = PAPER_ROOT) -> dict:
    """The CLI sequence and the papermill command that reproduce one published row on a GPU.
    MTT and MCT share the experts of MTT's preset; MCT matches their convexified record (K = 4)."""
    if method not in IMPLEMENTED:
        return {"preset": None, "approximate": False, "cli": [], "papermill": None,
                "note": f"{method.upper()} is not implemented in mctlib (reference row)"}
    if method == "full":  # the full-data ceiling: the same evaluation protocol on the whole training set
        base = next(get_preset(preset_name("mtt", dataset, i)) for i in (1, 10, 50)
                    if not get_preset(preset_name("mtt", dataset, i)).data.zca)
        download = "" if dataset == "tiny_imagenet" else " --data-download"
        cli = [f"python -m mctlib evaluate --preset {base.name} --baseline full --epochs {FULL_DATA_EPOCHS}"
               f"{download} --out {root}/full-{dataset}"]
        return {"preset": base.name, "approximate": False, "cli": cli,
                "papermill": _papermill(dataset, base.distill.ipc, base,
                                        f"{root}/chapter4-{dataset}-ipc{base.distill.ipc}"),
                "note": f"full-data ceiling, {FULL_DATA_EPOCHS} evaluation epochs (the chapter reports it next to "
                        f"IPC {base.distill.ipc})"}
    preset, approximate = experiment_preset(method, dataset, ipc)
    mtt = get_preset(preset_name("mtt", dataset, ipc))
    experts = _store_dir(mtt, root)
    download = "" if dataset == "tiny_imagenet" else " --data-download"
    cli = [f"python -m mctlib experts --preset {mtt.name}{download} --out {experts}"]
    store = experts
    if method == "mct":
        e = preset.expert
        store = f"{experts}-convex-K{e.num_waypoints}"
        cli.append(f"python -m mctlib convexify --store {experts} --out {store} --num-waypoints {e.num_waypoints} "
                   f"--beta-schedule {e.beta_schedule}")
    run = f"{root}/{preset.name}"
    if approximate:
        cli.append(f"python -m mctlib distill --preset {mtt.name} --method mct "
                   f"--lr-teacher {preset.distill.lr_teacher:g} --store {store} --out {run}")
    else:
        cli.append(f"python -m mctlib distill --preset {preset.name} --store {store} --out {run}")
    cli.append(f"python -m mctlib evaluate --preset {mtt.name if approximate else preset.name} "
               f"--synthetic {run}/synthetic_best.safetensors "
               f"--out {run}/evaluate-best")
    note = preset.note if approximate else ""
    if dataset == "tiny_imagenet":
        note = (note + "; " if note else "") + ("Tiny ImageNet cannot be downloaded by the CLI: "
                                                 "unzip it into $MCTLIB_DATA")
    return {"preset": preset.name if not approximate else mtt.name, "approximate": approximate, "cli": cli,
            "papermill": _papermill(dataset, ipc, preset, f"{root}/chapter4-{dataset}-ipc{ipc}"), "note": note}


def _papermill(dataset: str, ipc: int, preset: Preset, out: str) -> str:
    """Chapter 4 at paper scale for one dataset and IPC (its parameters cell names every -p used here)."""
    d, e, ev = preset.distill, preset.expert, preset.eval
    params = {"dataset": dataset, "ipcs": ipc, "num_seeds": 1, "iterations": d.iterations,
              "eval_every": d.eval_every, "num_eval": ev.num_eval, "eval_epochs": ev.epochs,
              "full_data_epochs": FULL_DATA_EPOCHS, "num_experts": e.num_experts, "expert_epochs": e.epochs,
              "run_ablations": False, "out_dir": out}
    flags = " ".join(f"-p {k} {shlex.quote(str(v))}" for k, v in params.items())
    return f"papermill notebooks/04_experiments.ipynb {out}.ipynb {flags}"


def published_table(root: str = PAPER_ROOT) -> list[dict]:
    """METHOD.md's reported accuracies, one dict per row, with the commands that reproduce each."""
    return [{"method": p.method, "dataset": p.dataset, "ipc": p.ipc, "accuracy": p.accuracy, "std": p.std,
             "source": p.source, **reproduce_commands(p.method, p.dataset, p.ipc, root)} for p in PUBLISHED]


def markdown_table(rows: list[dict]) -> str:
    """The published table as Markdown (accuracy, the preset, the distill command)."""
    lines = ["| method | dataset | IPC | reported acc. (%) | preset | distill command |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accuracy']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
        cmd = next((c for c in r["cli"] if " distill " in c or " evaluate --preset" in c and r["method"] == "full"), "")
        cmd = f"`{cmd}`" if cmd else "—"
        preset = f"`{r['preset']}`" + (" (approx.)" if r["approximate"] else "") if r["preset"] else "—"
        lines.append(f"| {r['method'].upper()} | {r['dataset']} | {r['ipc'] or 'all'} | {acc} | {preset} | {cmd} |")
    return "\n".join(lines)


@dataclass
class Setting:
    """Everything one IPC of the comparison needs: the data as the experts saw it, both presets, and
    the experts in both records (the convexified one made from the full one)."""

    ipc: int
    data: Dataset
    mtt: Preset
    mct: Preset
    approximate: bool
    store_full: TrajectoryStore
    store_convex: TrajectoryStore


@lru_cache(maxsize=4)
def _load_data(name: str, zca: bool) -> Dataset:
    from .data import load_dataset

    return load_dataset(name, zca=zca, download=name not in ("digits", "tiny_imagenet"))


def prepare_setting(dataset: str, ipc: int, num_experts: int, expert_epochs: int, seed: int,
                    runs_dir: str | Path, device=None, progress: bool = False) -> Setting:
    """The presets of both methods at (dataset, ipc), the data with their preprocessing, MTT's expert
    recipe (record 'full', `num_experts` x `expert_epochs`) through the chapters' shared expert cache,
    and the convexified record of those same experts (K, beta and smoothing of the MCT preset)."""
    from .notebook import cached_experts

    mtt, _ = experiment_preset("mtt", dataset, ipc)
    mct, approximate = experiment_preset("mct", dataset, ipc)
    if (mtt.data.name, mtt.data.zca) != (mct.data.name, mct.data.zca) or mtt.net != mct.net:
        raise ValueError(f"{mtt.name} and {mct.name} see different data or networks: they cannot share experts")
    data = _load_data(mtt.data.name, mtt.data.zca)
    expert_cfg = mtt.expert.replace(record="full", num_experts=num_experts, epochs=expert_epochs, seed=seed)
    store_full = cached_experts(data, mtt.net, expert_cfg, root=runs_dir, device=device, progress=progress)
    e = mct.expert
    store_convex = convexified_store(store_full, e.num_waypoints, e.beta_schedule, e.smooth)
    return Setting(ipc, data, mtt, mct, approximate, store_full, store_convex)


def command_argv(command: str) -> list[str] | None:
    """The argv after `python -m mctlib` of a CLI command (None for anything else)."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "mctlib"]:
        return words[3:]
    return None


# ---------------------------------------------------------------------------------------------
# Cost of a preset, estimated from counted FLOPs and saved activations (no GPU needed)
# ---------------------------------------------------------------------------------------------


def _probe_dataset_free(preset: Preset, images: int, steps: int, mode: str) -> tuple[float, float, int]:
    """(FLOPs, bytes saved for backward, aten ops) of one `match` on `images` random synthetic images
    with `steps` student steps, on CPU, with the preset's network and DSA."""
    from torch.autograd.graph import saved_tensors_hooks
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from .augment import make_augment
    from .matching import Student, match, plan_student

    net = preset.net
    model = FlatModel(build_network(net, seed=0))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(images, net.channels, net.image_size, net.image_size, generator=gen)
    y = torch.arange(images) % net.num_classes
    theta = model.flatten()
    target = theta + 1e-3 * torch.randn(theta.shape, generator=gen)
    plan = plan_student(images, steps, None, gen)
    student = Student(model, make_augment(preset.distill.dsa))
    alpha = torch.tensor(preset.distill.lr_teacher, requires_grad=True)
    x.requires_grad_(True)
    saved: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    counter = FlopCounterMode(display=False)
    with counter, Count(), saved_tensors_hooks(pack, lambda t: t):
        match(student, x, y, alpha, theta, target, plan, mode)
    return float(counter.get_total_flops()), float(sum(saved.values())), Count.ops


TRAIN_SIZE = {"cifar10": 50_000, "cifar100": 50_000, "tiny_imagenet": 100_000, "digits": 1347}


def estimate_cost(preset: Preset, throughput: float = 5e12, launch_seconds: float = 10e-6,
                  probe_images: int = 2) -> dict:
    """Estimated cost of one preset on a GPU, from quantities counted on the CPU.

    FLOPs, aten-op counts and the bytes the unrolled graph saves for backward are measured for one
    matching step on `probe_images` random images with one and with two student steps, then scaled to
    the preset's batch and syn_steps (all three are linear in them). Time per iteration =
    FLOPs / `throughput` + ops x `launch_seconds`. Activation memory by gradient mode: unrolled keeps
    every step's graph; constant_memory about one step's; checkpointed one step's plus the N kept
    parameter vectors. GPU memory adds the synthetic set (and its momentum, gradient) and every expert
    record, which `distill` moves to the device. Evaluation and experts: 3 forward FLOPs per image and
    epoch. The throughput and the launch latency are assumptions, not measurements."""
    from torch.utils.flop_counter import FlopCounterMode

    d, ev, e = preset.distill, preset.eval, preset.expert
    n_syn = d.ipc * preset.net.num_classes
    batch = min(d.batch_syn or n_syn, n_syn)
    scale = batch / probe_images
    f1, m1, o1 = _probe_dataset_free(preset, probe_images, 1, "unrolled")
    f2, m2, o2 = _probe_dataset_free(preset, probe_images, 2, "unrolled")
    flops = (f1 + (d.syn_steps - 1) * (f2 - f1)) * scale
    ops = o1 + (d.syn_steps - 1) * (o2 - o1)
    model = FlatModel(build_network(preset.net))
    activations = {"unrolled": (m1 + (d.syn_steps - 1) * (m2 - m1)) * scale,
                   "constant_memory": m1 * scale,
                   "checkpointed": m1 * scale + 4 * d.syn_steps * model.numel}
    fwd = FlopCounterMode(display=False)
    with fwd, torch.no_grad():
        model.module(torch.zeros(1, preset.net.channels, preset.net.image_size, preset.net.image_size))
    fwd_flops = float(fwd.get_total_flops())
    seconds = flops / throughput + ops * launch_seconds
    pixels = n_syn * preset.net.channels * preset.net.image_size ** 2
    record_vectors = e.epochs + 1 if e.record == "full" else e.num_waypoints
    fixed = 4 * (3 * pixels + e.num_experts * record_vectors * model.numel)
    evals = d.iterations // d.eval_every + 1 if d.eval_every else 0
    eval_flops = ev.num_eval * ev.epochs * n_syn * 3 * fwd_flops
    expert_flops = e.num_experts * e.epochs * TRAIN_SIZE.get(preset.data.name, 50_000) * 3 * fwd_flops
    return {"preset": preset.name, "parameters": model.numel, "forward_flops_per_image": fwd_flops,
            "flops_per_iteration": flops, "ops_per_iteration": ops, "seconds_per_iteration": seconds,
            "distill_hours": d.iterations * seconds / 3600, "activation_bytes": activations[d.gradient_mode],
            "gpu_bytes": activations[d.gradient_mode] + fixed,
            "gpu_bytes_by_mode": {m: a + fixed for m, a in activations.items()}, "records_bytes": fixed,
            "evaluations": evals, "hours_per_evaluation": eval_flops / throughput / 3600,
            "eval_hours": evals * eval_flops / throughput / 3600, "expert_hours": expert_flops / throughput / 3600,
            "throughput": throughput, "launch_seconds": launch_seconds}
