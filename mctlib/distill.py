"""The distillation loop: learn S and alpha by matching expert trajectories (MTT or MCT).

Each iteration samples an expert and a window (tau_start, tau_target) on its trajectory, runs
the student from theta(tau_start) for syn_steps steps on S, and takes one SGD-momentum step on
S and alpha against the matching loss. What the run leaves on disk (config, metrics, the best and
final synthetic sets, the checkpoint from which `resume=True` continues to the same result as an
uninterrupted run) and its checks live in `rundir.py`; this module is the algorithm.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .augment import make_augment
from .config import DistillConfig, EvalConfig
from .data import Dataset, real_images_per_class
from .device import compute_identity, precision_context, resolve_device, versions
from .evaluate import evaluate_synthetic
from .matching import Student, match, plan_student
from .networks import FlatModel, build_network
from .distributed import check_resume_world_size
from .rundir import (CHECKPOINT, LEGACY_COMPUTE, RESUMABLE_CHANGES, STEP_SIZE_CHANGES, SYNTHETIC_BEST,  # noqa: F401
                     SYNTHETIC_FINAL, Checkpoint, CheckpointError, RunFolder, config_differences, load_synthetic)
from .storage import TrajectoryStore, check_match
from .training import derive_seed
from .trajectories import sample_window

# A run whose images or loss run away is stopped like one that reaches NaN: pixel RMS above this many
# times the real data's, or a matching loss this many times the median of the run's first iterations.
# Measured on 8x8 digits, 200 MCT iterations: lr_img 1e2 / 1e3 / 1e4 end at 2.4 / 7.7 / 43 times the
# data's RMS with the loss at most 1.4 times its start (a ConvNet with instance norm does not mind the
# scale), while lr_img 1e9 is at 2e6 times after one iteration and its set scores 6 %.
RUNAWAY_PIXEL_RMS = 1e4
RUNAWAY_LOSS = 1e4


class DivergenceError(FloatingPointError):
    """Non-finite or runaway loss, images or alpha: the run stopped, its last good state kept.

    `field` is the step size to lower ("lr_img" or "lr_lr") and `suggested` a value to resume with.
    A non-positive alpha is not a divergence: the published code lets SGD with momentum carry alpha
    below zero for an iteration or two early in a run and finishes well (METHOD.md). Such
    iterations are counted, and an evaluation that falls on one is recorded as skipped."""

    def __init__(self, message: str, field: str | None = None, suggested: float | None = None) -> None:
        super().__init__(message)
        self.field, self.suggested = field, suggested


class AlphaNonPositiveWarning(UserWarning):
    """The learned lr alpha is <= 0 at some iteration (the run continues; see DivergenceError)."""


@dataclass
class DistillResult:
    images: torch.Tensor
    labels: torch.Tensor
    alpha: float
    log: list[dict]
    evals: list[dict]
    run_dir: Path | None = None
    best: dict | None = None
    config: dict = field(default_factory=dict)
    step_size_changes: list = field(default_factory=list)   # lr_img / lr_lr changed on resume, with the iteration

    @property
    def final(self) -> dict | None:
        """The last evaluation that ran."""
        ran = evaluated(self.evals)
        return ran[-1] if ran else None

    @property
    def alpha_nonpositive_iterations(self) -> list[int]:
        return [entry["iteration"] for entry in self.log if entry["alpha"] <= 0]


@dataclass
class _State:
    images: torch.Tensor
    labels: torch.Tensor
    alpha: torch.Tensor
    img_velocity: torch.Tensor
    lr_velocity: torch.Tensor
    generator: torch.Generator
    iteration: int = 0
    log: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    changes: list = field(default_factory=list)   # step sizes changed on resume

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"images": self.images.detach().cpu().contiguous(), "labels": self.labels.cpu().contiguous(),
                "alpha": self.alpha.detach().cpu().reshape(1), "img_velocity": self.img_velocity.cpu().contiguous(),
                "lr_velocity": self.lr_velocity.cpu().reshape(1), "rng": self.generator.get_state()}

    def info(self) -> dict:
        return {"iteration": self.iteration, "log": self.log, "evals": self.evals, "changes": self.changes}

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, config: dict, device) -> "_State":
        """The checkpoint's state, with the step sizes that changed since it was written recorded."""
        t, info = ckpt.tensors, ckpt.state
        state = cls(t["images"].to(device), t["labels"].to(device), t["alpha"].to(device).reshape(()),
                    t["img_velocity"].to(device), t["lr_velocity"].to(device).reshape(()),
                    torch.Generator().set_state(t["rng"]), info["iteration"], info["log"], info["evals"],
                    info.get("changes", []))
        for name in STEP_SIZE_CHANGES:
            before, now = ckpt.config["distill"][name], config["distill"][name]
            if before != now:
                state.changes.append({"iteration": state.iteration, "field": name, "from": before, "to": now})
        return state

    def snapshot(self) -> "_State":
        gen = torch.Generator().set_state(self.generator.get_state())
        return _State(self.images.detach().clone(), self.labels, self.alpha.detach().clone(),
                      self.img_velocity.clone(), self.lr_velocity.clone(), gen, self.iteration,
                      list(self.log), list(self.evals), list(self.changes))


def initial_synthetic(dataset: Dataset, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """S_0: `ipc` real images per class (default) or Gaussian noise, with class-sorted labels."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed if cfg.init_seed is None else cfg.init_seed, 1))
    images, labels = real_images_per_class(dataset.train_images, dataset.train_labels, dataset.num_classes,
                                           cfg.ipc, gen)
    if cfg.init == "noise":
        images = torch.randn(images.shape, generator=gen)
    return images.clone(), labels.clone()


def _check_store(cfg: DistillConfig, store: TrajectoryStore, dataset: Dataset) -> None:
    if cfg.method == "mct" and store.kind != "convex":
        raise ValueError(f"method 'mct' matches a convexified record but {store.path} holds full buffers; "
                         f"convert them with `mctlib convexify --store {store.path} --out DIR`")
    if store.kind == "convex" and cfg.method == "mtt":
        raise ValueError(f"method 'mtt' matches full buffers but {store.path} holds convexified records; "
                         "use method 'mct' (with sampling 'integer' for the integer-start ablation)")
    check_match(store.manifest, None, dataset.describe(), store.path)
    epochs = store.records[0].epochs
    if cfg.expert_epochs >= epochs:
        raise ValueError(f"expert_epochs = {cfg.expert_epochs} must be below the experts' {epochs} epochs")
    # Every window must end on the trajectory: a start past E - M would be cut at E (a shorter window
    # that the loss does not expect), so the value is refused rather than clamped. MTT draws integer
    # starts 0 .. max_start_epoch - 1, MCT continuous starts in [0, max_start_epoch).
    largest = epochs - cfg.expert_epochs + (1 if cfg.resolved_sampling == "integer" else 0)
    if cfg.max_start_epoch > largest:
        raise ValueError(f"max_start_epoch = {cfg.max_start_epoch:g} is beyond what {store.path} allows: its experts "
                         f"have {epochs} epochs and windows of expert_epochs = {cfg.expert_epochs:g} must end by "
                         f"then, so the largest allowed max_start_epoch is {largest:g}")


def _config_diff(saved: dict, now: dict) -> str:
    """The settings that differ between a checkpoint's config and this run's (see rundir.config_differences)."""
    return "; ".join(config_differences(saved, now, RESUMABLE_CHANGES | {f"distill.{n}" for n in STEP_SIZE_CHANGES}))


def run_config(cfg: DistillConfig, store: TrajectoryStore, dataset: Dataset, eval_cfg: EvalConfig | None,
               device=None, precision: str = "fp32") -> dict:
    """What decides the computation of a run, as config.json holds it (and resume compares it): the
    configs, the data, the store by its content (the experts' checksums), not by its path, and where
    and how it computes (device name and precision: DSA's draws and the rounding depend on them)."""
    config = {"distill": cfg.to_dict(), "eval": eval_cfg.to_dict() if eval_cfg else None, "net": store.net.to_dict(),
              "dataset": dataset.describe(),
              "store": {"kind": store.kind, "experts": [e["sha256"] for e in store.manifest["experts"]]},
              "compute": compute_identity(resolve_device(device), precision)}
    return json.loads(json.dumps(config))  # the form it has on disk (tuples become lists)


def distill(cfg: DistillConfig, store: TrajectoryStore, dataset: Dataset, eval_cfg: EvalConfig | None = None,
            run_dir: str | Path | RunFolder | None = None, resume: bool = False, device=None, progress: bool = True,
            run_info: dict | None = None, group=None, precision: str = "fp32",
            initial_eval: list | None = None) -> DistillResult:
    """Run (or resume) one distillation; see the module docstring for what lands in `run_dir` (a path,
    locked and checked here, or a `RunFolder` the caller opened). `precision` (fp32, tf32, bf16; see
    device.precision_context) applies to the student's steps. `initial_eval`: the iteration-0
    evaluation computed beforehand (EvalResults of S_0 with the initial alpha by `eval_cfg`'s networks),
    recorded instead of evaluating again; runs that start alike share it.

    `group` (a `distributed.Group`, from torchrun): the synthetic set's gradient is computed in shards
    over the ranks, every rank holds the same S and alpha, and rank 0 writes the run directory."""
    device = resolve_device(device) if group is None else group.device
    _check_store(cfg, store, dataset)
    config = run_config(cfg, store, dataset, eval_cfg, device, precision)
    writes = group is None or group.writer
    if group is not None:
        group.check_world_size(cfg.ipc * dataset.num_classes)
        if group.world_size > 1:
            config["world_size"] = group.world_size   # compared on resume like every other setting
    opened = not isinstance(run_dir, RunFolder)
    folder = RunFolder.open(run_dir, resume, writes) if opened else run_dir
    try:
        state = _start(cfg, dataset, config, folder, resume, group, device)
        if group is not None:
            # Every rank has checked the folder before rank 0 writes to it. Every rank reads versions() (slow:
            # it imports torchvision), so that no rank waits at a collective while rank 0 alone does.
            about = versions() if folder.path is not None else None
            group.barrier("the start of distillation")
        # run_info (command line, preset name) is recorded but, unlike `config`, not compared on resume.
        if folder.writes:
            folder.write_config({**config, "seed": cfg.seed, "versions": about if group is not None else versions(device),
                                 "run": {"store_path": str(store.path), **(run_info or {})}})
        best = _iterate(cfg, store, dataset, eval_cfg, state, folder, config, device, progress, group, precision,
                        initial_eval)
        folder.synthetic(SYNTHETIC_FINAL, state.images, state.labels, float(state.alpha), _settings(config),
                         {"iteration": state.iteration})
        folder.write_metrics(_metrics(state, best, config))
    finally:
        if opened:
            folder.close()
    if group is not None:
        group.barrier("the end of distillation")  # on return, on any rank, the run directory is complete
    return DistillResult(state.images.detach(), state.labels, float(state.alpha), state.log, state.evals,
                         folder.path, best, config, state.changes)


def _start(cfg: DistillConfig, dataset: Dataset, config: dict, folder: RunFolder, resume: bool, group,
           device) -> _State:
    """The state to start from: the verified checkpoint when resuming one, else S_0 and alpha_0."""
    if resume:
        check_resume_world_size(folder.path, 1 if group is None else group.world_size)
        ckpt = folder.resume(config)
        if ckpt is not None:
            return _State.from_checkpoint(ckpt, config, device)
    images, labels = initial_synthetic(dataset, cfg)
    images = images.to(device)
    return _State(images, labels.to(device), torch.tensor(cfg.lr_teacher, device=device), torch.zeros_like(images),
                  torch.zeros((), device=device), torch.Generator().manual_seed(derive_seed(cfg.seed, 2)))


def _settings(config: dict) -> dict:
    """What evaluation needs to train on a synthetic set, saved (checksummed) inside it."""
    return {"net": config["net"], "dataset": config["dataset"], "ipc": config["distill"]["ipc"]}


def _iterate(cfg: DistillConfig, store: TrajectoryStore, dataset: Dataset, eval_cfg: EvalConfig | None,
             state: _State, folder: RunFolder, config: dict, device, progress: bool, group,
             precision: str, initial_eval: list | None = None) -> dict | None:
    """The loop: a matching step, an evaluation when due, a checkpoint when due. Returns the best evaluation."""
    model = FlatModel(build_network(store.net)).to(device)
    student = Student(model, make_augment(cfg.dsa)) if group is None else group.student(model, make_augment(cfg.dsa))
    records = [r.to(device) for r in store.records]          # moved once, not per iteration
    best = max(evaluated(state.evals), key=lambda e: e["mean"], default=None)
    warned = any(entry["alpha"] <= 0 for entry in state.log)
    data_rms = _rms(dataset.train_images)

    def evaluate_now(it: int, results: list | None = None) -> None:
        nonlocal best
        entry = _evaluation(it, state, dataset, store, eval_cfg, device, group, precision, results)
        state.evals.append(entry)
        if "skipped" not in entry and (best is None or entry["mean"] > best["mean"]):
            best = entry
            folder.synthetic(SYNTHETIC_BEST, state.images, state.labels, float(state.alpha), _settings(config),
                             {"iteration": it, "eval": entry})

    bar = None
    if progress and (group is None or group.writer):
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=state.iteration, desc=f"distill {cfg.method}", leave=False)
    if eval_cfg is not None and state.iteration == 0 and not state.evals and (cfg.eval_every or cfg.eval_at):
        evaluate_now(0, initial_eval)
    while state.iteration < cfg.iterations:
        good = state.snapshot()
        it = state.iteration + 1
        tick = time.perf_counter()
        loss, alpha_now, finite, rms, entry = _step(cfg, state, records, student, device, group, precision)
        cause, to_lower = _divergence(loss, finite, rms, alpha_now, cfg, data_rms, state.log)
        if cause:
            folder.checkpoint(good.tensors(), good.info(), config)
            suggested = float(f"{getattr(cfg, to_lower) / 10:.3g}")
            where = (f"; the last good state (iteration {good.iteration}) is saved in {folder / CHECKPOINT}: "
                     f"resume it with a lower {to_lower}, e.g. {suggested:g}" if folder.path else "")
            raise DivergenceError(f"distillation diverged at iteration {it}: {cause}{where}", to_lower, suggested)
        state.iteration = it
        state.log.append({"iteration": it, **entry, "seconds": time.perf_counter() - tick})
        if alpha_now <= 0 and not warned:
            warned = True
            warnings.warn(f"the learned lr alpha crossed zero at iteration {it} (alpha = {alpha_now:.3g}); the run "
                          "goes on, as the published code does, and counts such iterations in metrics.json "
                          "(alpha_nonpositive_iterations)", AlphaNonPositiveWarning, stacklevel=3)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", alpha=f"{alpha_now:.4g}")
        if eval_cfg is not None and ((cfg.eval_every and (it % cfg.eval_every == 0 or it == cfg.iterations))
                                     or it in cfg.eval_at):
            evaluate_now(it)
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            folder.checkpoint(state.tensors(), state.info(), config)
            folder.write_metrics(_metrics(state, best, config))
    if bar is not None:
        bar.close()
    return best


def _step(cfg: DistillConfig, state: _State, records: list, student, device, group, precision: str) -> tuple:
    """One iteration (METHOD.md, "Distillation"): sample an expert and a window, run the student from
    theta(tau_start) on S, match theta(tau_target), and take one SGD-momentum step on S and alpha.
    Returns (loss, alpha, S finite, S's pixel RMS, the log entry's fields)."""
    expert = int(torch.randint(len(records), (1,), generator=state.generator))
    record = records[expert]
    tau_start, tau_target = sample_window(state.generator, cfg.resolved_sampling, cfg.expert_epochs,
                                          cfg.max_start_epoch, record.epochs)
    plan = plan_student(state.images.shape[0], cfg.syn_steps, cfg.batch_syn, state.generator, device)
    images = state.images.requires_grad_(True)
    alpha = state.alpha.requires_grad_(True)
    images.grad, alpha.grad = None, None
    with precision_context(precision, device):
        result = match(student, images, state.labels, alpha, record.point(tau_start), record.point(tau_target),
                       plan, cfg.gradient_mode)
    if group is not None:
        group.sum_image_grad(images)
    with torch.no_grad():
        # SGD with momentum 0.5 on S and alpha (the papers' optimiser), written out so its state is two tensors.
        state.img_velocity.mul_(cfg.momentum).add_(images.grad)
        state.lr_velocity.mul_(cfg.momentum).add_(alpha.grad)
        state.images = (images - cfg.lr_img * state.img_velocity).detach()
        state.alpha = (alpha - cfg.lr_lr * state.lr_velocity).detach()
    # The iteration's one read-back from the device: loss, alpha, whether S is finite and its norm.
    loss, _, alpha_now, finite, norm = result.read(state.alpha, torch.isfinite(state.images).all(),
                                                    torch.linalg.vector_norm(state.images.detach()))
    rms = norm / math.sqrt(max(state.images.numel(), 1))
    entry = {"loss": loss, "tau_start": tau_start, "tau_target": tau_target, "alpha": alpha_now, "expert": expert}
    return loss, alpha_now, bool(finite), rms, entry


def _evaluation(it: int, state: _State, dataset: Dataset, store: TrajectoryStore, eval_cfg: EvalConfig, device,
                group, precision: str, results: list | None = None) -> dict:
    """The evaluation entry of iteration `it` (METHOD.md, "Evaluation"), or why it was skipped; `results`
    when it was computed beforehand."""
    alpha_now = float(state.alpha)
    if alpha_now <= 0:
        # Training networks with a non-positive lr would ascend the loss; the published code evaluates
        # with lr = alpha regardless, we record why this evaluation did not run.
        return {"iteration": it, "skipped": f"alpha = {alpha_now:.3g} <= 0 at this iteration"}
    if results is None:
        results = evaluate_synthetic(state.images, state.labels, alpha_now, dataset, store.net, eval_cfg, device,
                                     share=group, precision=precision)
    return {"iteration": it, "mean": results[0].mean, "std": results[0].std, "accuracies": results[0].accuracies,
            "archs": [r.to_dict() for r in results]}


def _divergence(loss: float, images_finite: bool, rms: float, alpha: float, cfg: DistillConfig, data_rms: float,
                log: list[dict]) -> tuple[str | None, str]:
    """(what went wrong, the step size to lower), or (None, "") for a healthy iteration. The images
    come in as read back once per iteration: finite or not, and their pixel RMS."""
    # alpha far from where it started means lr_lr moved it; otherwise the image step is to blame.
    alpha_ran = not math.isfinite(alpha) or abs(alpha) > 100 * cfg.lr_teacher
    field = "lr_lr" if alpha_ran else "lr_img"
    if not math.isfinite(alpha):
        return f"the learned lr alpha is {alpha}; lr_lr = {cfg.lr_lr:g} is too high", "lr_lr"
    if not math.isfinite(loss):
        return (f"the matching loss is {loss} (alpha = {alpha:.3g}); {field} = {getattr(cfg, field):g} "
                "is probably too high"), field
    if not images_finite:
        return f"the synthetic images hold NaN/Inf; lower lr_img (now {cfg.lr_img:g})", "lr_img"
    if rms > RUNAWAY_PIXEL_RMS * data_rms:
        return (f"the synthetic images ran away (pixel RMS {rms:.3g}, {rms / data_rms:.3g} times the real data's); "
                f"lower lr_img (now {cfg.lr_img:g})"), "lr_img"
    first = sorted(entry["loss"] for entry in log[:10])
    if first and loss > RUNAWAY_LOSS * first[len(first) // 2]:
        return (f"the matching loss ran away ({loss:.3g}, {loss / first[len(first) // 2]:.3g} times its median "
                f"over the run's first iterations; alpha = {alpha:.3g}); lower {field} (now "
                f"{getattr(cfg, field):g})"), field
    return None, ""


def _rms(x: torch.Tensor) -> float:
    """Root mean square of all entries (a norm reduction: no squared copy of a large training set)."""
    return float(torch.linalg.vector_norm(x)) / math.sqrt(max(x.numel(), 1))


def evaluated(evals: list[dict]) -> list[dict]:
    """The evaluations that ran (not those skipped because alpha <= 0 at their iteration)."""
    return [e for e in evals if "skipped" not in e]


def _metrics(state: _State, best: dict | None, config: dict) -> dict:
    """metrics.json: the log, every evaluation, the best and final ones, and the step-size changes."""
    seconds = [entry["seconds"] for entry in state.log]
    ran = evaluated(state.evals)
    return {
        "iteration": state.iteration, "alpha": float(state.alpha),
        "alpha_nonpositive_iterations": [e["iteration"] for e in state.log if e["alpha"] <= 0],
        "final_loss": state.log[-1]["loss"] if state.log else None,
        "seconds_per_iteration_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
        "evals": state.evals, "best": best, "final": ran[-1] if ran else None,
        "skipped_evals": [e for e in state.evals if "skipped" in e],
        "log": state.log, "seed": config["distill"]["seed"], "step_size_changes": state.changes,
    }
