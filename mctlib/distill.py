"""The distillation loop: learn S and alpha by matching expert trajectories (MTT or MCT).

Each iteration samples an expert and a window (tau_start, tau_target) on its trajectory, runs
the student from theta(tau_start) for syn_steps steps on S, and takes one SGD-momentum step on
S and alpha against the matching loss. The run directory holds its config, seed and versions,
a metrics JSON, the best and final synthetic sets, and a single-file checkpoint written
atomically, from which `resume=True` continues to the same result as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .augment import make_augment
from .config import DistillConfig, EvalConfig
from .data import Dataset, real_images_per_class
from .device import compute_identity, precision_context, resolve_device, versions
from .evaluate import evaluate_synthetic
from .matching import Student, match, plan_student
from .networks import FlatModel, build_network
from .storage import TrajectoryStore, atomic_write_bytes, atomic_write_json, check_match, tensor_sha256
from .training import derive_seed
from .trajectories import sample_window

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "mctlib-distill-checkpoint-v2"   # v2: carries a checksum over its tensors and state
# Fields that may change when a run is resumed: they decide when to stop and log, not what is computed.
RESUMABLE_CHANGES = {"iterations", "eval_every", "checkpoint_every"}
# Step sizes may change too, so a diverged run continues from its last good state with a lower one;
# each change is recorded with the iteration it took effect at (metrics.json, "step_size_changes").
STEP_SIZE_CHANGES = ("lr_img", "lr_lr")
# A run whose images or loss run away is stopped like one that reaches NaN: pixel RMS above this many
# times the real data's, or a matching loss this many times the median of the run's first iterations.
# Measured on 8x8 digits, 200 MCT iterations: lr_img 1e2 / 1e3 / 1e4 end at 2.4 / 7.7 / 43 times the
# data's RMS with the loss at most 1.4 times its start (a ConvNet with instance norm does not mind the
# scale), while lr_img 1e9 is at 2e6 times after one iteration and its set scores 6 %.
RUNAWAY_PIXEL_RMS = 1e4
RUNAWAY_LOSS = 1e4
# What a run recorded before its config held "compute": the engine had only ever run on the CPU, in fp32.
LEGACY_COMPUTE = {"device": "cpu", "precision": "fp32"}


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


class CheckpointError(RuntimeError):
    """A checkpoint that is corrupt, foreign, or from a different run configuration."""


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


def _checkpoint_checksum(tensors: dict[str, torch.Tensor], config_json: str, state_json: str) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes and the config and state JSON."""
    parts = {name: [str(t.dtype), list(t.shape), tensor_sha256(t)] for name, t in sorted(tensors.items())}
    blob = json.dumps([parts, config_json, state_json], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _save_checkpoint(run_dir: Path, state: _State, config: dict) -> None:
    tensors = state.tensors()
    config_json = json.dumps(config, sort_keys=True)
    state_json = json.dumps({"iteration": state.iteration, "log": state.log, "evals": state.evals,
                             "changes": state.changes})
    meta = {"format": CHECKPOINT_FORMAT, "config": config_json, "state": state_json,
            "checksum": _checkpoint_checksum(tensors, config_json, state_json)}
    atomic_write_bytes(run_dir / CHECKPOINT, st_save(tensors, metadata=meta))


_CHECKPOINT_TENSORS = ("images", "labels", "alpha", "img_velocity", "lr_velocity", "rng")


def _load_checkpoint(run_dir: Path, config: dict, device: torch.device) -> _State:
    """The verified state of a checkpoint: format, fields, finiteness, checksum, then the configuration."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"nothing to resume: {path} does not exist (run without --resume to start)")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, UnicodeDecodeError, Exception) as err:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({err}); delete it to start over") from err
    if meta.get("format") == "mctlib-distill-checkpoint-v1":
        raise CheckpointError(f"{path} was written by an older mctlib without a checksum, so it cannot be verified; "
                              "start the run again in another --out")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an mctlib distillation checkpoint (format {meta.get('format')!r})")
    missing = [k for k in _CHECKPOINT_TENSORS if k not in tensors] + [k for k in ("config", "state", "checksum")
                                                                       if k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks the field(s) {missing}; it is damaged: delete it to start over")
    bad = [k for k in ("images", "alpha", "img_velocity", "lr_velocity")
           if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all()]
    if bad:
        # Checked before the checksum: this is the more specific diagnosis. mctlib never writes such a
        # checkpoint (a diverging run keeps its last finite state), so it was altered or damaged.
        raise CheckpointError(f"{path} holds non-finite values (NaN/Inf in {', '.join(bad)}), so it cannot be "
                              "resumed; it was altered or damaged: restore a copy or delete it to start over")
    if meta["checksum"] != _checkpoint_checksum(tensors, meta["config"], meta["state"]):
        raise CheckpointError(f"{path} fails its checksum: its tensors or state were altered or damaged after it "
                              "was written; restore a copy or delete it to start over")
    saved = json.loads(meta["config"])
    saved.setdefault("compute", LEGACY_COMPUTE)
    diff = _config_diff(saved, config)
    if diff:
        raise CheckpointError(f"{path} belongs to a run with another configuration: {diff}; "
                              "resume with the same settings or choose another --out")
    info = json.loads(meta["state"])
    expected = _images_shape(config)
    for name in ("images", "img_velocity"):
        if tuple(tensors[name].shape) != expected:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the run's configuration "
                                  f"implies {expected}; it does not belong to this run")
    gen = torch.Generator()
    gen.set_state(tensors["rng"])
    images = tensors["images"].to(device)
    state = _State(images, tensors["labels"].to(device), tensors["alpha"].to(device).reshape(()),
                   tensors["img_velocity"].to(device), tensors["lr_velocity"].to(device).reshape(()), gen,
                   info["iteration"], info["log"], info["evals"], info.get("changes", []))
    for name in STEP_SIZE_CHANGES:
        before, now = saved["distill"][name], config["distill"][name]
        if before != now:
            state.changes.append({"iteration": state.iteration, "field": name, "from": before, "to": now})
    return state


def _images_shape(config: dict) -> tuple[int, ...]:
    d = config["dataset"]
    return (config["distill"]["ipc"] * d["num_classes"], d["channels"], *d["image_size"])


def _config_diff(saved: dict, now: dict, prefix: str = "") -> str:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _config_diff(a, b, f"{prefix}{key}.")
            if sub:
                out.append(sub)
        elif a != b and key not in RESUMABLE_CHANGES and f"{prefix}{key}" not in ("distill.lr_img", "distill.lr_lr"):
            out.append(f"{prefix}{key}: checkpoint {a!r} vs now {b!r}")
    return "; ".join(out)


def _start_or_resume(run_dir: Path, config: dict, device: torch.device) -> _State | None:
    """The checkpoint's state; None when a run was stopped before its first checkpoint (nothing of it
    is kept, so it starts from the beginning) after checking its config.json is this run's."""
    if (run_dir / CHECKPOINT).exists() or not (run_dir / "config.json").exists():
        return _load_checkpoint(run_dir, config, device)
    try:
        on_disk = json.loads((run_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{run_dir / 'config.json'} is corrupt ({err}); choose another --out") from err
    diff = _config_diff({k: on_disk.get(k) for k in config}, config).replace("checkpoint ", "config.json ")
    if diff:
        raise CheckpointError(f"{run_dir} holds the start of a run with another configuration: {diff}; "
                              "resume with the same settings or choose another --out")
    return None


def _save_synthetic(path: Path, images: torch.Tensor, labels: torch.Tensor, alpha: float, info: dict) -> None:
    meta = {"format": "mctlib-synthetic-v1", "info": json.dumps(info, sort_keys=True)}
    atomic_write_bytes(path, st_save({"images": images.detach().cpu().contiguous(), "labels": labels.cpu().contiguous(),
                                      "alpha": torch.tensor([alpha])}, metadata=meta))


def load_synthetic(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(images, labels, alpha) of a saved synthetic set (synthetic_best / synthetic_final)."""
    path = Path(path)
    try:
        tensors = st_load(path.read_bytes())
        return tensors["images"], tensors["labels"], float(tensors["alpha"][0])
    except (SafetensorError, KeyError, Exception) as err:
        raise ValueError(f"{path} is not a readable mctlib synthetic set ({err})") from err


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
            run_dir: str | Path | None = None, resume: bool = False, device=None, progress: bool = True,
            run_info: dict | None = None, group=None, precision: str = "fp32",
            initial_eval: list | None = None) -> DistillResult:
    """Run (or resume) one distillation; see the module docstring for what lands in `run_dir`.
    `precision` (fp32, tf32, bf16; see device.precision_context) applies to the student's steps.
    `initial_eval`: the iteration-0 evaluation computed beforehand (EvalResults of S_0 with the initial
    alpha by `eval_cfg`'s networks), recorded instead of evaluating again; runs that start alike share it.

    `group` (a `distributed.Group`, from torchrun): the synthetic set's gradient is computed in shards
    over the ranks, every rank holds the same S and alpha, and rank 0 writes the run directory."""
    device = resolve_device(device) if group is None else group.device
    _check_store(cfg, store, dataset)
    net = store.net
    config = run_config(cfg, store, dataset, eval_cfg, device, precision)
    writes = group is None or group.writer
    if group is not None:
        group.check_world_size(cfg.ipc * dataset.num_classes)
        if group.world_size > 1:
            config["world_size"] = group.world_size   # compared on resume like every other setting
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        if (run_dir / "config.json").exists() and not resume:
            raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) to continue it "
                                  "or choose another run directory")
        run_dir.mkdir(parents=True, exist_ok=True)

    state = None
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run directory of the run to continue")
        from .distributed import check_resume_world_size

        check_resume_world_size(run_dir, 1 if group is None else group.world_size)
        state = _start_or_resume(run_dir, config, device)
    if run_dir is not None and writes:  # temporary files of a write that a kill interrupted
        for leftover in [*run_dir.glob(".*.safetensors.*.tmp"), *run_dir.glob(".*.json.*.tmp")]:
            leftover.unlink(missing_ok=True)
    if state is None:
        images, labels = initial_synthetic(dataset, cfg)
        images = images.to(device)
        state = _State(images, labels.to(device), torch.tensor(cfg.lr_teacher, device=device),
                       torch.zeros_like(images), torch.zeros((), device=device),
                       torch.Generator().manual_seed(derive_seed(cfg.seed, 2)))
    if group is not None:
        # Every rank has checked run_dir before rank 0 writes to it. Every rank reads versions() (slow: it
        # imports torchvision), so that no rank waits at a collective while rank 0 alone does.
        about = versions() if run_dir is not None else None
        group.barrier("the start of distillation")
    if run_dir is not None and writes:
        # run_info (command line, preset name) is recorded but, unlike `config`, not compared on resume.
        atomic_write_json(run_dir / "config.json", {**config, "seed": cfg.seed,
                                                    "versions": about if group is not None else versions(device),
                                                    "run": {"store_path": str(store.path), **(run_info or {})}})

    model = FlatModel(build_network(net)).to(device)
    student = Student(model, make_augment(cfg.dsa)) if group is None else group.student(model, make_augment(cfg.dsa))
    records = [r.to(device) for r in store.records]          # moved once, not per iteration
    sampling = cfg.resolved_sampling
    best = max(evaluated(state.evals), key=lambda e: e["mean"], default=None)
    warned = any(entry["alpha"] <= 0 for entry in state.log)
    data_rms = _rms(dataset.train_images)

    def evaluate_now(it: int, results: list | None = None) -> None:
        nonlocal best
        if eval_cfg is None:
            return
        alpha_now = float(state.alpha)
        if alpha_now <= 0:
            # Training networks with a non-positive lr would ascend the loss; the published code
            # evaluates with lr = alpha regardless, we record why this evaluation did not run.
            state.evals.append({"iteration": it, "skipped": f"alpha = {alpha_now:.3g} <= 0 at this iteration"})
            return
        if results is None:
            results = evaluate_synthetic(state.images, state.labels, alpha_now, dataset, net, eval_cfg, device,
                                         share=group, precision=precision)
        entry = {"iteration": it, "mean": results[0].mean, "std": results[0].std,
                 "accuracies": results[0].accuracies, "archs": [r.to_dict() for r in results]}
        state.evals.append(entry)
        if best is None or entry["mean"] > best["mean"]:
            best = entry
            if run_dir is not None and writes:
                _save_synthetic(run_dir / "synthetic_best.safetensors", state.images, state.labels,
                                float(state.alpha), {"iteration": it, "eval": entry})

    bar = None
    if progress and writes:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=state.iteration, desc=f"distill {cfg.method}", leave=False)
    if state.iteration == 0 and not state.evals and (cfg.eval_every or cfg.eval_at):
        evaluate_now(0, initial_eval)
    while state.iteration < cfg.iterations:
        good = state.snapshot()
        it = state.iteration + 1
        tick = time.perf_counter()
        expert = int(torch.randint(len(records), (1,), generator=state.generator))
        record = records[expert]
        tau_start, tau_target = sample_window(state.generator, sampling, cfg.expert_epochs, cfg.max_start_epoch,
                                              record.epochs)
        plan = plan_student(state.images.shape[0], cfg.syn_steps, cfg.batch_syn, state.generator, device)
        images = state.images.requires_grad_(True)
        alpha = state.alpha.requires_grad_(True)
        images.grad, alpha.grad = None, None
        with precision_context(precision, device):
            result = match(student, images, state.labels, alpha, record.point(tau_start),
                           record.point(tau_target), plan, cfg.gradient_mode)
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
        cause, to_lower = _divergence(loss, bool(finite), rms, alpha_now, cfg, data_rms, state.log)
        if cause:
            if run_dir is not None and writes:
                _save_checkpoint(run_dir, good, config)
            suggested = float(f"{getattr(cfg, to_lower) / 10:.3g}")
            where = (f"; the last good state (iteration {good.iteration}) is saved in {run_dir / CHECKPOINT}: "
                     f"resume it with a lower {to_lower}, e.g. {suggested:g}" if run_dir else "")
            raise DivergenceError(f"distillation diverged at iteration {it}: {cause}{where}", to_lower, suggested)
        state.iteration = it
        seconds = time.perf_counter() - tick
        state.log.append({"iteration": it, "loss": loss, "tau_start": tau_start, "tau_target": tau_target,
                          "alpha": alpha_now, "expert": expert, "seconds": seconds})
        if alpha_now <= 0 and not warned:
            warned = True
            warnings.warn(f"the learned lr alpha crossed zero at iteration {it} (alpha = {alpha_now:.3g}); the run "
                          "goes on, as the published code does, and counts such iterations in metrics.json "
                          "(alpha_nonpositive_iterations)", AlphaNonPositiveWarning, stacklevel=2)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", alpha=f"{alpha_now:.4g}")
        if (cfg.eval_every and (it % cfg.eval_every == 0 or it == cfg.iterations)) or it in cfg.eval_at:
            evaluate_now(it)
        if run_dir is not None and writes and (it % cfg.checkpoint_every == 0 or it == cfg.iterations):
            _save_checkpoint(run_dir, state, config)
            _write_metrics(run_dir, state, best, config)
    if bar is not None:
        bar.close()
    if run_dir is not None and writes:
        _save_synthetic(run_dir / "synthetic_final.safetensors", state.images, state.labels, float(state.alpha),
                        {"iteration": state.iteration})
        _write_metrics(run_dir, state, best, config)
    if group is not None:
        group.barrier("the end of distillation")  # on return, on any rank, the run directory is complete
    return DistillResult(state.images.detach(), state.labels, float(state.alpha), state.log, state.evals, run_dir,
                         best, config)


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


def _write_metrics(run_dir: Path, state: _State, best: dict | None, config: dict) -> None:
    seconds = [entry["seconds"] for entry in state.log]
    ran = evaluated(state.evals)
    atomic_write_json(run_dir / "metrics.json", {
        "iteration": state.iteration, "alpha": float(state.alpha),
        "alpha_nonpositive_iterations": [e["iteration"] for e in state.log if e["alpha"] <= 0],
        "final_loss": state.log[-1]["loss"] if state.log else None,
        "seconds_per_iteration_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
        "evals": state.evals, "best": best, "final": ran[-1] if ran else None,
        "skipped_evals": [e for e in state.evals if "skipped" in e],
        "log": state.log, "seed": config["distill"]["seed"], "step_size_changes": state.changes,
    })
