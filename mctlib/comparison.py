"""MTT against MCT from the same experts (chapter 4): variants x seeds, the tidy table they make,
the paired statistics read from it, and one-at-a-time ablations of MCT's choices."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .config import DataConfig, DistillConfig, EvalConfig, Preset, get_preset
from .data import DATASET_INFO, Dataset, load_data
from .distill import DivergenceError, evaluated
from .evaluate import EvalResult
from .notebook import cached_experts, config_key
from .published import experiment_preset
from .records import FULL, RecordSpec, convexified_store, record_spec, store_for
from .runs import RunResult, _compute_run, _finished, _quiet_run_or_load, baselines_or_load
from .stats import area_under_curve, paired, successive_noise
from .storage import TrajectoryStore
from .workers import parallel_jobs


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
        """label_b minus label_a, seed by seed (`per_seed`; seeds where both have a finite value), with its
        95 % t-interval (`stats.paired`). Pairing by seed removes what the two runs of a seed share: the
        initial images and the evaluation networks' seeds."""
        return paired(self.per_seed(label_a, key, iteration), self.per_seed(label_b, key, iteration))

    def gain(self, label: str, key: str = "final_acc", over: str = "initial_acc") -> dict:
        """Each run's `key` minus its own `over` (by default its final accuracy over its iteration-0
        evaluation: the set it started from, with the same networks), with its t-interval over seeds."""
        return paired(self.per_seed(label, over), self.per_seed(label, key))

    def format(self) -> str:
        """The summary as a fixed-width text table (accuracies in %)."""
        lines = [f"{'setting':28s} {'ipc':>3s} {'seeds':>5s} {'best acc (%)':>14s} {'final acc (%)':>14s} {'s/it':>6s}"]
        for s in self.summary():
            lines.append(f"{s['label']:28s} {s['ipc']:3d} {s['seeds']:5d} "
                         f"{100 * s['best_acc_mean']:7.2f} ± {100 * s['best_acc_std']:4.2f} "
                         f"{100 * s['final_acc_mean']:7.2f} ± {100 * s['final_acc_std']:4.2f} "
                         f"{s['seconds_per_iteration_mean']:6.3f}")
        return "\n".join(lines)


def _final_eval(result: RunResult) -> dict | None:
    """The evaluation of the run's last iteration, or None when it did not run (skipped because alpha <= 0
    there, or never scheduled). Never an earlier evaluation in its place."""
    last = len(result.log)
    return next((e for e in result.evals if e["iteration"] == last and "skipped" not in e), None)


def _row(variant: Variant, seed: int, result: RunResult | None, error: str | None) -> dict:
    cfg = variant.distill
    row = {"label": variant.label, "method": cfg.method, "ipc": cfg.ipc, "seed": seed,
           "sampling": cfg.resolved_sampling, "gradient_mode": cfg.gradient_mode, "record": variant.record.label,
           "lr_lr": cfg.lr_lr, "status": "diverged" if error else result.status, "error": error}
    if result is None:
        return {**row, "best_acc": math.nan, "best_std": math.nan, "best_iteration": None, "final_acc": math.nan,
                "final_std": math.nan, "final_skipped": False, "initial_acc": math.nan, "auc": math.nan,
                "seconds_per_iteration": math.nan, "iterations": 0, "alpha": math.nan, "first_loss": math.nan,
                "final_loss": math.nan, "loss_fluctuation": math.nan, "loss_noise": math.nan, "loss_curve": [],
                "eval_curve": [], "alpha_nonpositive_iterations": [], "skipped_evals": [], "run_dir": None}
    best, final = result.best, _final_eval(result)
    losses = result.losses
    tail = losses[-10:]
    late = losses[len(losses) // 2:]
    fluctuation = statistics.pstdev(late) / statistics.fmean(late) if len(late) > 1 else math.nan
    curve = [(e["iteration"], e["mean"]) for e in evaluated(result.evals)]
    skipped = [e for e in result.evals if "skipped" in e]
    initial = dict(curve).get(0, math.nan)
    # The area under the accuracy curve, only where every scheduled evaluation ran (a skipped point would
    # make the area of one seed cover other iterations than another's).
    auc = area_under_curve(*zip(*curve)) if len(curve) > 1 and not skipped and final else math.nan
    return {**row, "best_acc": best["mean"] if best else math.nan, "best_std": best["std"] if best else math.nan,
            "best_iteration": best["iteration"] if best else None,
            "final_acc": final["mean"] if final else math.nan, "final_std": final["std"] if final else math.nan,
            "final_skipped": final is None, "initial_acc": initial, "auc": auc,
            "seconds_per_iteration": result.seconds_per_iteration, "iterations": len(result.log),
            "alpha": result.alpha, "first_loss": losses[0] if losses else math.nan,
            "final_loss": statistics.fmean(tail) if tail else math.nan,
            "loss_fluctuation": fluctuation, "loss_noise": successive_noise(losses),
            "loss_curve": losses, "eval_curve": curve,
            "alpha_nonpositive_iterations": result.alpha_nonpositive_iterations,
            "skipped_evals": skipped, "run_dir": str(result.run_dir)}


def run_variants(variants: Iterable[Variant], seeds: Iterable[int], dataset: Dataset, store_full: TrajectoryStore,
                 eval_cfg: EvalConfig | None, runs_dir: str | Path = "runs", stores: dict | None = None,
                 prefix: str = "", device=None, progress: bool = False, workers: int = 1,
                 eval_seed: int | None = None) -> Comparison:
    """Every variant at every seed through `run_or_load`. The seed sets the initial subset, the window
    sampling and the evaluation networks; a run that diverges becomes a row with status 'diverged'.
    With workers > 1 the runs not yet on disk are computed in parallel processes (`parallel_jobs`)
    first, then every run is loaded. `eval_seed` fixes the evaluation networks of every seed; a variant
    whose `init_seed` equals a seed is that seed's ordinary run (the same run name)."""
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
            if cfg.init_seed == cfg.seed:
                cfg = cfg.replace(init_seed=None)
            ev = eval_cfg.replace(seed=int(seed if eval_seed is None else eval_seed)) if eval_cfg is not None else None
            plan.append((variant, seed, run_name(cfg, variant.record, store_full, ev, prefix), cfg, store, ev))
    todo = [(name, cfg, store, ev) for _, _, name, cfg, store, ev in plan if not _finished(Path(runs_dir) / name, cfg)]
    initial = _initial_evaluations(todo, dataset, store_full.net, runs_dir, device, workers, progress)
    pending = [(name, cfg, str(store.path), dataset, ev, str(runs_dir), device, initial.get(name))
               for name, cfg, store, ev in todo]
    if workers > 1 and len(pending) > 1:
        parallel_jobs(_compute_run, pending, workers, progress, desc="distillation runs")
    rows, runs = [], {}
    for variant, seed, name, cfg, store, ev in plan:
        try:
            result = _quiet_run_or_load(name, cfg, store, dataset, ev, runs_dir, device, progress, initial.get(name))
            error = None
        except DivergenceError as err:
            result, error = None, str(err)
        rows.append(_row(variant, int(seed), result, error))
        runs[(variant.label, int(seed))] = result
    return Comparison(rows, runs)


def _initial_evaluations(todo: list[tuple], dataset: Dataset, net, runs_dir: str | Path, device, workers: int,
                         progress: bool) -> dict[str, list]:
    """{run name: its iteration-0 evaluation}, each distinct one computed once, in parallel: runs that start
    from the same images with the same initial alpha and networks (MTT and MCT of a seed, the sampling
    seeds of one image set, the ablations) share one evaluation instead of repeating it."""
    jobs = {}
    for name, cfg, _, ev in todo:
        if ev is not None and (cfg.eval_every or cfg.eval_at):
            # alpha as the run holds it (a float32 tensor), so the evaluation is the one the run would make
            jobs[name] = {"kind": "initial_images", "eval_cfg": ev, "init": cfg,
                          "lr": float(torch.tensor(cfg.lr_teacher, dtype=torch.float32))}
    results = baselines_or_load(list(jobs.values()), dataset, net, runs_dir, device, workers, progress,
                                desc="initial evaluations", archs=True)
    return dict(zip(jobs, results))


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
                    device=None, progress: bool = False, workers: int = 1, eval_seed: int | None = None) -> Comparison:
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
                        workers, eval_seed)


def sampling_spread(dataset: Dataset, configs: Iterable[DistillConfig], seed: int, count: int,
                    store_full: TrajectoryStore, store_convex: TrajectoryStore, eval_cfg: EvalConfig,
                    runs_dir: str | Path = "runs", prefix: str = "", device=None, progress: bool = False,
                    workers: int = 1) -> Comparison:
    """Both methods at `count` sampling seeds (seed, seed + 1, ...) that share the initial images and the
    evaluation networks of `seed`: only the sampled windows (expert, start, minibatches, DSA) differ, so
    the spread of their accuracies is the method's own instability, not the choice of images. With the
    main comparison's configs and prefix, the run of `seed` itself is that comparison's run."""
    configs = [c.replace(init_seed=seed) for c in configs]
    return compare_methods(dataset, configs, range(seed, seed + count), store_full, store_convex, eval_cfg, runs_dir,
                           prefix, device, progress, workers, eval_seed=seed)


ABLATIONS = ("sampling", "beta_schedule", "num_waypoints", "gradient_mode")


def ablation_variants(kind: str, base: DistillConfig, record: RecordSpec = RecordSpec()) -> list[Variant]:
    """The base MCT setting first, then each alternative of one choice (the labels):
    sampling (continuous / integer tau on the same convexified record), beta_schedule (arc_length /
    uniform / projected), num_waypoints (the record's K / K 4, or 2 when the record has 4), gradient_mode (unrolled / constant_memory / checkpointed)."""
    if base.method != "mct":
        raise ValueError(f"ablations vary MCT's choices; the base config has method {base.method!r}")
    base = base.replace(sampling=None)
    if kind == "sampling":
        return [Variant("continuous", base, record), Variant("integer", base.replace(sampling="integer"), record)]
    if kind == "beta_schedule":
        return [Variant(s, base, RecordSpec("convex", record.num_waypoints, s, record.smooth))
                for s in ("arc_length", "uniform", "projected")]
    if kind == "num_waypoints":
        other = 4 if record.num_waypoints != 4 else 2
        return [Variant(f"K{k}", base, RecordSpec("convex", k, record.beta_schedule, record.smooth))
                for k in (record.num_waypoints, other)]
    if kind == "gradient_mode":
        return [Variant(m, base.replace(gradient_mode=m), record)
                for m in ("unrolled", "constant_memory", "checkpointed")]
    raise ValueError(f"unknown ablation {kind!r}; choose one of {list(ABLATIONS)}")


def run_ablation(kind: str, base: DistillConfig, seeds: Iterable[int], dataset: Dataset, store_full: TrajectoryStore,
                 eval_cfg: EvalConfig | None, runs_dir: str | Path = "runs", prefix: str = "", device=None,
                 progress: bool = False, workers: int = 1, record: RecordSpec = RecordSpec()) -> Comparison:
    """One ablation around `base` matching `record`; runs shared between ablations (the base setting) are
    computed once and loaded after."""
    return run_variants(ablation_variants(kind, base, record), seeds, dataset, store_full, eval_cfg, runs_dir,
                        prefix=prefix, device=device, progress=progress, workers=workers)


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
def _load_data(data: str) -> Dataset:
    # keyed by the config's JSON: a DataConfig is not hashable; downloads where the dataset allows it
    cfg = DataConfig.from_dict(json.loads(data))
    return load_data(cfg.replace(download=DATASET_INFO[cfg.name].downloadable))


def prepare_setting(dataset: str, ipc: int, num_experts: int, expert_epochs: int, seed: int,
                    runs_dir: str | Path, device=None, progress: bool = False, num_waypoints: int | None = None,
                    cpu: bool = False, workers: int = 1) -> Setting:
    """The presets of both methods at (dataset, ipc) (with `cpu`, the dataset's CPU setting where it has
    one), the data with their preprocessing, MTT's expert recipe (record 'full', `num_experts` x
    `expert_epochs`) through the chapters' shared expert cache, and the convexified record of those same
    experts (K = `num_waypoints`, else the MCT preset's, with its beta schedule and smoothing). The
    experts train in `workers` processes at once (`notebook.cached_experts`)."""
    mtt, _ = experiment_preset("mtt", dataset, ipc, cpu)
    mct, approximate = experiment_preset("mct", dataset, ipc, cpu)
    if mtt.data != mct.data or mtt.net != mct.net:
        raise ValueError(f"{mtt.name} and {mct.name} see different data or networks: they cannot share experts")
    data = _load_data(json.dumps(mtt.data.to_dict(), sort_keys=True))
    expert_cfg = mtt.expert.replace(record="full", num_experts=num_experts, epochs=expert_epochs, seed=seed)
    store_full = cached_experts(data, mtt.net, expert_cfg, root=runs_dir, device=device, progress=progress,
                                workers=workers)
    e = mct.expert
    store_convex = convexified_store(store_full, num_waypoints or e.num_waypoints, e.beta_schedule, e.smooth)
    return Setting(ipc, data, mtt, mct, approximate, store_full, store_convex)


RUNAWAY_LOSS = 1.0  # the normalised matching loss of a student that does not move: ||0 - V_T||^2 / ||V_T||^2


def diverged(row: dict) -> bool:
    """The lr_lr rule's test of one run, fixed before the runs: the engine stopped it (non-finite values,
    or the images or the loss running away), or it ended matching worse than a student that does not
    move at all (the mean loss of its last ten iterations above 1, chapter 1's objective at V_S = 0)."""
    return row["status"] == "diverged" or not row["final_loss"] <= RUNAWAY_LOSS


def lr_lr_rule(candidates: Iterable[float], compare: Callable[[float], Comparison]) -> tuple[float | None, dict]:
    """The largest lr_lr among `candidates` at which no run of either method diverges (`diverged`), over
    every seed: `compare(lr_lr)` runs the whole comparison at one value. Candidates are tried from the
    largest down and the first that passes is chosen; every comparison tried is returned, so the runs
    that ran away stay visible. Returns (chosen lr_lr or None if every candidate failed, {lr_lr: Comparison})."""
    tried = {}
    for lr_lr in sorted(candidates, reverse=True):
        tried[lr_lr] = compare(lr_lr)
        if not any(diverged(r) for r in tried[lr_lr].rows):
            return lr_lr, tried
    return None, tried


def learned_alpha_controls(comparison: Comparison, dataset: Dataset, net, eval_cfg: EvalConfig,
                           runs_dir: str | Path = "runs", device=None, workers: int = 1,
                           progress: bool = False) -> dict[tuple[str, int], float]:
    """{(label, seed): accuracy} of each run's initial images S_0 trained with the run's final alpha, by the
    same networks as the run's evaluations (METHOD.md: the evaluation trains with the learned alpha, so a
    gain mixes image learning and lr learning; this control separates the two). NaN where the run
    diverged or ended with alpha <= 0."""
    keys, jobs = [], []
    for (label, seed), run in comparison.runs.items():
        if run is None or not run.alpha > 0:
            continue
        cfg = DistillConfig.from_dict(run.config["distill"])
        keys.append((label, seed))
        jobs.append({"kind": "initial_images", "eval_cfg": eval_cfg.replace(seed=seed), "lr": run.alpha, "init": cfg})
    results = baselines_or_load(jobs, dataset, net, runs_dir, device, workers, progress, desc="learned-alpha controls")
    out = {key: math.nan for key in comparison.runs}
    out.update({key: r.mean for key, r in zip(keys, results)})
    return out


def reference_baselines(settings: Mapping[int, Setting], eval_cfgs: Mapping[int, EvalConfig], subsets: int,
                        full_data_epochs: int, runs_dir: str | Path = "runs", device=None, workers: int = 1,
                        progress: bool = False) -> tuple[dict[int, list[EvalResult]], float, str]:
    """The two references of chapter 4, computed together in parallel and cached: `subsets` random real
    subsets per IPC (subset k drawn, and its networks seeded, with the eval seed + k; lr 0.01) and a
    full-data figure for the first setting. With `full_data_epochs` > 0 that is networks trained for
    that many epochs under the evaluation protocol on the whole training set; with 0, the experts' own
    mean test accuracy (networks trained on the whole training set already, with the experts' recipe).
    Returns ({ipc: results}, full-data accuracy, how it was obtained)."""
    ipcs = list(settings)
    first = settings[ipcs[0]]
    jobs = [{"kind": "random_real", "eval_cfg": eval_cfgs[ipc].replace(seed=eval_cfgs[ipc].seed + k), "ipc": ipc}
            for ipc in ipcs for k in range(subsets)]
    if full_data_epochs:
        jobs.append({"kind": "full", "eval_cfg": eval_cfgs[ipcs[0]].replace(epochs=full_data_epochs)})
    results = baselines_or_load(jobs, first.data, first.store_full.net, runs_dir, device, workers, progress,
                                desc="baselines")
    random_real = {ipc: results[i * subsets:(i + 1) * subsets] for i, ipc in enumerate(ipcs)}
    if full_data_epochs:
        return random_real, results[-1].mean, f"{full_data_epochs} epochs under the evaluation protocol"
    e = first.store_full.manifest["recipe"]
    accuracies = first.store_full.manifest["stats"]["test_accuracy"]
    return random_real, sum(accuracies) / len(accuracies), (
        f"the {len(accuracies)} experts: {e['epochs']} epochs of plain SGD at batch {e['batch_size']}")
