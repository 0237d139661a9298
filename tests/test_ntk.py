"""Tests for mctlib.ntk: each result checked by an independent route (explicit autograd loops,
finite differences, the discrete recursion, hand-computed geometry)."""

import math

import pytest
import torch
import torch.nn as nn

from mctlib.networks import FlatModel, NetConfig, build_network
from mctlib.ntk import (EigenProgress, chord_coordinates, class_structure, closed_form_params, closed_form_trajectory, distance_from_chord,
                        eigen_components, empirical_ntk, full_batch_path, jacobian, linearise, points_on_chord,
                        sample_kernel, spectrum, train_linearised_and_real)

TINY = NetConfig(arch="convnet", channels=1, num_classes=3, image_size=8, width=4, depth=2)


def _convnet(dtype=torch.float32):
    model = FlatModel(build_network(TINY, seed=0).to(dtype))
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return model, model.flatten(), x


def _mlp(num_inputs=4, dtype=torch.float64, seed=0):
    """A tanh MLP, D = 163 >> N·C, so its NTK on a few inputs is full rank."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    model = FlatModel(module)
    x = torch.randn(num_inputs, 6, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    return model, model.flatten(), x


def _hand_jacobian(model, theta, x):
    """Explicit route: one autograd.grad per (input, output) pair, each input through the net alone."""
    rows = []
    for n in range(x.shape[0]):
        th = theta.clone().requires_grad_(True)
        out = model(th, x[n:n + 1])[0]
        for c in range(out.shape[0]):
            (g,) = torch.autograd.grad(out[c], th, retain_graph=True)
            rows.append(g)
    return torch.stack(rows)


# --- Jacobian and NTK --------------------------------------------------------------------------

def test_empirical_ntk_equals_hand_jacobian_product():
    model, theta, x = _convnet(torch.float64)
    hand = _hand_jacobian(model, theta, x)
    assert torch.allclose(jacobian(model, theta, x, chunk_size=2), hand, atol=1e-12)
    ntk = empirical_ntk(model, theta, x, chunk_size=2)
    assert ntk.shape == (5 * 3, 5 * 3)
    assert torch.allclose(ntk, hand @ hand.T, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ntk, ntk.T)
    assert torch.linalg.eigvalsh(ntk).min() > -1e-9 * torch.linalg.eigvalsh(ntk).max()


def test_cross_ntk_and_sample_kernel_layout():
    model, theta, x = _convnet(torch.float64)
    x2 = x[:2] * 0.5
    cross = empirical_ntk(model, theta, x, x2)
    assert cross.shape == (15, 6)
    j1, j2 = _hand_jacobian(model, theta, x), _hand_jacobian(model, theta, x2)
    assert torch.allclose(cross, j1 @ j2.T, rtol=1e-10, atol=1e-12)
    # sample-major: block (n, m) is rows n·C..n·C+C, columns m·C..m·C+C
    k = sample_kernel(cross, 3)
    assert k.shape == (5, 2)
    assert math.isclose(k[3, 1].item(), torch.diagonal(cross[9:12, 3:6]).mean().item(), rel_tol=1e-12)


# --- linearised model --------------------------------------------------------------------------

def test_linearised_value_derivative_and_linearity():
    model, theta0, x = _convnet(torch.float64)
    lin = linearise(model, theta0)
    assert torch.allclose(lin(theta0, x), model(theta0, x), atol=1e-12)
    g = torch.Generator().manual_seed(3)
    u, v = (torch.randn(theta0.shape, generator=g, dtype=torch.float64) for _ in range(2))
    f0 = model(theta0, x)
    # derivative along u = central finite difference of the REAL model at theta0
    eps = 1e-5
    fd = (model(theta0 + eps * u, x) - model(theta0 - eps * u, x)) / (2 * eps)
    assert torch.allclose(lin(theta0 + u, x) - f0, fd, rtol=1e-6, atol=1e-8)
    # exactly affine in theta: f_lin(θ0 + a u + b v) − f0 = a (f_lin(θ0+u) − f0) + b (f_lin(θ0+v) − f0)
    a, b = 2.5, -0.7
    lhs = lin(theta0 + a * u + b * v, x) - f0
    rhs = a * (lin(theta0 + u, x) - f0) + b * (lin(theta0 + v, x) - f0)
    assert torch.allclose(lhs, rhs, atol=1e-10)
    # the traced replay for a fixed batch is the same function
    assert torch.allclose(lin.on(x)(theta0 + a * u), lin(theta0 + a * u, x), atol=1e-10)
    # and its gradient helper is J0ᵀ w
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(lin.gradient(x, w), _hand_jacobian(model, theta0, x).T @ w.reshape(-1), atol=1e-10)


# --- closed form vs discrete gradient descent --------------------------------------------------

def test_closed_form_matches_discrete_linearised_gd_for_small_lr():
    model, theta0, x = _mlp(num_inputs=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ntk = empirical_ntk(model, theta0, x)
    f0 = model(theta0, x).detach()
    lam_max = torch.linalg.eigvalsh(ntk).max().item()
    lr = 0.02 * 6 / lam_max                      # rate·λ_max = 0.02 per step: close to the flow
    steps = 150
    run = train_linearised_and_real(model, theta0, x, labels, steps=steps, lr=lr, record_every=10)
    assert run.steps.tolist() == list(range(0, steps + 1, 10))
    # discrete GD on the linear model is exactly f_k − Y = (I − rate·Θ0)^k (f0 − Y)
    y = torch.nn.functional.one_hot(labels, 3).double()
    step_matrix = torch.eye(18, dtype=torch.float64) - lr / 6 * ntk
    exact = torch.stack([y.reshape(-1) + torch.linalg.matrix_power(step_matrix, int(k)) @ (f0 - y).reshape(-1)
                         for k in run.steps])
    assert torch.allclose(run.lin_logits.reshape(len(run.steps), -1), exact, atol=1e-10)
    # the gradient-flow closed form agrees with the discrete run to O(lr)
    flow = closed_form_trajectory(ntk, f0, labels, lr, run.steps)
    assert flow.shape == (len(run.steps), 6, 3)
    moved = (run.lin_logits[-1] - f0).norm()
    assert (flow - run.lin_logits).flatten(1).norm(dim=1).max() < 0.03 * moved
    params = closed_form_params(model, theta0, x, ntk, f0, labels, lr, run.steps)
    travelled = (run.lin_params[-1] - theta0).norm()
    assert (params - run.lin_params).norm(dim=1).max() < 0.03 * travelled
    # parameter- and function-space closed forms are one trajectory: f_lin(θ(t)) = f(t)
    lin = linearise(model, theta0)
    assert torch.allclose(torch.stack([lin(p, x) for p in params]), flow, atol=1e-8)
    # linear-model eigen-components move monotonically
    prog = eigen_components(ntk, f0, labels, run.lin_logits, k=5)
    assert prog.progress.shape == (len(run.steps), 5)
    assert torch.all(prog.backtrack() < 1e-9)
    assert torch.all(prog.progress[0].abs() < 1e-9)


def test_closed_form_fits_the_training_set_as_t_grows():
    model, theta0, x = _mlp(num_inputs=4)
    labels = torch.tensor([2, 0, 1, 1])
    ntk = empirical_ntk(model, theta0, x)
    assert torch.linalg.matrix_rank(ntk) == 12   # full rank: D = 163 >> N·C = 12
    f0 = model(theta0, x).detach()
    y = torch.nn.functional.one_hot(labels, 3).double()
    f = closed_form_trajectory(ntk, f0, y, eta=1.0, t=[0.0, 1e12])
    assert torch.allclose(f[0], f0, atol=1e-12)
    assert (f[1] - y).abs().max() < 1e-8
    # θ∞ = θ0 − J0ᵀ Θ0⁻¹ (f0 − Y), and the linear model fits the data there
    theta_inf = closed_form_params(model, theta0, x, ntk, f0, y, 1.0, 1e12)[0]
    j = _hand_jacobian(model, theta0, x)
    expected = theta0 - j.T @ torch.linalg.solve(j @ j.T, (f0 - y).reshape(-1))
    assert torch.allclose(theta_inf, expected, atol=1e-8)
    assert (linearise(model, theta0)(theta_inf, x) - y).abs().max() < 1e-8


def test_closed_form_sum_convention_is_mean_with_lr_over_n():
    model, theta0, x = _mlp(num_inputs=4)
    labels = torch.tensor([0, 1, 2, 0])
    ntk, f0 = empirical_ntk(model, theta0, x), model(theta0, x).detach()
    a = closed_form_trajectory(ntk, f0, labels, 0.4, [3.0, 7.0], reduction="sum")
    b = closed_form_trajectory(ntk, f0, labels, 0.4 * 4, [3.0, 7.0], reduction="mean")
    assert torch.allclose(a, b, atol=1e-12)
    # a precomputed spectrum gives the same trajectory as the kernel itself
    assert torch.allclose(closed_form_trajectory(spectrum(ntk), f0, labels, 0.4, [3.0, 7.0], reduction="sum"), a)
    with pytest.raises(ValueError, match="reduction"):
        closed_form_trajectory(ntk, f0, labels, 0.4, 1.0, reduction="max")


def test_minibatch_run_is_seeded_and_real_network_trains():
    model, theta0, x = _convnet()
    x = torch.cat([x, x.flip(-1)])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    kw = dict(steps=6, lr=0.05, batch_size=4, seed=5, eval_images=x, eval_labels=labels, loss="ce")
    a = train_linearised_and_real(model, theta0, x, labels, **kw)
    b = train_linearised_and_real(model, theta0, x, labels, **kw)
    assert torch.equal(a.real_params, b.real_params) and torch.equal(a.lin_params, b.lin_params)
    assert a.real_params.shape == (7, model.numel) and a.real_test_acc.shape == (7,)
    assert torch.equal(a.real_params[0], theta0) and torch.equal(a.lin_params[0], theta0)
    assert a.param_gap()[0] == 0 and a.agreement()[0] == 1
    # one step from theta0: both models take the same gradient step
    one = train_linearised_and_real(model, theta0, x, labels, steps=1, lr=0.05)
    assert torch.allclose(one.real_params[1], one.lin_params[1], atol=1e-6)


def test_full_batch_path_takes_plain_gradient_steps_on_the_whole_set():
    model, theta0, x = _convnet()
    x = torch.cat([x, x.flip(-1)])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    path = full_batch_path(model, theta0, x, labels, lr=0.05, steps=2)
    assert path.shape == (3, model.numel) and torch.equal(path[0], theta0)
    # independent route: the mean cross-entropy on all ten images, one autograd step at a time
    theta = theta0.clone()
    for k in (1, 2):
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(th, x), labels), th)
        theta = theta - 0.05 * g
        assert torch.allclose(path[k], theta, atol=1e-6)
    # augmentation is drawn from the seed: the same seed gives the same path
    def flip(images, seed):
        return images.flip(-1) if seed % 2 else images
    a = full_batch_path(model, theta0, x, labels, 0.05, 3, flip, seed=4)
    assert torch.equal(a, full_batch_path(model, theta0, x, labels, 0.05, 3, flip, seed=4))
    with pytest.raises(ValueError, match="steps"):
        full_batch_path(model, theta0, x, labels, 0.05, 0)


# --- straightness ------------------------------------------------------------------------------

def test_distance_from_chord_straight_and_hand_computed():
    start, end = torch.randn(7), torch.randn(7)
    straight = points_on_chord(start, end, [0.0, 0.2, 0.5, 1.3, 1.0])
    assert torch.allclose(distance_from_chord(straight), torch.zeros(5, dtype=torch.float64), atol=1e-6)
    # 2-D toy: chord (0,0) → (4,0), length 4; (1,2) is 2 away, (3,-1) is 1 away, (5,1) is 1 away
    path = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [5.0, 1.0], [4.0, 0.0]])
    assert torch.allclose(distance_from_chord(path), torch.tensor([0.0, 0.5, 0.25, 0.25, 0.0], dtype=torch.float64))
    # positions along the chord: projections on the x axis ÷ 4
    along, dist = chord_coordinates(path)
    assert torch.allclose(along, torch.tensor([0.0, 0.25, 0.75, 1.25, 1.0], dtype=torch.float64))
    assert torch.equal(dist, distance_from_chord(path))
    # invariant to translating and rotating the path
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    assert torch.allclose(distance_from_chord(path @ rot.T + 3.0), distance_from_chord(path))
    with pytest.raises(ValueError, match="chord"):
        distance_from_chord(torch.tensor([[1.0, 1.0], [2.0, 0.0], [1.0, 1.0]]))


def test_backtrack_is_zero_for_monotone_curves_either_way_and_measures_what_is_undone():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    up, drift_away = t**2, -3 * t                              # monotone, one of them away from the fit
    there_and_back = torch.cat([t[:6], t[:5].flip(0)])         # 0 .. 0.5 .. 0: everything undone
    prog = EigenProgress(ranks=torch.arange(3), eigvals=torch.ones(3),
                         progress=torch.stack([up, drift_away, there_and_back], 1))
    back = prog.backtrack()
    assert back[0] == 0 and back[1] == 0
    assert back[2] == pytest.approx(1.0)
    # up by 1, back by 0.5: half of the forward movement is undone, at any scale or sign
    half_back = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    for scale in (1.0, 1e-6, -40.0):
        p = EigenProgress(ranks=torch.arange(1), eigvals=torch.ones(1), progress=scale * half_back[:, None])
        assert p.backtrack()[0] == pytest.approx(0.5)
    # two oscillations: forward 1 + 1, backward 0.5 + 0.5 -> 1/2
    wobble = torch.tensor([0.0, 1.0, 0.5, 1.5, 1.0], dtype=torch.float64)
    p = EigenProgress(ranks=torch.arange(1), eigvals=torch.ones(1), progress=wobble[:, None])
    assert p.backtrack()[0] == pytest.approx(0.5)


def test_class_structure_recovers_a_kronecker_kernel_and_measures_the_rest():
    g = torch.Generator().manual_seed(0)
    n, c = 6, 3
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    k = a @ a.T
    exact = torch.kron(k, torch.eye(c, dtype=torch.float64))
    fit = class_structure(exact, c)
    assert torch.allclose(fit.kernel, k) and fit.residual == pytest.approx(0.0, abs=1e-12)
    # each eigenvalue of K appears C times in K ⊗ I_C
    lam = torch.linalg.eigvalsh(exact).flip(0)
    assert torch.allclose(lam, fit.kernel_eigvals.repeat_interleave(c))
    # a part with zero-diagonal class blocks is exactly what the fit leaves out
    off = torch.ones(c, c, dtype=torch.float64) - torch.eye(c, dtype=torch.float64)
    extra = 0.3 * torch.kron(k, off)
    fit = class_structure(exact + extra, c)
    assert torch.allclose(fit.kernel, k)
    assert fit.residual == pytest.approx(float(extra.norm() / (exact + extra).norm()))
    # a Kronecker product with a coupled B is fitted exactly by the general form, not by K ⊗ I_C
    b = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=torch.float64)
    coupled = torch.kron(k, b)
    fit = class_structure(coupled, c)
    assert fit.kron_residual == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(fit.coupling, b * (c / b.trace()), atol=1e-8)
    assert fit.residual > 0.1
    # K' ⊗ B rebuilds the kernel, and its predicted spectrum is Θ0's (products λ_i(K') μ_j(B))
    assert torch.allclose(torch.kron(fit.kron_kernel, fit.coupling), coupled, atol=1e-9)
    assert torch.allclose(fit.kron_eigvals(), torch.linalg.eigvalsh(coupled).flip(0), atol=1e-8)
    assert class_structure(exact, c).kron_residual == pytest.approx(0.0, abs=1e-7)
    # on a real network's NTK the fit is the class-averaged sample kernel
    model, theta, x = _convnet(torch.float64)
    ntk = empirical_ntk(model, theta, x)
    assert torch.allclose(class_structure(ntk, 3).kernel, sample_kernel(ntk, 3))
    with pytest.raises(ValueError, match="C = 4"):
        class_structure(ntk, 4)
