"""Tests for mctlib.matching against METHOD.md ("MTT objective", "The objective transformation",
"Gradient modes"), on real digits images and a real expert window of a tiny ConvNet, in float64.

Independent references: the update-vector identity, central finite differences of the loss
(written here without mctlib.matching), and the constant-memory formula of METHOD.md coded
from scratch.
"""

import pytest
import torch
import torch.nn.functional as F

from mctlib.augment import DSA
from mctlib.data import real_images_per_class
from mctlib.device import generator
from mctlib.matching import Student, match, matching_loss, plan_student, update_vectors
from mctlib.networks import FlatModel, build_network

pytestmark = pytest.mark.usefixtures("one_thread")

IPC = 2          # |S| = 20 synthetic images
BATCH_SYN = 7    # smaller than |S|: permutation chunks of 7, 7, 6
ALPHA = 0.05     # the fixture experts' lr


# ---------------------------------------------------------------- setup


@pytest.fixture(scope="module")
def setup(digits8, tiny_net, full_buffer):
    """A float64 student network, S = 2 real digits per class, and the expert window theta_2 -> theta_4."""
    model = FlatModel(build_network(tiny_net, seed=0).double())
    images, labels = real_images_per_class(digits8.train_images, digits8.train_labels, 10, IPC, generator(0))
    return dict(model=model, images=images.double(), labels=labels,
                theta_start=full_buffer.params[2].double(), theta_target=full_buffer.params[4].double())


def make_plan(syn_steps, batch_syn=BATCH_SYN, seed=0, n=10 * IPC):
    return plan_student(n, syn_steps, batch_syn, generator(seed))


def run_match(setup, plan, mode, dsa, alpha=ALPHA, images=None):
    """(loss, dL/dS, dL/dalpha) from mctlib.matching.match."""
    images = (setup["images"] if images is None else images).clone().requires_grad_(True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    student = Student(setup["model"], DSA() if dsa else None)
    result = match(student, images, setup["labels"], a, setup["theta_start"], setup["theta_target"], plan, mode)
    return result.loss, images.grad, a.grad


def reference_loss(setup, images, alpha, plan, dsa):
    """L = ||theta_N - theta_target||^2 / ||theta_start - theta_target||^2 with N plain SGD steps
    theta_{k+1} = theta_k - alpha g_k, g_k = grad CE(f(DSA(S_{b_k}); theta_k), y_{b_k}); no mctlib.matching."""
    model, labels = setup["model"], setup["labels"]
    theta_s, theta_t = setup["theta_start"], setup["theta_target"]
    augment = DSA() if dsa else None
    theta = theta_s.clone()
    for k, idx in enumerate(plan.batches):
        theta = theta.detach().requires_grad_(True)
        x = images[idx] if augment is None else augment(images[idx], plan.aug_seeds[k])
        (g,) = torch.autograd.grad(F.cross_entropy(model(theta, x), labels[idx]), theta)
        theta = theta - alpha * g
    return float(((theta - theta_t).pow(2).sum() / (theta_s - theta_t).pow(2).sum()).detach())


def constant_memory_reference(setup, plan, dsa, alpha=ALPHA):
    """METHOD.md, constant memory: run the N steps detached, G = sum_k g_k; the images' gradient is
    d/dS sum_k 2 <alpha (theta_t - theta_s) + alpha^2 G, g_k(S)> / ||theta_s - theta_t||^2 with
    theta_k fixed; alpha's gradient is dL/dalpha of L(alpha) = ||theta_s - alpha G - theta_t||^2 / ||theta_s - theta_t||^2."""
    model, labels = setup["model"], setup["labels"]
    theta_s, theta_t = setup["theta_start"], setup["theta_target"]
    augment = DSA() if dsa else None
    S = setup["images"].clone().requires_grad_(True)

    def g_k(theta, k, create_graph):
        theta = theta.detach().requires_grad_(True)
        idx = plan.batches[k]
        x = S[idx] if augment is None else augment(S[idx], plan.aug_seeds[k])
        return torch.autograd.grad(F.cross_entropy(model(theta, x), labels[idx]), theta, create_graph=create_graph)[0]

    thetas, G, theta = [], torch.zeros_like(theta_s), theta_s.clone()
    for k in range(plan.syn_steps):
        thetas.append(theta)
        g = g_k(theta, k, create_graph=False)
        G = G + g
        theta = theta - alpha * g
    denom = (theta_s - theta_t).pow(2).sum()
    c = alpha * (theta_t - theta_s) + alpha**2 * G
    objective = sum(2 * c.dot(g_k(thetas[k], k, create_graph=True)) / denom for k in range(plan.syn_steps))
    (image_grad,) = torch.autograd.grad(objective, S)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    loss_alpha = (theta_s - a * G - theta_t).pow(2).sum() / denom
    (alpha_grad,) = torch.autograd.grad(loss_alpha, a)
    return image_grad, alpha_grad


def rel(a, b):
    return float((a - b).norm() / b.norm())


def cosine(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# ---------------------------------------------------------------- the objective


@pytest.mark.parametrize("dsa", (False, True))
def test_objective_is_the_update_vector_distance(setup, dsa):
    """||theta_N - theta_target||^2 = ||V_S - V_T||^2 and L = ||V_S - V_T||^2 / ||V_T||^2, with
    V_S = theta_N - theta_start = -alpha sum_k g_k (METHOD.md, chapter 1)."""
    plan = make_plan(5)
    student = Student(setup["model"], DSA() if dsa else None)
    theta_s, theta_t = setup["theta_start"], setup["theta_target"]
    alpha = torch.tensor(ALPHA, dtype=torch.float64)
    theta_n, kept, G = student.unroll(theta_s, setup["images"], setup["labels"], alpha, plan, keep=True)
    assert len(kept) == 5 and torch.equal(kept[0], theta_s)
    v_s, v_t = update_vectors(theta_n, theta_s, theta_t)
    torch.testing.assert_close(v_s, -ALPHA * G, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(v_t, theta_t - theta_s, rtol=0, atol=0)
    assert v_s.norm() > 1e-3 * v_t.norm()                        # the student really moved
    lhs = (theta_n - theta_t).pow(2).sum()
    torch.testing.assert_close(lhs, (v_s - v_t).pow(2).sum(), rtol=1e-12, atol=0)
    L = matching_loss(theta_n, theta_s, theta_t)
    torch.testing.assert_close(L, (v_s - v_t).pow(2).sum() / v_t.pow(2).sum(), rtol=1e-12, atol=0)
    # The student's steps are plain SGD on S (the reference loop), and match() reports the same L.
    assert abs(float(L) - reference_loss(setup, setup["images"], ALPHA, plan, dsa)) < 1e-12
    for mode in ("unrolled", "checkpointed", "constant_memory"):
        loss, _, _ = run_match(setup, plan, mode, dsa)
        assert abs(loss - float(L)) < 1e-12, mode


# ---------------------------------------------------------------- exact gradients


@pytest.mark.parametrize("dsa", (False, True))
def test_unrolled_gradient_matches_finite_differences(setup, dsa):
    plan = make_plan(4)
    _, image_grad, alpha_grad = run_match(setup, plan, "unrolled", dsa)
    S = setup["images"]
    flat = image_grad.flatten()
    # The four pixels with the largest gradient, and four random ones that have some gradient.
    picks = flat.abs().topk(4).indices.tolist()
    candidates = torch.nonzero(flat.abs() > 1e-3 * flat.abs().max()).flatten()
    picks += candidates[torch.randperm(len(candidates), generator=generator(1))[:4]].tolist()
    h = 1e-5
    for p in picks:
        up, down = S.clone().flatten(), S.clone().flatten()
        up[p] += h
        down[p] -= h
        fd = (reference_loss(setup, up.view_as(S), ALPHA, plan, dsa)
              - reference_loss(setup, down.view_as(S), ALPHA, plan, dsa)) / (2 * h)
        assert abs(fd - float(flat[p])) <= 1e-5 * abs(fd) + 1e-9, (p, fd, float(flat[p]))
    h = 1e-6
    fd = (reference_loss(setup, S, ALPHA + h, plan, dsa) - reference_loss(setup, S, ALPHA - h, plan, dsa)) / (2 * h)
    assert abs(fd - float(alpha_grad)) <= 1e-6 * abs(fd) + 1e-9, (fd, float(alpha_grad))
    assert abs(fd) > 1e-3


@pytest.mark.parametrize("dsa", (False, True))
@pytest.mark.parametrize("syn_steps", (1, 3, 8))
def test_checkpointed_equals_unrolled(setup, syn_steps, dsa):
    plan = make_plan(syn_steps)
    assert all(len(b) < 10 * IPC for b in plan.batches)
    loss_u, img_u, a_u = run_match(setup, plan, "unrolled", dsa)
    loss_c, img_c, a_c = run_match(setup, plan, "checkpointed", dsa)
    assert abs(loss_u - loss_c) < 1e-12
    torch.testing.assert_close(img_c, img_u, rtol=1e-9, atol=1e-9 * float(img_u.abs().max()))
    torch.testing.assert_close(a_c, a_u, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dsa", (False, True))
def test_constant_memory_equals_unrolled_for_one_step(setup, dsa):
    for batch_syn in (BATCH_SYN, None):
        plan = make_plan(1, batch_syn)
        _, img_u, a_u = run_match(setup, plan, "unrolled", dsa)
        _, img_m, a_m = run_match(setup, plan, "constant_memory", dsa)
        torch.testing.assert_close(img_m, img_u, rtol=1e-9, atol=1e-9 * float(img_u.abs().max()))
        torch.testing.assert_close(a_m, a_u, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dsa", (False, True))
def test_constant_memory_differs_from_unrolled_for_several_steps(setup, dsa):
    plan = make_plan(4)
    _, img_u, _ = run_match(setup, plan, "unrolled", dsa)
    _, img_m, _ = run_match(setup, plan, "constant_memory", dsa)
    assert rel(img_m, img_u) > 1e-6


@pytest.mark.parametrize("dsa", (False, True))
@pytest.mark.parametrize("syn_steps", (1, 3, 6))
def test_constant_memory_is_methods_formula(setup, syn_steps, dsa):
    plan = make_plan(syn_steps)
    _, img_m, a_m = run_match(setup, plan, "constant_memory", dsa)
    img_ref, a_ref = constant_memory_reference(setup, plan, dsa)
    assert img_ref.abs().max() > 0
    torch.testing.assert_close(img_m, img_ref, rtol=1e-9, atol=1e-9 * float(img_ref.abs().max()))
    torch.testing.assert_close(a_m, a_ref, rtol=1e-9, atol=0)


@pytest.mark.parametrize("syn_steps", (2, 5, 10))
def test_constant_memory_vs_unrolled_measured(setup, syn_steps):
    """How far the constant-memory gradient is from the exact one (printed; run pytest -s)."""
    for alpha in (0.01, ALPHA):
        plan = make_plan(syn_steps, batch_syn=None, seed=syn_steps)
        _, img_u, a_u = run_match(setup, plan, "unrolled", dsa=True, alpha=alpha)
        _, img_m, a_m = run_match(setup, plan, "constant_memory", dsa=True, alpha=alpha)
        r, c = rel(img_m, img_u), cosine(img_m, img_u)
        print(f"\n[constant_memory vs unrolled] syn_steps={syn_steps:2d} alpha={alpha:.2f} |S|={10 * IPC} DSA on, "
              f"full batch: images grad rel diff {r:.3e}, cosine {c:.6f}; alpha grad rel diff "
              f"{abs(float(a_m - a_u)) / abs(float(a_u)):.3e}")
        assert c > 0 and r < 1


def test_gradients_accumulate(setup):
    """match() adds to existing .grad (as autograd does), so several windows can be summed."""
    plan = make_plan(3)
    for mode in ("unrolled", "checkpointed", "constant_memory"):
        images = setup["images"].clone().requires_grad_(True)
        a = torch.tensor(ALPHA, dtype=torch.float64, requires_grad=True)
        student = Student(setup["model"])
        for _ in range(2):
            match(student, images, setup["labels"], a, setup["theta_start"], setup["theta_target"], plan, mode)
        _, once, a_once = run_match(setup, plan, mode, dsa=False)
        torch.testing.assert_close(images.grad, 2 * once, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.grad, 2 * a_once, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- the student's plan


@pytest.mark.parametrize("n,batch_syn,syn_steps", [(20, 7, 10), (20, None, 4), (20, 20, 3), (20, 50, 2), (13, 4, 9)])
def test_plan_walks_through_permutations_in_chunks(n, batch_syn, syn_steps):
    plan = plan_student(n, syn_steps, batch_syn, generator(0))
    b = n if batch_syn is None else min(batch_syn, n)
    per_perm = -(-n // b)
    assert plan.syn_steps == syn_steps == len(plan.batches) == len(plan.aug_seeds)
    for start in range(0, syn_steps, per_perm):
        group = plan.batches[start:start + per_perm]
        sizes = [len(x) for x in group]
        assert sizes == ([b] * (n // b) + ([n % b] if n % b else []))[:len(group)]
        if len(group) == per_perm:   # a complete pass covers S exactly once
            assert sorted(torch.cat(group).tolist()) == list(range(n))
        else:                        # a partial pass has no repeats
            joined = torch.cat(group).tolist()
            assert len(set(joined)) == len(joined)
    # The passes are fresh permutations, not the same order again.
    if syn_steps >= 2 * per_perm:
        assert not torch.equal(torch.cat(plan.batches[:per_perm]), torch.cat(plan.batches[per_perm:2 * per_perm]))


def test_plan_is_deterministic_for_a_seed():
    a, b, c = (plan_student(20, 6, 7, generator(s)) for s in (5, 5, 6))
    assert all(torch.equal(x, y) for x, y in zip(a.batches, b.batches)) and a.aug_seeds == b.aug_seeds
    assert not all(torch.equal(x, y) for x, y in zip(a.batches, c.batches))
    assert len(set(a.aug_seeds)) == len(a.aug_seeds)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("mode", ("unrolled", "checkpointed", "constant_memory"))
def test_zero_length_window_raises(setup, mode):
    images = setup["images"].clone().requires_grad_(True)
    a = torch.tensor(ALPHA, dtype=torch.float64, requires_grad=True)
    theta = setup["theta_start"]
    with pytest.raises(ValueError, match="zero length"):
        match(Student(setup["model"]), images, setup["labels"], a, theta, theta.clone(), make_plan(2), mode)
    assert images.grad is None and a.grad is None


def test_unknown_gradient_mode_raises(setup):
    with pytest.raises(ValueError, match="gradient mode"):
        run_match(setup, make_plan(2), "truncated", dsa=False)


# ---------------------------------------------------------------- no host sync (issue 12)


READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")  # each waits for a GPU


@pytest.mark.parametrize("mode", ("unrolled", "checkpointed", "constant_memory"))
def test_a_match_reads_nothing_back_from_a_device(setup, mode, monkeypatch):
    # matching.HOST_DEVICES = () makes the CPU behave as a GPU does here: no eager window check.
    from mctlib import matching

    monkeypatch.setattr(matching, "HOST_DEVICES", ())
    dsa = DSA()
    plan = make_plan(4)
    groups = [dsa.choose_group(s) for s in plan.aug_seeds]  # the host's draws: CPU generators, made before
    images = setup["images"].clone().requires_grad_(True)
    a = torch.tensor(ALPHA, dtype=torch.float64, requires_grad=True)
    seen = []
    for name in READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *args, _n=name, _o=original, **kw: seen.append(_n) or _o(self, *args, **kw))
    result = match(Student(setup["model"], dsa), images, setup["labels"], a, setup["theta_start"],
                   setup["theta_target"], plan, mode)
    assert seen == [], f"{mode} read {seen} back from the device"
    loss, distance, alpha = result.read(a)  # the caller's one read-back
    assert seen == ["tolist"] and alpha == ALPHA and loss > 0 and distance > 0
    assert groups == [dsa.choose_group(s) for s in plan.aug_seeds]


def test_the_plan_moves_once_and_a_mismatched_plan_is_refused(setup):
    plan = make_plan(3)
    assert plan.to("cpu") is plan and plan.device == torch.device("cpu")
    student = Student(setup["model"])
    meta_plan = type(plan)(tuple(b.to("meta") for b in plan.batches), plan.aug_seeds)
    with pytest.raises(ValueError, match="plan is on meta but the images on cpu"):
        student.grad(setup["theta_start"].clone().requires_grad_(True), setup["images"], setup["labels"], meta_plan, 0)


@pytest.mark.parametrize("mode", ("unrolled", "constant_memory"))
def test_off_the_host_a_zero_window_raises_at_the_read(setup, mode, monkeypatch):
    from mctlib import matching

    monkeypatch.setattr(matching, "HOST_DEVICES", ())
    images = setup["images"].clone().requires_grad_(True)
    a = torch.tensor(ALPHA, dtype=torch.float64, requires_grad=True)
    theta = setup["theta_start"]
    result = match(Student(setup["model"]), images, setup["labels"], a, theta, theta.clone(), make_plan(2), mode)
    with pytest.raises(ValueError, match="zero length"):
        result.read()
    with pytest.raises(ValueError, match="zero length"):
        result.loss
