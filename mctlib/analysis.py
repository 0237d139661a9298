"""Measurements on expert trajectories, for the chapters (METHOD.md, chapters 1 and 3).

Chapter 1 reads MTT's loss as update-vector matching: the expert's V_T = theta_{s+M} - theta_s is
the target the synthetic set must predict. These functions measure how noisy that target is
(cosines along and across trajectories, V_T redrawn under fresh SGD noise from the same start,
accuracy along SGD). Chapter 3 compares the SGD path with its convexified record (PCA view,
interpolation error) and measures what each record costs on disk.
Nothing here trains differently from `training.train_networks` or stores differently from
`storage.save_store`: both are called, not re-implemented.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .matching import Student, StudentPlan, matching_loss
from .networks import FlatModel, NetConfig, build_network
from .storage import MANIFEST, load_store, save_store
from .training import SGDRecipe, accuracy, derive_seed, train_networks
from .trajectories import ConvexRecord, FullBuffer, convexify, sample_window

Augment = Callable[[torch.Tensor, int], torch.Tensor]


# --- update vectors (chapter 1) ----------------------------------------------------------------

def update_vectors_along(buffer: FullBuffer, expert_epochs: int) -> torch.Tensor:
    """V_T(s) = theta_{s+M} - theta_s for every start s = 0 .. E - M; shape (E - M + 1, D)."""
    m = int(expert_epochs)
    if m != expert_epochs or not 1 <= m <= buffer.epochs:
        raise ValueError(f"expert_epochs M = {expert_epochs} must be an integer in [1, {buffer.epochs}] for a full buffer")
    return buffer.params[m:] - buffer.params[:-m]


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    v = vectors.double()
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def consecutive_cosines(vectors: torch.Tensor) -> torch.Tensor:
    """cos(V_t, V_{t+1}) for consecutive rows of a (T, D) tensor; shape (T - 1,)."""
    if vectors.dim() != 2 or vectors.shape[0] < 2:
        raise ValueError(f"need a (T, D) tensor with T >= 2 rows, got {tuple(vectors.shape)}")
    u = _unit(vectors)
    return (u[1:] * u[:-1]).sum(-1)


def pairwise_cosines(vectors: torch.Tensor) -> torch.Tensor:
    """cos between every pair of rows of an (X, D) tensor: the X (X - 1) / 2 off-diagonal values."""
    if vectors.dim() != 2 or vectors.shape[0] < 2:
        raise ValueError(f"need an (X, D) tensor with X >= 2 rows, got {tuple(vectors.shape)}")
    u = _unit(vectors)
    gram = u @ u.T
    i, j = torch.triu_indices(len(u), len(u), offset=1)
    return gram[i, j]


def cross_expert_cosines(vectors: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """For each start s, the mean pairwise cosine between the experts' V_T(s).

    `vectors`: one (T, D) tensor of update vectors per expert (or an (X, T, D) tensor); shape (T,).
    """
    stack = torch.stack(list(vectors)) if not torch.is_tensor(vectors) else vectors
    if stack.dim() != 3 or stack.shape[0] < 2:
        raise ValueError(f"need update vectors of at least 2 experts as (X, T, D), got {tuple(stack.shape)}")
    return torch.stack([pairwise_cosines(stack[:, t]).mean() for t in range(stack.shape[1])])


def relative_spread(vectors: torch.Tensor) -> float:
    """E||V - mean V||^2 / E||V||^2 over the rows of an (R, D) tensor.

    For targets V_T redrawn at random around a mean, this is the smallest expected matching loss
    ||V_S - V_T||^2 / ||V_T||^2 any fixed prediction V_S can reach (up to the normaliser varying):
    the noise floor of the objective.
    """
    v = vectors.double()
    return float((v - v.mean(0)).pow(2).sum(-1).mean() / v.pow(2).sum(-1).mean())


def noise_floor(vectors: torch.Tensor) -> float:
    """The noise floor of the objective, E||V - E V||^2 / E||V||^2, estimated without small-sample bias.

    `relative_spread` centres the R draws on their own mean, which sits closer to them than the
    true mean does: its numerator has expectation (R - 1)/R times E||V - E V||^2 (3/4 of it for
    R = 4). Dividing the squared deviations by R - 1 instead of R removes that bias; the
    denominator, a plain mean of ||V_r||^2, is already unbiased. Needs R >= 2 rows.
    """
    if vectors.dim() != 2 or vectors.shape[0] < 2:
        raise ValueError(f"need an (R, D) tensor with R >= 2 draws, got {tuple(vectors.shape)}")
    v = vectors.double()
    r = v.shape[0]
    spread = (v - v.mean(0)).pow(2).sum() / (r - 1)
    return float(spread / v.pow(2).sum(-1).mean())


def redrawn_noise_floors(model: FlatModel, records: Sequence, windows: Sequence[tuple[int, float]],
                         images: torch.Tensor, labels: torch.Tensor, recipe: SGDRecipe, replays: int, seed: int,
                         augment: Augment | None = None) -> torch.Tensor:
    """`noise_floor` of V_T at several windows: for each (expert index, start s) in `windows`, the
    expert's theta_s trained again `replays` times for recipe.epochs epochs under fresh SGD noise
    (`resampled_update_vectors`, seeds derived from (seed, expert, s, replay)); shape (len(windows),)."""
    if replays < 2:
        raise ValueError(f"replays = {replays}: a noise floor needs at least 2 redraws")
    floors = []
    for index, start in windows:
        seeds = [derive_seed(seed, 101, int(index), int(round(4 * float(start))), r) for r in range(replays)]
        floors.append(noise_floor(resampled_update_vectors(model, records[index].point(float(start)), images,
                                                           labels, recipe, seeds, augment)))
    return torch.tensor(floors, dtype=torch.float64)


def order_replicas(model: FlatModel, theta0: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                   recipe: SGDRecipe, seeds: Sequence[int], augment: Augment | None = None) -> list[FullBuffer]:
    """Full buffers of experts that share theta0 and differ only in their SGD noise (minibatch order
    and augmentation draws, one seed each): the random process the paper's "instability" refers to
    (chapter 3). One `train_networks` call, every epoch kept."""
    snaps: list[torch.Tensor] = []
    start = theta0.detach().reshape(1, -1).expand(len(seeds), -1).clone()
    train_networks(model, start, images, labels, recipe, list(seeds), augment,
                   on_epoch=lambda e, p: snaps.append(p.detach().clone()))
    stacked = torch.stack(snaps, 1)
    return [FullBuffer(stacked[i]) for i in range(len(seeds))]


def window_spread(records: Sequence, expert_epochs: float, starts: Sequence[float]) -> torch.Tensor:
    """For each start s, `noise_floor` of the targets V_T(s) of several records of one random process
    (the full buffers of `order_replicas`, or their convexified records): how much the matching
    target at that window depends on the draw; shape (len(starts),)."""
    if len(records) < 2:
        raise ValueError(f"need at least 2 records to measure a spread, got {len(records)}")
    targets = torch.stack([update_vectors_at(r, expert_epochs, starts) for r in records], 1)  # (S, R, D)
    return torch.tensor([noise_floor(t) for t in targets], dtype=torch.float64)


def pairwise_losses(vectors: torch.Tensor) -> float:
    """Mean of ||V_j - V_i||^2 / ||V_i||^2 over ordered pairs i != j of the rows of an (R, D) tensor: the
    matching loss one draw of a target would pay against another draw (about twice the noise floor)."""
    if vectors.dim() != 2 or vectors.shape[0] < 2:
        raise ValueError(f"need an (R, D) tensor with R >= 2 draws, got {tuple(vectors.shape)}")
    r = vectors.shape[0]
    total = sum(prediction_losses(vectors[j], vectors[[i for i in range(r) if i != j]]).sum() for j in range(r))
    return float(total / (r * (r - 1)))


def update_vectors_at(record, expert_epochs: float, starts: Sequence[float]) -> torch.Tensor:
    """V_T(tau) = theta(min(tau + M, E)) - theta(tau) of a FullBuffer (integer tau only) or a
    ConvexRecord (any real tau): the matching targets the sampler hands the student; (len(starts), D)."""
    end = float(record.epochs)
    return torch.stack([record.point(min(float(t) + float(expert_epochs), end)) - record.point(float(t))
                        for t in starts])


@dataclass
class WindowFidelity:
    """How well one record's matching targets stand in for another's, window by window."""

    starts: torch.Tensor      # (S,) tau_s of each window
    cosine: torch.Tensor      # (S,) cos(V_record, V_reference)
    norm_ratio: torch.Tensor  # (S,) ||V_record|| / ||V_reference||
    loss: torch.Tensor        # (S,) ||V_record - V_reference||^2 / ||V_reference||^2


def window_fidelity(reference, record, expert_epochs: float, starts: Sequence[float]) -> WindowFidelity:
    """Compare the update vectors V_T of `record` with those of `reference` over the same windows.

    This is fidelity where the method acts: the student never sees a point of the trajectory, only
    a window's V_T. `loss` is the matching loss a student would still pay against the reference's
    target if it reproduced the record's target exactly (the objective's own units, comparable
    with `noise_floor`); cosine and norm ratio split it into direction and length.
    """
    if record.epochs != reference.epochs:
        raise ValueError(f"record covers {record.epochs} epochs, the reference {reference.epochs}")
    v_ref = update_vectors_at(reference, expert_epochs, starts).double()
    v_rec = update_vectors_at(record, expert_epochs, starts).double()
    ref_norm = v_ref.norm(dim=-1)
    return WindowFidelity(starts=torch.tensor([float(t) for t in starts], dtype=torch.float64),
                          cosine=(_unit(v_ref) * _unit(v_rec)).sum(-1),
                          norm_ratio=v_rec.norm(dim=-1) / ref_norm.clamp_min(1e-300),
                          loss=(v_rec - v_ref).pow(2).sum(-1) / ref_norm.pow(2).clamp_min(1e-300))


def prediction_losses(prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """||V_S - V_T||^2 / ||V_T||^2 of one fixed prediction V_S (D,) against each target row of (R, D).

    Against targets redrawn under SGD noise, the mean is at least the noise floor, reached by
    predicting their mean; how far above it a candidate target (a convexified record's V_T, say)
    lands says how much further from SGD it is than SGD's own redraws."""
    t = targets.double()
    return (prediction.double().reshape(1, -1) - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-300)


def span_rank(vectors: torch.Tensor, rtol: float = 1e-4) -> int:
    """Numerical rank of the rows of an (X, D) tensor: singular values above rtol times the largest.

    Counts how many independent directions a set of targets holds (computed from the X x X Gram
    matrix in float64, so D may be large)."""
    if vectors.dim() != 2 or vectors.shape[0] < 1:
        raise ValueError(f"need an (X, D) tensor, got {tuple(vectors.shape)}")
    v = vectors.double()
    singular = torch.linalg.eigvalsh(v @ v.T).clamp_min(0).sqrt()
    return int((singular > rtol * singular.max()).sum()) if singular.max() > 0 else 0


def window_straightness(path: torch.Tensor, window: int) -> torch.Tensor:
    """||p_{t+w} - p_t|| / sum_{j=t}^{t+w-1} ||p_{j+1} - p_j|| for each start t of a (T, D) path.

    1 for a straight path, below 1 when steps partly undo each other. The resolution is the path's:
    on epoch checkpoints it sees only the polyline through them, on every minibatch iterate it sees
    the path SGD walked."""
    w = int(window)
    if path.dim() != 2 or not 1 <= w <= path.shape[0] - 1:
        raise ValueError(f"window {window} must be an integer in [1, {path.shape[0] - 1}] for a path of "
                         f"{path.shape[0]} points")
    p = path.double()
    chord = (p[w:] - p[:-w]).norm(dim=-1)
    steps = (p[1:] - p[:-1]).norm(dim=-1)
    cumulative = torch.cat([steps.new_zeros(1), steps.cumsum(0)])
    return chord / (cumulative[w:] - cumulative[:-w]).clamp_min(1e-300)


def accuracy_drops(acc: torch.Tensor, min_drop: float = 0.0, where: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of consecutive steps along the last axis of `acc` where accuracy falls by more than
    `min_drop` (same units as acc); shape acc.shape[:-1]. On a test set of n images one image is
    1/n, so a threshold of a few images keeps single-image flips from counting as drops.
    `where` (bool, one entry per step, T - 1) counts only the steps it marks, e.g. the full-size
    minibatches of `minibatch_sizes`."""
    if acc.shape[-1] < 2:
        raise ValueError(f"need at least two points along the last axis, got {tuple(acc.shape)}")
    drops = (acc.diff(dim=-1) < -float(min_drop)).double()
    if where is None:
        return drops.mean(-1)
    if where.shape != drops.shape[-1:] or where.dtype != torch.bool or not where.any():
        raise ValueError(f"where must be a bool mask of {drops.shape[-1]} steps marking at least one, "
                         f"got {tuple(where.shape)} {where.dtype}")
    return drops[..., where].mean(-1)


def minibatch_sizes(num_images: int, batch_size: int, epochs: int) -> torch.Tensor:
    """The size of each minibatch step of `epochs` epochs over `num_images` images, as
    `training.train_networks` and `sgd_step_path` split them: full batches, then the ragged remainder
    of each epoch (1347 = 5 x 256 + 67 for the digits); shape (steps,)."""
    if num_images < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"num_images = {num_images}, batch_size = {batch_size} and epochs = {epochs} must be >= 1")
    one = [min(batch_size, num_images - start) for start in range(0, num_images, batch_size)]
    return torch.tensor(one * int(epochs))


def path_straightness(buffer: FullBuffer, expert_epochs: int) -> torch.Tensor:
    """||theta_{s+M} - theta_s|| / sum_{j=s}^{s+M-1} ||theta_{j+1} - theta_j|| for each start s.

    1 for a straight path; below 1 when consecutive epochs partly undo each other. Measured on the
    epoch checkpoints, so for M = 2 it sees a two-segment polyline, not the minibatch path (for that,
    `window_straightness` on `sgd_step_path`)."""
    update_vectors_along(buffer, expert_epochs)  # validates M
    return window_straightness(buffer.params, int(expert_epochs))


def resampled_update_vectors(model: FlatModel, theta_start: torch.Tensor, images: torch.Tensor,
                             labels: torch.Tensor, recipe: SGDRecipe, seeds: Sequence[int],
                             augment: Augment | None = None) -> torch.Tensor:
    """V_T redrawn R times: train R copies of theta_start for recipe.epochs epochs, each with its own
    data order and augmentation (seed), and return theta_{s+M} - theta_s; shape (R, D)."""
    start = theta_start.detach().reshape(1, -1)
    final = train_networks(model, start.expand(len(seeds), -1).clone(), images, labels, recipe, list(seeds), augment)
    return final - start


def sgd_step_path(model: FlatModel, theta_start: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                  recipe: SGDRecipe, seed: int, augment: Augment | None = None) -> torch.Tensor:
    """Every minibatch iterate of one plain-SGD run: (steps + 1, D), starting with theta_start.

    Each step is `train_networks` on one minibatch for one epoch, so the update is computed by the
    one training loop; the data order is a fresh permutation per epoch, as in expert training.
    Plain SGD only: a momentum buffer would not carry over from one call to the next.
    """
    if recipe.momentum or recipe.decay_epoch is not None:
        raise ValueError("sgd_step_path replays plain SGD (momentum 0, no lr decay) one minibatch at a time")
    gen = torch.Generator().manual_seed(int(seed))
    theta = theta_start.detach().reshape(1, -1).clone()
    path = [theta[0].clone()]
    one_step = SGDRecipe(lr=recipe.lr, epochs=1, batch_size=recipe.batch_size, weight_decay=recipe.weight_decay)
    n = images.shape[0]
    for epoch in range(recipe.epochs):
        for step, batch in enumerate(torch.randperm(n, generator=gen).split(recipe.batch_size)):
            theta = train_networks(model, theta, images[batch], labels[batch], one_step,
                                   [derive_seed(seed, epoch, step)], augment)
            path.append(theta[0].clone())
    return torch.stack(path)


def waypoint_losses(student: Student, images: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor,
                    records: Sequence, expert_epochs: float, starts: Sequence[float],
                    plan: StudentPlan, student_norms: bool = False):
    """The matching loss of one synthetic set at every waypoint (theta_s, V_T) of every expert.

    Read as in chapter 1, the waypoints are the training set of the "model" S, and this is its
    loss on each training example; the same plan (minibatches, augmentation) is used throughout,
    so S is one fixed function from theta_s to V_S. Shape (num_experts, len(starts)). With
    `student_norms`, also returns ||V_S|| at each waypoint (same shape), from the same unrolls.
    """
    out = torch.empty(len(records), len(starts), dtype=torch.float64)
    norms = torch.empty_like(out)
    for i, record in enumerate(records):
        for j, s in enumerate(starts):
            theta_start = record.point(float(s))
            theta_target = record.point(min(float(s) + float(expert_epochs), float(record.epochs)))
            theta_end, _, _ = student.unroll(theta_start, images, labels, alpha, plan)
            out[i, j] = matching_loss(theta_end, theta_start, theta_target).item()
            norms[i, j] = (theta_end - theta_start).double().norm().item()
    return (out, norms) if student_norms else out


def accuracy_along(model: FlatModel, points: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                   chunk: int = 32) -> torch.Tensor:
    """Test accuracy of every parameter vector in `points` (T, D), `chunk` networks at a time; shape (T,)."""
    if points.dim() != 2:
        raise ValueError(f"points must be (T, D), got {tuple(points.shape)}")
    return torch.cat([accuracy(model, points[i:i + chunk], images, labels) for i in range(0, len(points), chunk)])


# --- convexified trajectories (chapter 3) ------------------------------------------------------

def layer_path_lengths(buffer: FullBuffer, layer_slices: Sequence[slice]) -> torch.Tensor:
    """Per parameter tensor l, the arc length sum_e ||theta_{l,e+1} - theta_{l,e}|| of a full buffer: the
    denominator of the arc-length beta (METHOD.md, chapter 3); shape (L,). A tensor that gets no gradient
    (a convolution bias ahead of instance norm) has length 0 up to rounding, and its beta is noise."""
    steps = buffer.params[1:].double() - buffer.params[:-1].double()
    return torch.stack([steps[:, s].norm(dim=1).sum() for s in layer_slices])


def record_points(record, taus: Sequence[float]) -> torch.Tensor:
    """theta(tau) of a FullBuffer or ConvexRecord at each tau; shape (len(taus), D)."""
    return torch.stack([record.point(float(t)) for t in taus])


def interpolation_error(buffer: FullBuffer, record: ConvexRecord, reference: str = "norm") -> torch.Tensor:
    """||theta_e - theta_hat(e)|| / ||theta_e|| for e = 0..E (reference 'norm'), or divided by the
    distance travelled ||theta_e - theta_0|| (reference 'displacement'; 0 at e = 0); shape (E+1,)."""
    if record.epochs != buffer.epochs:
        raise ValueError(f"record covers {record.epochs} epochs, the buffer {buffer.epochs}")
    sgd = buffer.params.double()
    convex = record_points(record, range(buffer.epochs + 1)).double()
    error = (sgd - convex).norm(dim=-1)
    if reference == "norm":
        return error / sgd.norm(dim=-1)
    if reference == "displacement":
        moved = (sgd - sgd[0]).norm(dim=-1)
        return torch.where(moved > 0, error / moved.clamp_min(1e-300), torch.zeros_like(error))
    raise ValueError(f"reference {reference!r} unknown; choose 'norm' or 'displacement'")


@dataclass
class Projection:
    """Points of several paths in one shared 2-D PCA basis."""

    coords: list[torch.Tensor]      # one (T_i, 2) tensor per path
    components: torch.Tensor        # (2, D), unit rows
    mean: torch.Tensor              # (D,)
    explained: torch.Tensor         # (2,) fraction of the variance of all points along each component


def pca_projection(paths: Sequence[torch.Tensor], fit_on: Sequence[int] | None = None) -> Projection:
    """Project every (T_i, D) path onto the top-2 principal directions of the pooled points.

    The basis is fitted on the paths listed in `fit_on` (default all), centred on their mean,
    by an exact SVD; each component's sign is fixed so that its largest-magnitude entry is
    positive, which makes the picture reproducible.
    """
    fit = [paths[i] for i in (range(len(paths)) if fit_on is None else fit_on)]
    points = torch.cat([p.double() for p in fit])
    mean = points.mean(0)
    _, s, vh = torch.linalg.svd(points - mean, full_matrices=False)
    components = vh[:2]
    sign = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * sign
    explained = s[:2].pow(2) / s.pow(2).sum()
    coords = [(p.double() - mean) @ components.T for p in paths]
    return Projection(coords, components, mean, explained)


def window_samples(sampling: str, count: int, expert_epochs: float, max_start_epoch: float, epochs: int,
                   seed: int = 0) -> torch.Tensor:
    """`count` draws of (tau_start, tau_target) from `trajectories.sample_window`; shape (count, 2)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.tensor([sample_window(gen, sampling, expert_epochs, max_start_epoch, epochs)
                         for _ in range(count)], dtype=torch.float64)


# --- storage -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StorageSetting:
    """One way to store the experts: a full buffer (num_waypoints None) or a convexified record."""

    name: str
    num_waypoints: int | None = None
    store_theta0: bool = True


DEFAULT_SETTINGS = (
    StorageSetting("full buffer"),
    StorageSetting("K = 4", 4),
    StorageSetting("K = 2", 2),
    StorageSetting("K = 2, theta_0 from seed", 2, False),
)


def storage_table(buffers: Sequence[FullBuffer], net: NetConfig, dataset: dict, init_seeds: Sequence[int],
                  settings: Sequence[StorageSetting] = DEFAULT_SETTINGS, recipe: dict | None = None,
                  schedule: str = "arc_length", smooth: bool = True, folder: str | Path | None = None) -> list[dict]:
    """Write the experts in each setting with `storage.save_store`, measure the files on disk, and
    load each store back to check it reproduces what was written.

    Returns one row per setting: name, num_waypoints, theta0 ('stored' / 'seed'), vectors per
    expert, bytes_per_expert (mean size of the expert files), manifest_bytes, total_bytes (experts
    + manifest), ratio (full-buffer bytes per expert / this setting's) and round_trip (bool).
    Files go to a temporary folder unless `folder` is given.
    """
    layer_slices = FlatModel(build_network(net)).layer_slices
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(folder) if folder is not None else Path(tmp)
        for i, setting in enumerate(settings):
            if setting.num_waypoints is None:
                records = list(buffers)
            else:
                records = [convexify(b, layer_slices, setting.num_waypoints, schedule, smooth) for b in buffers]
            path = save_store(root / f"store_{i}", records, net, dataset, recipe or {}, list(init_seeds),
                              store_theta0=setting.store_theta0, overwrite=True)
            files = sorted(path.glob("expert_*.safetensors"))
            sizes = [f.stat().st_size for f in files]
            manifest_bytes = (path / MANIFEST).stat().st_size
            loaded = load_store(path, net=net)
            round_trip = all(_same_record(a, b) for a, b in zip(records, loaded.records, strict=True))
            vectors = (buffers[0].epochs + 1 if setting.num_waypoints is None else setting.num_waypoints) \
                - (0 if setting.store_theta0 else 1)
            rows.append({"name": setting.name, "num_waypoints": setting.num_waypoints,
                         "theta0": "stored" if setting.store_theta0 else "seed", "vectors": vectors,
                         "bytes_per_expert": sum(sizes) / len(sizes), "manifest_bytes": manifest_bytes,
                         "total_bytes": sum(sizes) + manifest_bytes, "round_trip": round_trip})
    full = rows[0]["bytes_per_expert"]
    for row in rows:
        row["ratio"] = full / row["bytes_per_expert"]
    return rows


def _same_record(a, b) -> bool:
    if isinstance(a, FullBuffer):
        return isinstance(b, FullBuffer) and torch.equal(a.params, b.params)
    return (isinstance(b, ConvexRecord) and torch.equal(a.waypoints, b.waypoints)
            and torch.equal(a.beta, b.beta) and a.waypoint_epochs == b.waypoint_epochs)


def storage_estimate(num_params: int, epochs: int, num_layers: int, num_waypoints: int | None = None,
                     store_theta0: bool = True, bytes_per_value: int = 4) -> int:
    """Bytes of one expert's tensors: (E+1) D values for a full buffer; K D + (E+1) L for a
    convexified record (K waypoints and the beta table); one vector fewer with theta_0 from seed.
    File headers (a few hundred bytes) are not counted."""
    if num_waypoints is None:
        values = (epochs + 1 - (0 if store_theta0 else 1)) * num_params
    else:
        values = (num_waypoints - (0 if store_theta0 else 1)) * num_params + (epochs + 1) * num_layers
    return values * bytes_per_value
