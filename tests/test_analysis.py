"""Tests for mctlib.analysis: update vectors, cosines, accuracy along paths, PCA, storage."""

import math

import pytest
import torch

from mctlib.analysis import (
    StorageSetting,
    accuracy_along,
    accuracy_drops,
    consecutive_cosines,
    cross_expert_cosines,
    interpolation_error,
    layer_path_lengths,
    minibatch_sizes,
    noise_floor,
    order_replicas,
    pairwise_cosines,
    pairwise_losses,
    path_straightness,
    pca_projection,
    prediction_losses,
    record_points,
    redrawn_noise_floors,
    relative_spread,
    resampled_update_vectors,
    sgd_step_path,
    span_rank,
    storage_estimate,
    storage_table,
    update_vectors_along,
    update_vectors_at,
    window_fidelity,
    window_samples,
    window_spread,
    window_straightness,
)
from mctlib.networks import FlatModel, NetConfig, build_network
from mctlib.training import SGDRecipe, train_networks
from mctlib.trajectories import FullBuffer, convexify

TINY = NetConfig(arch="convnet", channels=1, num_classes=3, image_size=8, width=4, depth=2)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3


def _buffer(epochs=5, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FullBuffer(torch.randn(epochs + 1, dim, generator=g).cumsum(0))


def _tiny_buffers(count=2, epochs=4):
    model = FlatModel(build_network(TINY))
    x, y = _data()
    seeds = [10 + i for i in range(count)]
    params = torch.stack([FlatModel(build_network(TINY, seed=s)).flatten() for s in seeds])
    snaps = []
    train_networks(model, params, x, y, SGDRecipe(lr=0.1, epochs=epochs, batch_size=8), [1, 2][:count],
                   on_epoch=lambda e, p: snaps.append(p.clone()))
    stacked = torch.stack(snaps, 1)
    return model, [FullBuffer(stacked[i]) for i in range(count)], seeds


# --- update vectors ------------------------------------------------------------------------------

def test_update_vectors_along_are_differences_m_epochs_apart():
    buf = _buffer()
    v = update_vectors_along(buf, 2)
    assert v.shape == (4, 6)
    for s in range(4):
        assert torch.equal(v[s], buf.params[s + 2] - buf.params[s])
    with pytest.raises(ValueError, match="expert_epochs"):
        update_vectors_along(buf, 6)
    with pytest.raises(ValueError, match="integer"):
        update_vectors_along(buf, 1.5)


def test_consecutive_and_pairwise_cosines():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, -1.0]])
    cos = consecutive_cosines(v)
    assert torch.allclose(cos, torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2), -1.0], dtype=torch.float64))
    pair = pairwise_cosines(v[:3])
    assert torch.allclose(pair, torch.tensor([1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)], dtype=torch.float64))
    with pytest.raises(ValueError):
        consecutive_cosines(v[:1])


def test_cross_expert_cosines_per_start():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    cos = cross_expert_cosines([a, b])
    assert torch.allclose(cos, torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(cross_expert_cosines(torch.stack([a, b])), cos)
    with pytest.raises(ValueError):
        cross_expert_cosines([a])


def test_relative_spread_is_zero_for_identical_and_one_for_opposite_targets():
    v = torch.tensor([[1.0, 2.0]]).repeat(3, 1)
    assert relative_spread(v) == pytest.approx(0.0)
    assert relative_spread(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(1.0)


def test_path_straightness_one_on_a_line_below_one_when_it_zigzags():
    line = FullBuffer(torch.arange(5.0).unsqueeze(1) * torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(path_straightness(line, 2), torch.ones(3, dtype=torch.float64))
    zigzag = FullBuffer(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]))
    assert path_straightness(zigzag, 2).item() == pytest.approx(2 / (2 * math.sqrt(2)))


# --- SGD replays ---------------------------------------------------------------------------------

def test_resampled_update_vectors_match_train_networks_and_differ_by_seed():
    model = FlatModel(build_network(TINY))
    theta = FlatModel(build_network(TINY, seed=3)).flatten()
    x, y = _data()
    recipe = SGDRecipe(lr=0.1, epochs=1, batch_size=8)
    v = resampled_update_vectors(model, theta, x, y, recipe, [5, 6])
    assert v.shape == (2, theta.numel())
    again = train_networks(model, theta.unsqueeze(0), x, y, recipe, [5])[0] - theta
    assert torch.allclose(v[0], again, atol=1e-6)
    assert not torch.allclose(v[0], v[1])


def test_sgd_step_path_has_one_point_per_minibatch_and_is_seeded():
    model = FlatModel(build_network(TINY))
    theta = FlatModel(build_network(TINY, seed=3)).flatten()
    x, y = _data(n=20)
    recipe = SGDRecipe(lr=0.1, epochs=2, batch_size=8)            # 3 minibatches per epoch (8, 8, 4)
    path = sgd_step_path(model, theta, x, y, recipe, seed=1)
    assert path.shape == (1 + 2 * 3, theta.numel())
    assert torch.equal(path[0], theta)
    assert torch.equal(path, sgd_step_path(model, theta, x, y, recipe, seed=1))
    assert (path[1:] - path[:-1]).norm(dim=-1).min() > 0
    with pytest.raises(ValueError, match="plain SGD"):
        sgd_step_path(model, theta, x, y, SGDRecipe(lr=0.1, epochs=1, momentum=0.9), seed=1)


def test_sgd_step_path_first_step_is_a_gradient_step_on_its_minibatch():
    model = FlatModel(build_network(TINY))
    theta = FlatModel(build_network(TINY, seed=3)).flatten()
    x, y = _data(n=8)
    path = sgd_step_path(model, theta, x, y, SGDRecipe(lr=0.1, epochs=1, batch_size=8), seed=0)
    t = theta.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(t, x), y)
    (g,) = torch.autograd.grad(loss, t)
    assert torch.allclose(path[1], theta - 0.1 * g, atol=1e-6)


def test_accuracy_along_matches_accuracy_per_point():
    model = FlatModel(build_network(TINY))
    points = torch.stack([FlatModel(build_network(TINY, seed=s)).flatten() for s in range(5)])
    x, y = _data()
    acc = accuracy_along(model, points, x, y, chunk=2)
    assert acc.shape == (5,)
    for i in range(5):
        logits = model(points[i], x)
        assert acc[i].item() == pytest.approx((logits.argmax(-1) == y).float().mean().item())


# --- convexified paths ---------------------------------------------------------------------------

def test_interpolation_error_zero_at_waypoints_without_smoothing():
    buf = _buffer(epochs=6)
    slices = (slice(0, 2), slice(2, 6))
    rec = convexify(buf, slices, num_waypoints=3, smooth=False)
    err = interpolation_error(buf, rec)
    assert err.shape == (7,)
    for w in rec.waypoint_epochs:
        assert err[w].item() == pytest.approx(0.0, abs=1e-7)
    assert err.max() > 0
    disp = interpolation_error(buf, rec, reference="displacement")
    assert disp[0] == 0
    assert torch.allclose(disp[1:], err[1:] * buf.params[1:].double().norm(dim=-1)
                          / (buf.params[1:] - buf.params[0]).double().norm(dim=-1))
    with pytest.raises(ValueError, match="reference"):
        interpolation_error(buf, rec, reference="other")


def test_interpolation_error_zero_for_a_straight_uniform_path():
    line = FullBuffer(1.0 + torch.arange(7.0).unsqueeze(1) * torch.tensor([[1.0, -2.0, 0.5]]))
    rec = convexify(line, (slice(0, 3),), num_waypoints=2, schedule="uniform", smooth=False)
    assert interpolation_error(line, rec).max() < 1e-6


def test_record_points_at_fractional_tau():
    buf = _buffer(epochs=4)
    rec = convexify(buf, (slice(0, 6),), num_waypoints=2, schedule="uniform", smooth=False)
    pts = record_points(rec, [0.0, 2.0, 4.0])
    assert torch.allclose(pts[1], (buf.params[0] + buf.params[4]) / 2, atol=1e-6)
    assert record_points(buf, [1, 3]).shape == (2, 6)


def test_pca_projection_recovers_a_planar_set_and_shares_the_basis():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(20, 2, generator=g))[0].T          # (2, 20) orthonormal
    a = torch.randn(8, 2, generator=g) * torch.tensor([3.0, 1.0]) @ basis
    b = torch.randn(5, 2, generator=g) @ basis
    proj = pca_projection([a, b])
    assert [c.shape for c in proj.coords] == [(8, 2), (5, 2)]
    assert proj.explained.sum().item() == pytest.approx(1.0, abs=1e-9)
    back = torch.cat(proj.coords) @ proj.components + proj.mean
    assert torch.allclose(back, torch.cat([a, b]).double(), atol=1e-5)
    # deterministic signs: the largest-magnitude entry of each component is positive
    assert (proj.components.gather(1, proj.components.abs().argmax(1, keepdim=True)) > 0).all()
    only_a = pca_projection([a, b], fit_on=[0])
    assert only_a.coords[1].shape == (5, 2)


def test_window_samples_integer_and_continuous():
    ints = window_samples("integer", 200, 2, 8, 15, seed=0)
    assert ints.shape == (200, 2)
    assert torch.equal(ints[:, 0], ints[:, 0].round()) and ints[:, 0].max() <= 7
    assert torch.equal(ints[:, 1] - ints[:, 0], torch.full((200,), 2.0, dtype=torch.float64))
    cont = window_samples("continuous", 200, 2.5, 8, 15, seed=0)
    assert (cont[:, 0] != cont[:, 0].round()).all() and cont[:, 0].max() < 8
    assert torch.allclose(cont[:, 1] - cont[:, 0], torch.full((200,), 2.5, dtype=torch.float64))
    assert torch.equal(cont, window_samples("continuous", 200, 2.5, 8, 15, seed=0))


# --- storage -------------------------------------------------------------------------------------

def test_storage_estimate_formula():
    assert storage_estimate(100, 50, 3) == 51 * 100 * 4
    assert storage_estimate(100, 50, 3, store_theta0=False) == 50 * 100 * 4
    assert storage_estimate(100, 50, 3, num_waypoints=4) == (4 * 100 + 51 * 3) * 4
    assert storage_estimate(100, 50, 3, num_waypoints=2, store_theta0=False) == (100 + 51 * 3) * 4


def test_storage_table_measures_real_files_and_round_trips(tmp_path):
    model, buffers, seeds = _tiny_buffers(count=2, epochs=4)
    rows = storage_table(buffers, TINY, {"name": "toy"}, seeds, folder=tmp_path)
    assert [r["name"] for r in rows] == ["full buffer", "K = 4", "K = 2", "K = 2, theta_0 from seed"]
    assert all(r["round_trip"] for r in rows)
    assert rows[0]["ratio"] == 1.0
    d, e, layers = model.numel, 4, len(model.layer_slices)
    estimates = [storage_estimate(d, e, layers), storage_estimate(d, e, layers, 4),
                 storage_estimate(d, e, layers, 2), storage_estimate(d, e, layers, 2, store_theta0=False)]
    for row, est in zip(rows, estimates):
        files = sorted((tmp_path / f"store_{rows.index(row)}").glob("expert_*.safetensors"))
        assert row["bytes_per_expert"] == sum(f.stat().st_size for f in files) / len(files)
        assert est <= row["bytes_per_expert"] < est + 1024       # tensors plus a small safetensors header
    assert rows[0]["bytes_per_expert"] > rows[1]["bytes_per_expert"] > rows[2]["bytes_per_expert"] \
        > rows[3]["bytes_per_expert"]
    assert rows[3]["vectors"] == 1 and rows[0]["vectors"] == e + 1


def test_storage_table_custom_settings_in_a_temporary_folder():
    _, buffers, seeds = _tiny_buffers(count=1, epochs=3)
    rows = storage_table(buffers, TINY, {"name": "toy"}, seeds,
                         settings=[StorageSetting("full"), StorageSetting("K = 3", 3)])
    assert len(rows) == 2 and rows[1]["num_waypoints"] == 3 and rows[1]["ratio"] > 1


def test_waypoint_losses_equal_match_losses():
    from mctlib.analysis import waypoint_losses
    from mctlib.matching import Student, match, plan_student

    model, buffers, _ = _tiny_buffers(count=2, epochs=4)
    x, y = _data(n=6, seed=1)
    alpha = torch.tensor(0.05)
    student = Student(model)
    plan = plan_student(6, 3, 3, torch.Generator().manual_seed(0))
    losses = waypoint_losses(student, x, y, alpha, buffers, 2, [0, 1, 2], plan)
    assert losses.shape == (2, 3)
    ref = match(student, x.clone().requires_grad_(True), y, alpha.clone().requires_grad_(True),
                buffers[1].point(1), buffers[1].point(3), plan)
    assert losses[1, 1].item() == pytest.approx(ref.loss, rel=1e-5)
    # ||V_S|| from the same unrolls: the student's own endpoint, -alpha times its summed gradients
    same, norms = waypoint_losses(student, x, y, alpha, buffers, 2, [0, 1, 2], plan, student_norms=True)
    assert torch.equal(same, losses)
    v_s = ref.theta_end.detach() - buffers[1].point(1)
    assert norms[1, 1].item() == pytest.approx(v_s.norm().item(), rel=1e-5)


# --- noise floor, window-level fidelity, straightness at any resolution ------------------------

def test_noise_floor_removes_the_small_sample_bias_of_relative_spread():
    # V = mu + noise, ||mu||^2 = 1, noise N(0, sigma^2 I_D): the true floor is D sigma^2 / (1 + D sigma^2).
    g = torch.Generator().manual_seed(0)
    dim, sigma, draws, trials = 2000, 0.01, 4, 300
    mu = torch.zeros(dim, dtype=torch.float64)
    mu[0] = 1.0
    truth = dim * sigma**2 / (1 + dim * sigma**2)
    corrected, plain = [], []
    for _ in range(trials):
        v = mu + sigma * torch.randn(draws, dim, generator=g, dtype=torch.float64)
        corrected.append(noise_floor(v))
        plain.append(relative_spread(v))
    assert sum(corrected) / trials == pytest.approx(truth, rel=0.02)
    assert sum(plain) / trials == pytest.approx(truth * (draws - 1) / draws, rel=0.02)
    # exactly R / (R - 1) times the plain estimate, on any sample
    v = torch.randn(3, 5, generator=g)
    assert noise_floor(v) == pytest.approx(relative_spread(v) * 3 / 2)
    with pytest.raises(ValueError, match="R >= 2"):
        noise_floor(torch.ones(1, 4))


def test_update_vectors_at_fractional_starts_of_a_record_and_integer_starts_of_a_buffer():
    buf = _buffer(epochs=6, dim=4)
    assert torch.equal(update_vectors_at(buf, 2, [0, 3]), update_vectors_along(buf, 2)[[0, 3]])
    # the target is clipped at E, as the sampler clips it
    assert torch.equal(update_vectors_at(buf, 2, [5])[0], buf.params[6] - buf.params[5])
    record = convexify(buf, (slice(0, 2), slice(2, 4)), 2, "uniform", smooth=False)
    v = update_vectors_at(record, 1.5, [0.5])[0]
    assert torch.allclose(v, (buf.params[6] - buf.params[0]) * 1.5 / 6, atol=1e-6)


def test_window_fidelity_hand_computed_and_perfect_on_a_straight_uniform_path():
    line = FullBuffer(torch.arange(7.0).unsqueeze(1) * torch.tensor([[1.0, -2.0, 0.5]]))
    record = convexify(line, (slice(0, 3),), 2, "uniform", smooth=False)
    fid = window_fidelity(line, record, 2, [0, 1, 2, 3])
    assert torch.allclose(fid.cosine, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(fid.norm_ratio, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(fid.loss, torch.zeros(4, dtype=torch.float64), atol=1e-12)
    # An L-shaped path (0,0) -> (1,0) -> (1,1); K = 2 uniform record is the chord to (1,1) at half speed per epoch.
    bend = FullBuffer(torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))
    rec = convexify(bend, (slice(0, 2),), 2, "uniform", smooth=False)
    fid = window_fidelity(bend, rec, 1, [0, 1])
    # SGD's V_T: (1,0) then (0,1); the record's: (0.5, 0.5) both times.
    assert torch.allclose(fid.cosine, torch.full((2,), 1 / math.sqrt(2), dtype=torch.float64))
    assert torch.allclose(fid.norm_ratio, torch.full((2,), math.sqrt(0.5), dtype=torch.float64))
    assert torch.allclose(fid.loss, torch.full((2,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="epochs"):
        window_fidelity(_buffer(epochs=3), rec, 1, [0])


def test_span_rank_counts_independent_directions():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 500, generator=g, dtype=torch.float64)
    vectors = torch.randn(40, 3, generator=g, dtype=torch.float64) @ basis
    assert span_rank(vectors) == 3
    assert span_rank(vectors + 1e-9 * torch.randn(40, 500, generator=g, dtype=torch.float64)) == 3
    assert span_rank(torch.randn(5, 500, generator=g)) == 5
    # every window of a K = 2 record lies in the span of its L per-layer chords
    buf = _buffer(epochs=8, dim=9)
    record = convexify(buf, (slice(0, 3), slice(3, 6), slice(6, 9)), 2)
    windows = update_vectors_at(record, 1.5, torch.linspace(0, 6, 50).tolist())
    assert span_rank(windows) <= 3 < span_rank(update_vectors_along(buf, 1))


def test_window_straightness_at_step_resolution():
    # a zigzag walked in unit-diagonal steps: over 2 steps the chord is 2, the walk 2 sqrt 2
    path = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [3.0, 1.0], [4.0, 0.0]])
    assert torch.allclose(window_straightness(path, 2), torch.full((3,), 1 / math.sqrt(2), dtype=torch.float64))
    # at the resolution of every second point the same walk looks straight
    assert torch.allclose(window_straightness(path[::2], 1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(window_straightness(path, 1), torch.ones(4, dtype=torch.float64))
    buf = _buffer()
    assert torch.equal(window_straightness(buf.params, 2), path_straightness(buf, 2))
    with pytest.raises(ValueError, match="window"):
        window_straightness(path, 5)


def test_accuracy_drops_with_a_threshold():
    acc = torch.tensor([[0.50, 0.49, 0.60, 0.40, 0.41], [0.1, 0.2, 0.3, 0.4, 0.5]])
    assert torch.allclose(accuracy_drops(acc), torch.tensor([0.5, 0.0], dtype=torch.float64))
    # a drop of 0.01 (one image in a hundred) is not counted at a threshold of 0.02
    assert torch.allclose(accuracy_drops(acc, 0.02), torch.tensor([0.25, 0.0], dtype=torch.float64))
    # only the marked steps count: steps 0 and 2 are drops of the first row, step 3 is not marked
    where = torch.tensor([True, False, True, False])
    assert torch.allclose(accuracy_drops(acc, 0.0, where), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(accuracy_drops(acc, 0.0, ~where), torch.tensor([0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="bool mask of 4 steps"):
        accuracy_drops(acc, 0.0, torch.ones(3, dtype=torch.bool))


def test_minibatch_sizes_are_the_split_of_sgd_step_path():
    assert minibatch_sizes(1347, 256, 2).tolist() == [256] * 5 + [67] + [256] * 5 + [67]
    assert minibatch_sizes(512, 256, 1).tolist() == [256, 256]
    model = FlatModel(build_network(TINY))
    x, y = _data(n=20)
    path = sgd_step_path(model, model.flatten(), x, y, SGDRecipe(lr=0.1, epochs=2, batch_size=8), seed=0)
    assert len(minibatch_sizes(20, 8, 2)) == len(path) - 1 and minibatch_sizes(20, 8, 2).tolist() == [8, 8, 4] * 2
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_sizes(10, 0, 1)


def test_redrawn_noise_floors_are_noise_floors_of_resampled_update_vectors():
    model, buffers, _ = _tiny_buffers(count=2, epochs=3)
    x, y = _data()
    recipe = SGDRecipe(lr=0.1, epochs=1, batch_size=8)
    floors = redrawn_noise_floors(model, buffers, [(0, 1), (1, 2)], x, y, recipe, replays=3, seed=7)
    assert floors.shape == (2,) and (floors > 0).all()
    from mctlib.training import derive_seed
    seeds = [derive_seed(7, 101, 1, 8, r) for r in range(3)]
    again = noise_floor(resampled_update_vectors(model, buffers[1].point(2), x, y, recipe, seeds))
    assert floors[1].item() == pytest.approx(again)
    with pytest.raises(ValueError, match="at least 2"):
        redrawn_noise_floors(model, buffers, [(0, 1)], x, y, recipe, replays=1, seed=0)


def test_order_replicas_share_theta0_and_each_is_its_own_training_run():
    model = FlatModel(build_network(TINY))
    theta0 = FlatModel(build_network(TINY, seed=3)).flatten()
    x, y = _data()
    recipe = SGDRecipe(lr=0.1, epochs=2, batch_size=8)
    reps = order_replicas(model, theta0, x, y, recipe, [4, 5])
    assert len(reps) == 2 and all(r.params.shape == (3, theta0.numel()) for r in reps)
    assert all(torch.equal(r.params[0], theta0) for r in reps)
    alone = train_networks(model, theta0.unsqueeze(0), x, y, recipe, [5])[0]
    assert torch.allclose(reps[1].params[-1], alone, atol=1e-6)
    assert not torch.allclose(reps[0].params[-1], reps[1].params[-1])


def test_window_spread_and_pairwise_losses_hand_computed():
    # two straight "records" whose targets at every start are (1, 0) and (-1, 0) times the window length
    a = FullBuffer(torch.arange(4.0).unsqueeze(1) * torch.tensor([[1.0, 0.0]]))
    b = FullBuffer(torch.arange(4.0).unsqueeze(1) * torch.tensor([[-1.0, 0.0]]))
    # mean 0, deviations of norm 1 each, divided by R - 1 = 1; E||V||^2 = 1: floor 2
    assert torch.allclose(window_spread([a, b], 1, [0, 2]), torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.allclose(window_spread([a, a], 1, [0, 1]), torch.zeros(2, dtype=torch.float64))
    # ||(1,0) - (-1,0)||^2 / 1 = 4 in both orders; identical draws pay nothing
    assert pairwise_losses(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(4.0)
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    by_hand = sum(((v[j] - v[i]).pow(2).sum() / v[i].pow(2).sum()).item()
                  for i in range(3) for j in range(3) if i != j) / 6
    assert pairwise_losses(v) == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="at least 2"):
        window_spread([a], 1, [0])


def test_prediction_losses_hand_computed_and_smallest_near_the_mean():
    targets = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    losses = prediction_losses(torch.tensor([1.0, 1.0]), targets)
    assert torch.allclose(losses, torch.tensor([1.0 / 1.0, 2.0 / 4.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([3.0, -1.0, 2.0]) + 0.1 * torch.randn(50, 3, generator=g)
    at_mean = prediction_losses(draws.mean(0), draws).mean()
    assert at_mean < prediction_losses(draws.mean(0) * 1.2, draws).mean()
    assert at_mean < prediction_losses(draws[0], draws).mean()


def test_layer_path_lengths_sum_each_layers_steps():
    # layer 0 = entries 0..1 moves (3, 4) then (0, 1): lengths 5 + 1; layer 1 = entry 2 never moves
    buf = FullBuffer(torch.tensor([[0.0, 0.0, 7.0], [3.0, 4.0, 7.0], [3.0, 5.0, 7.0]]))
    lengths = layer_path_lengths(buf, (slice(0, 2), slice(2, 3)))
    assert torch.allclose(lengths, torch.tensor([6.0, 0.0], dtype=torch.float64))
