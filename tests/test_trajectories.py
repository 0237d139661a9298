"""Tests for mctlib.trajectories against METHOD.md, chapter 3 ("The convexified trajectory").

Every expected value is computed here from the definitions, on a real full buffer (a tiny
ConvNet trained on 8x8 digits with plain SGD, see conftest.py): waypoints and their smoothing,
the three beta schedules, the point at continuous time, and the window sampling.
"""

import math

import pytest
import torch

from mctlib.device import generator
from mctlib.trajectories import ConvexRecorder, FullBuffer, convexify, sample_window, waypoint_epochs

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULES = ("arc_length", "uniform", "projected")
KS = (2, 4, 6, 13)  # E = 12: (0, 12), (0, 4, 8, 12), (0, 2, 4, 6, 8, 12), every epoch


# ---------------------------------------------------------------- the definitions, written out


def per_layer(model, flat):
    """The parameter tensors of a flat vector, by name (float64)."""
    return [t for t in model.unflatten(flat.double()).values()]


def moving_layers(model, buffer, a, b):
    """Layers whose parameters change by more than float32 noise between epochs a and b."""
    p = buffer.params.double()
    return torch.tensor([(x - y).norm() > 1e-5 for x, y in zip(per_layer(model, p[b]), per_layer(model, p[a]))])


def step_norms(model, buffer):
    """n[j, l] = ||theta_{l,j} - theta_{l,j-1}||, j = 1..E (row 0 unused)."""
    p = buffer.params
    rows = [torch.zeros(len(model.names), dtype=torch.float64)]
    for j in range(1, p.shape[0]):
        rows.append(torch.stack([(a - b).norm() for a, b in zip(per_layer(model, p[j]), per_layer(model, p[j - 1]))]))
    return torch.stack(rows)


def hand_beta(model, buffer, w, schedule):
    """{segment i: (w_{i+1} - w_i + 1, L) table of beta_l(e), e = w_i..w_{i+1}} from METHOD.md."""
    p, num_layers = buffer.params.double(), len(model.names)
    norms = step_norms(model, buffer) if schedule == "arc_length" else None
    tables = {}
    for i in range(len(w) - 1):
        a, b = w[i], w[i + 1]
        rows = []
        for e in range(a, b + 1):
            if schedule == "uniform":
                rows.append(torch.full((num_layers,), (e - a) / (b - a), dtype=torch.float64))
            elif schedule == "arc_length":
                done = sum((norms[j] for j in range(a + 1, e + 1)), torch.zeros(num_layers, dtype=torch.float64))
                total = sum(norms[j] for j in range(a + 1, b + 1))
                # A layer that never moves (a conv bias right before instance norm gets no gradient)
                # has no arc length; any beta gives the same point, take the uniform one.
                rows.append(torch.where(total > 0, done / total.clamp_min(1e-300), (e - a) / (b - a)))
            else:
                chord = p[b] - p[a]
                rows.append(torch.full((num_layers,), float((p[e] - p[a]).dot(chord) / chord.dot(chord)),
                                       dtype=torch.float64))
        tables[i] = torch.stack(rows)
    return tables


def hand_waypoints(buffer, w, smooth):
    """W_i = theta_{w_i}; smoothed: interior -> mean(theta_{w-1}, theta_{w+1}), last -> mean(theta_{E-1}, theta_E)."""
    p, E = buffer.params.double(), buffer.epochs
    if not smooth:
        return [p[x] for x in w]
    return [p[0]] + [(p[x - 1] + p[x + 1]) / 2 for x in w[1:-1]] + [(p[E - 1] + p[E]) / 2]


def hand_point(model, buffer, w, schedule, smooth, tau):
    """theta(tau): segment i with w_i <= tau < w_{i+1} (tau = E in the last), beta linear between
    floor(tau) and floor(tau) + 1, then theta_l = W_{i,l} + beta_l (W_{i+1,l} - W_{i,l})."""
    i = max(j for j in range(len(w) - 1) if w[j] <= tau)
    table = hand_beta(model, buffer, w, schedule)[i]
    e0 = math.floor(tau)
    f = tau - e0
    beta = table[e0 - w[i]] if f == 0 else (1 - f) * table[e0 - w[i]] + f * table[e0 + 1 - w[i]]
    W = hand_waypoints(buffer, w, smooth)
    per_entry = torch.repeat_interleave(beta, torch.tensor(model.numels))
    return W[i] + per_entry * (W[i + 1] - W[i])


def random_walk(epochs, numel, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FullBuffer(torch.randn(epochs + 1, numel, generator=g).cumsum(0) * 0.1)


# ---------------------------------------------------------------- waypoint epochs


def test_waypoint_epochs_authors_values():
    assert waypoint_epochs(50, 4) == (0, 17, 34, 50)
    assert waypoint_epochs(50, 2) == (0, 50)
    for E in range(1, 60):
        assert waypoint_epochs(E, E + 1) == tuple(range(E + 1))


def test_waypoint_epochs_strictly_increasing_and_follow_the_authors_rule():
    for E in range(1, 61):
        for K in range(2, E + 2):
            w = waypoint_epochs(E, K)
            assert len(w) == K and w[0] == 0 and w[-1] == E, (E, K, w)
            assert all(a < b for a, b in zip(w, w[1:])), (E, K, w)
            # "indices range(0, E+1, (E+1)//(K-1)) plus E": the interior ones are that range's first entries.
            assert list(w[:-1]) == list(range(0, E + 1, (E + 1) // (K - 1)))[:K - 1], (E, K, w)


@pytest.mark.parametrize("E,K", [(50, 1), (50, 0), (50, -3), (50, 52), (1, 3), (12, 100)])
def test_waypoint_epochs_invalid_K_raises(E, K):
    with pytest.raises(ValueError, match="num_waypoints"):
        waypoint_epochs(E, K)


# ---------------------------------------------------------------- beta schedules on a real buffer


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_beta_is_0_at_segment_start_and_1_at_segment_end(full_buffer, flat_model, schedule, K):
    E = full_buffer.epochs
    rec = convexify(full_buffer, flat_model.layer_slices, K, schedule, smooth=False)
    w = rec.waypoint_epochs
    assert w == waypoint_epochs(E, K)
    assert rec.beta.shape == (E + 1, len(flat_model.names))
    for i in range(K - 1):
        assert torch.equal(rec.beta[w[i]], torch.zeros(len(flat_model.names)))
        seg, beta = rec.beta_at(w[i])
        assert seg == i and torch.equal(beta, torch.zeros_like(beta))
        assert torch.equal(rec.point(w[i]), rec.waypoints[i])          # the point at w_i is waypoint i
        # beta -> 1 at the segment's end: the path arrives at waypoint i + 1 from inside segment i.
        seg, beta = rec.beta_at(w[i + 1] - 1e-9)
        assert seg == i
        torch.testing.assert_close(beta, torch.ones_like(beta), atol=1e-6, rtol=0)
        torch.testing.assert_close(rec.point(w[i + 1] - 1e-9), rec.waypoints[i + 1], atol=1e-6, rtol=0)
    assert torch.equal(rec.beta[E], torch.ones(len(flat_model.names)))
    # Without smoothing the waypoints are the checkpoints themselves.
    for i, x in enumerate(w):
        assert torch.equal(rec.waypoints[i], full_buffer.params[x])


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_beta_table_equals_the_definition(full_buffer, flat_model, schedule, K):
    rec = convexify(full_buffer, flat_model.layer_slices, K, schedule, smooth=False)
    w = rec.waypoint_epochs
    tables = hand_beta(flat_model, full_buffer, w, schedule)
    for i in range(K - 1):
        # Row e holds the progress in the segment that starts at or before e; the end row of an
        # interior segment belongs to the next segment (where it is 0). Layers that do not move
        # (beta is then arbitrary: it multiplies a zero difference) only need a beta in [0, 1].
        moving = moving_layers(model=flat_model, buffer=full_buffer, a=w[i], b=w[i + 1])
        got = rec.beta[w[i]:w[i + 1]].double()
        torch.testing.assert_close(got[:, moving], tables[i][:-1, moving], atol=1e-6, rtol=1e-6)
        assert torch.isfinite(got).all() and (got >= 0).all() and (got <= 1).all()
        torch.testing.assert_close(tables[i][-1], torch.ones_like(tables[i][-1]), atol=1e-12, rtol=0)


def test_uniform_beta_is_the_epoch_fraction(full_buffer, flat_model):
    rec = convexify(full_buffer, flat_model.layer_slices, 4, "uniform", smooth=False)
    w = rec.waypoint_epochs
    for e in range(full_buffer.epochs):
        i = max(j for j in range(len(w) - 1) if w[j] <= e)
        expected = (e - w[i]) / (w[i + 1] - w[i])
        assert torch.allclose(rec.beta[e].double(), torch.full_like(rec.beta[e], expected).double(), atol=1e-7)


@pytest.mark.parametrize("K", KS)
def test_arc_length_beta_is_monotone_per_layer(full_buffer, flat_model, K):
    rec = convexify(full_buffer, flat_model.layer_slices, K, "arc_length", smooth=False)
    w = rec.waypoint_epochs
    for i in range(K - 1):
        seg = torch.cat([rec.beta[w[i]:w[i + 1]], torch.ones(1, rec.beta.shape[1])])
        assert (seg.diff(dim=0) >= 0).all()
        assert (seg >= 0).all() and (seg <= 1).all()
    # The layers really do progress at different rates (otherwise arc_length would be a trivial test).
    if K < 13:
        assert (rec.beta[1:w[1]].std(dim=1) > 1e-4).any()


def test_projected_beta_with_K2_is_methods_formula(full_buffer, flat_model):
    """METHOD.md: beta = <theta_e - theta_0, theta_E - theta_0> / ||theta_E - theta_0||^2, one scalar for all layers."""
    p = full_buffer.params.double()
    chord = p[-1] - p[0]
    expected = torch.stack([(p[e] - p[0]).dot(chord) / chord.dot(chord) for e in range(p.shape[0])])
    rec = convexify(full_buffer, flat_model.layer_slices, 2, "projected", smooth=False)
    for col in range(rec.beta.shape[1]):
        torch.testing.assert_close(rec.beta[:, col].double(), expected, atol=1e-6, rtol=0)


def test_smoothing_does_not_change_beta(full_buffer, flat_model):
    for schedule in SCHEDULES:
        a = convexify(full_buffer, flat_model.layer_slices, 4, schedule, smooth=False)
        b = convexify(full_buffer, flat_model.layer_slices, 4, schedule, smooth=True)
        assert torch.equal(a.beta, b.beta)


# ---------------------------------------------------------------- waypoints and smoothing


def test_every_epoch_a_waypoint_without_smoothing_reproduces_the_buffer(full_buffer, flat_model):
    E = full_buffer.epochs
    for schedule in SCHEDULES:
        rec = convexify(full_buffer, flat_model.layer_slices, E + 1, schedule, smooth=False)
        assert rec.waypoint_epochs == tuple(range(E + 1))
        for e in range(E + 1):
            assert torch.equal(rec.point(e), full_buffer.params[e]), (schedule, e)


@pytest.mark.parametrize("K", (2, 4, 6, 13))
def test_smoothed_waypoints_are_neighbour_means(full_buffer, flat_model, K):
    """METHOD.md: each interior waypoint becomes mean(theta_{w-1}, theta_{w+1}); the last becomes
    mean(theta_{E-1}, theta_E); theta_0 stays. K = 6 (w = 0, 2, 4, ...) and K = 13 (every epoch)
    have waypoints two and one epochs apart, where the neighbours of one waypoint are also the
    neighbours of the next."""
    rec = convexify(full_buffer, flat_model.layer_slices, K, "arc_length", smooth=True)
    expected = hand_waypoints(full_buffer, rec.waypoint_epochs, smooth=True)
    assert torch.equal(rec.waypoints[0], full_buffer.params[0])
    for i, (got, want) in enumerate(zip(rec.waypoints, expected)):
        torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=0,
                                   msg=f"waypoint {i} (epoch {rec.waypoint_epochs[i]}) of K = {K}")


# ---------------------------------------------------------------- the point at continuous time


@pytest.mark.parametrize("smooth", (False, True))
@pytest.mark.parametrize("K", (2, 4, 13))
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_point_at_integer_tau_is_the_per_layer_lerp(full_buffer, flat_model, schedule, K, smooth):
    rec = convexify(full_buffer, flat_model.layer_slices, K, schedule, smooth)
    for e in range(full_buffer.epochs + 1):
        want = hand_point(flat_model, full_buffer, rec.waypoint_epochs, schedule, smooth, e)
        torch.testing.assert_close(rec.point(e).double(), want, atol=2e-6, rtol=0, msg=f"tau = {e}")
        assert rec.point(float(e)).dtype == full_buffer.params.dtype


@pytest.mark.parametrize("smooth", (False, True))
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_point_at_fractional_tau_interpolates_beta_linearly(full_buffer, flat_model, schedule, smooth):
    rec = convexify(full_buffer, flat_model.layer_slices, 4, schedule, smooth)
    taus = [0.25, 3.5, 3.999, 4.0001, 7.3, 11.75, 11.999999]
    taus += torch.rand(10, generator=torch.Generator().manual_seed(1), dtype=torch.float64).mul(12).tolist()
    for tau in taus:
        want = hand_point(flat_model, full_buffer, rec.waypoint_epochs, schedule, smooth, tau)
        torch.testing.assert_close(rec.point(tau).double(), want, atol=2e-6, rtol=0, msg=f"tau = {tau}")


def test_point_is_continuous_in_tau(full_buffer, flat_model):
    rec = convexify(full_buffer, flat_model.layer_slices, 4, "arc_length", smooth=True)
    for tau in (0.5, 3.0, 4.0, 5.5, 8.0, 11.0, 12.0):
        a, b = rec.point(max(tau - 1e-7, 0.0)), rec.point(tau)
        assert (a - b).abs().max() < 1e-5, tau


@pytest.mark.parametrize("K", (2, 4, 6, 13))
@pytest.mark.parametrize("smooth", (False, True))
def test_point_at_E_is_the_last_waypoint(full_buffer, flat_model, K, smooth):
    """The published get_point_n returns nothing at exactly the last index (METHOD.md, defects)."""
    rec = convexify(full_buffer, flat_model.layer_slices, K, "arc_length", smooth)
    E = full_buffer.epochs
    assert torch.equal(rec.point(E), rec.waypoints[-1])
    assert torch.equal(rec.point(float(E)), rec.waypoints[-1])


@pytest.mark.parametrize("tau", (-0.5, -1e-6, 12 + 1e-6, 12.5, 13, float("nan")))
def test_point_outside_the_trajectory_raises(full_buffer, flat_model, tau):
    rec = convexify(full_buffer, flat_model.layer_slices, 4, "arc_length")
    with pytest.raises(ValueError, match="tau"):
        rec.point(tau)


# ---------------------------------------------------------------- streaming recorder


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_streaming_recorder_equals_convexify_of_the_stored_buffer(full_buffer, flat_model, schedule):
    E = full_buffer.epochs
    want = convexify(full_buffer, flat_model.layer_slices, 4, schedule, smooth=True)
    rec = ConvexRecorder(flat_model.layer_slices, E, 4, schedule, smooth=True)
    # A live parameter tensor, overwritten in place every epoch (as a training loop does): the
    # recorder must copy, not alias (METHOD.md: MTT's CPU snapshots were all the final weights).
    live = full_buffer.params[0].clone()
    for e in range(E + 1):
        live.copy_(full_buffer.params[e])
        rec.update(e, live)
    live.fill_(float("nan"))
    got = rec.finish()
    assert got.waypoint_epochs == want.waypoint_epochs
    assert torch.equal(got.waypoints, want.waypoints)
    assert torch.equal(got.beta, want.beta)
    for tau in (0, 2.5, 7.25, E):
        assert torch.equal(got.point(tau), want.point(tau))


@pytest.mark.parametrize("schedule", ("arc_length", "uniform"))
def test_streaming_recorder_holds_a_few_vectors_not_the_trajectory(flat_model, recorder_probe, schedule):
    """With E = 40 and K = 4 the recorder never holds more than about 2K vectors (waypoints,
    their smoothed versions, the previous checkpoint), far fewer than the 41 checkpoints."""
    E, K, D = 40, 4, flat_model.numel
    buffer = random_walk(E, D)
    rec = ConvexRecorder(flat_model.layer_slices, E, K, schedule, smooth=True)
    held = []
    for e, theta in buffer.checkpoints():
        rec.update(e, theta.clone())
        held.append(recorder_probe(rec, D))
    assert max(held) <= 2 * K + 2, held
    got = rec.finish()
    want = convexify(buffer, flat_model.layer_slices, K, schedule, smooth=True)
    assert torch.equal(got.waypoints, want.waypoints) and torch.equal(got.beta, want.beta)


def test_streaming_recorder_rejects_out_of_order_epochs(flat_model, full_buffer):
    slices, E = flat_model.layer_slices, full_buffer.epochs
    p = full_buffer.params
    rec = ConvexRecorder(slices, E, 4)
    with pytest.raises(ValueError, match="order"):
        rec.update(1, p[1])                      # must start at epoch 0
    rec = ConvexRecorder(slices, E, 4)
    rec.update(0, p[0])
    rec.update(1, p[1])
    with pytest.raises(ValueError, match="order"):
        rec.update(3, p[3])                      # skipped epoch 2
    with pytest.raises(ValueError, match="order"):
        rec.update(1, p[1])                      # repeated epoch 1
    with pytest.raises(ValueError):
        rec.finish()                             # incomplete trajectory


def test_recorder_rejects_an_unknown_schedule(flat_model):
    with pytest.raises(ValueError, match="schedule"):
        ConvexRecorder(flat_model.layer_slices, 12, 4, "cosine")


# ---------------------------------------------------------------- window sampling


@pytest.mark.parametrize("M,max_start,E", [(2.0, 10.0, 12), (5.5, 9.5, 12), (2.0, 4.0, 50), (15.0, 8.0, 20)])
def test_continuous_window(M, max_start, E):
    g = generator(0)
    draws = [sample_window(g, "continuous", M, max_start, E) for _ in range(2000)]
    starts = torch.tensor([s for s, _ in draws], dtype=torch.float64)
    for s, t in draws:
        assert isinstance(s, float) and isinstance(t, float)
        assert 0 <= s < max_start
        assert t == min(s + M, E)
        assert 0 <= s < t <= E
    assert (starts != starts.round()).float().mean() > 0.99          # real-valued, not integers
    # Uniform on [0, max_start): mean max_start/2, std max_start/sqrt(12) (within 5 sigma of the mean's error).
    assert abs(starts.mean().item() - max_start / 2) < 5 * max_start / math.sqrt(12 * len(draws))
    assert starts.max().item() > 0.95 * max_start and starts.min().item() < 0.05 * max_start


@pytest.mark.parametrize("M,max_start,E", [(2, 10, 12), (3, 20, 50), (2, 2, 15), (1.0, 5.0, 6)])
def test_integer_window(M, max_start, E):
    g = generator(1)
    starts = set()
    for _ in range(1000):
        s, t = sample_window(g, "integer", M, max_start, E)
        assert s == int(s) and t == int(t)
        assert 0 <= s < max_start
        assert t == s + M <= E
        starts.add(int(s))
    assert len(starts) > 1 and 0 in starts


@pytest.mark.parametrize("sampling", ("integer", "continuous"))
def test_window_draws_are_reproducible_from_the_seed(sampling):
    def draws(seed):
        g = generator(seed)
        return [sample_window(g, sampling, 2.0, 10.0, 12) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


# ---------------------------------------------------------------- the full buffer


def test_full_buffer_point_is_the_checkpoint_and_rejects_fractional_tau(full_buffer):
    E = full_buffer.epochs
    for e in range(E + 1):
        assert torch.equal(full_buffer.point(e), full_buffer.params[e])
        assert torch.equal(full_buffer.point(float(e)), full_buffer.params[e])
    for tau in (0.5, 2.25, E - 0.001, -1, E + 1):
        with pytest.raises(ValueError):
            full_buffer.point(tau)


def test_full_buffer_checkpoints_are_distinct_snapshots(full_buffer):
    """Real snapshots, not aliases of the final weights (METHOD.md, MTT buffer.py defect)."""
    p = full_buffer.params
    assert p.shape[0] == full_buffer.epochs + 1
    assert all(not torch.equal(p[e], p[e + 1]) for e in range(full_buffer.epochs))
