"""NTK tools (METHOD.md, chapter 2): the empirical neural tangent kernel, the linearised network,
the closed-form gradient-flow trajectory of the linearised network, and how straight a parameter
path is.

Conventions used throughout this module:

- A network is a `FlatModel`: logits f(x; θ) of shape (N, C) for a flat θ ∈ R^D.
- Jacobians and kernels are *sample-major*: row n·C + c belongs to output c of input n, so
  ``jacobian`` is (N·C, D) and ``empirical_ntk`` is (N1·C, N2·C), and a function-space vector
  f(X) ∈ R^{N×C} flattens to R^{N·C} with ``reshape(-1)``.
- Squared loss with the *mean* convention, L(θ) = 1/(2N) Σ_n ‖f(x_n; θ) − y_n‖² (y one-hot), so a
  gradient step with learning rate η is θ ← θ − (η/N) J(X)ᵀ (f(X) − Y). Gradient flow with time t
  measured in steps is then dθ/dt = −(η/N) J0ᵀ (f − Y), and the closed form of METHOD.md holds with
  the rate η/N in place of η: f(t) − Y = e^{−(η/N) Θ0 t} (f0 − Y). ``reduction="sum"``
  (L = ½ Σ_n ‖f − y‖², rate η) is available and is then METHOD.md's formula verbatim.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import grad_and_value, jacrev, jvp, linearize, vjp, vmap

from .networks import FlatModel
from .training import SGDRecipe, train_networks

REDUCTIONS = ("mean", "sum")
LOSSES = ("mse", "ce")


@contextlib.contextmanager
def _quiet():
    """Silence torch-internal warnings that forward-mode AD and `linearize` tracing emit (not ours)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node", category=UserWarning)
        yield


# ---------------------------------------------------------------------------------------------
# Jacobian and empirical NTK

def jacobian(model: FlatModel, theta: torch.Tensor, x: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """J(x) = ∂f(x; θ)/∂θ as an (N·C, D) matrix, row n·C + c = ∇_θ f_c(x_n; θ).

    Per-sample `vmap(jacrev)` (each input through the network alone, so the network must treat
    samples independently: instance norm yes, batch norm in train mode no), `chunk_size` inputs
    at a time to bound memory.
    """
    def single(th: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return model(th, xi.unsqueeze(0)).squeeze(0)

    per_sample = vmap(jacrev(single), in_dims=(None, 0))
    rows = [per_sample(theta, x[i:i + chunk_size]).reshape(-1, theta.numel())
            for i in range(0, x.shape[0], chunk_size)]
    return torch.cat(rows)


def empirical_ntk(model: FlatModel, theta: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor | None = None,
                  chunk_size: int = 64) -> torch.Tensor:
    """Θ(x1, x2) = J(x1) J(x2)ᵀ, the empirical NTK at θ, as an (N1·C, N2·C) sample-major matrix.

    Holds J(x1) and J(x2) (each N·C × D) in memory; with ``x2=None`` it is Θ(x1, x1), symmetric PSD.
    """
    j1 = jacobian(model, theta, x1, chunk_size)
    j2 = j1 if x2 is None else jacobian(model, theta, x2, chunk_size)
    return j1 @ j2.T


def sample_kernel(ntk: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The (N1, N2) input-by-input kernel: the trace over classes of each C × C block of Θ, ÷ C."""
    n1, n2 = ntk.shape[0] // num_classes, ntk.shape[1] // num_classes
    blocks = ntk.reshape(n1, num_classes, n2, num_classes)
    return torch.diagonal(blocks, dim1=1, dim2=3).mean(-1)


# ---------------------------------------------------------------------------------------------
# The linearised network

class Linearised:
    """f_lin(x; θ) = f(x; θ0) + J0(x)(θ − θ0) (METHOD.md ch. 2), evaluated with one
    `torch.func.jvp` of the real network at θ0 along θ − θ0 (no Jacobian is formed).
    Exactly linear (affine) in θ; differentiable w.r.t. θ."""

    def __init__(self, model: FlatModel, theta0: torch.Tensor):
        self.model = model
        self.theta0 = theta0.detach().clone()

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with _quiet():
            f0, df = jvp(lambda p: self.model(p, x), (self.theta0,), (theta - self.theta0,))
        return f0 + df

    def on(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """θ -> f_lin(x; θ) for one fixed input batch, faster when called many times: f(x; θ0) and
        the jvp are traced once (`torch.func.linearize`) and replayed."""
        with _quiet():
            f0, push = linearize(lambda p: self.model(p, x), self.theta0)
        return lambda theta: f0 + push(theta - self.theta0)

    def gradient(self, x: torch.Tensor, dloss_df: torch.Tensor) -> torch.Tensor:
        """J0(x)ᵀ ∂L/∂f: the θ-gradient of any loss of f_lin(x; ·) (one vjp at θ0; J0 is constant)."""
        _, pullback = vjp(lambda p: self.model(p, x), self.theta0)
        return pullback(dloss_df)[0]


def linearise(model: FlatModel, theta0: torch.Tensor) -> Linearised:
    """The first-order Taylor model of `model` around θ0: a callable (θ, x) -> logits."""
    return Linearised(model, theta0)


# ---------------------------------------------------------------------------------------------
# Training the real network and its linearisation side by side

def _loss_and_dloss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, ∂loss/∂logits) for squared loss on one-hot targets (½‖f − y‖², mean over samples)
    or cross-entropy."""
    if loss == "mse":
        residual = logits - F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return 0.5 * residual.pow(2).sum(-1).mean(), residual / logits.shape[0]
    probs = logits.softmax(-1)
    dloss = (probs - F.one_hot(labels, logits.shape[-1]).to(logits.dtype)) / logits.shape[0]
    return F.cross_entropy(logits, labels), dloss


@dataclass
class PairedRun:
    """Gradient descent on the real network and on its linearisation from the same θ0.

    Row t of every tensor is recorded step ``steps[t]`` (0 = θ0). Logits are on the training set.
    """

    steps: torch.Tensor              # (T,)
    real_params: torch.Tensor        # (T, D)
    lin_params: torch.Tensor         # (T, D)
    real_logits: torch.Tensor        # (T, N, C)
    lin_logits: torch.Tensor         # (T, N, C)
    real_loss: torch.Tensor          # (T,) training loss (the loss trained on)
    lin_loss: torch.Tensor           # (T,)
    real_acc: torch.Tensor           # (T,) training accuracy
    lin_acc: torch.Tensor            # (T,)
    real_test_acc: torch.Tensor | None  # (T,) when an evaluation set was given
    lin_test_acc: torch.Tensor | None
    lr: float
    loss: str
    batch_size: int | None

    def agreement(self) -> torch.Tensor:
        """(T,) fraction of training inputs on which the two networks predict the same class."""
        return (self.real_logits.argmax(-1) == self.lin_logits.argmax(-1)).float().mean(-1)

    def output_gap(self) -> torch.Tensor:
        """(T,) ‖f_real(X) − f_lin(X)‖ ÷ ‖f_real(X; θ_T) − f(X; θ0)‖ (how far the outputs differ,
        relative to how far the real outputs moved)."""
        moved = (self.real_logits[-1] - self.real_logits[0]).norm()
        return (self.real_logits - self.lin_logits).flatten(1).norm(dim=1) / moved

    def param_gap(self) -> torch.Tensor:
        """(T,) ‖θ_real(t) − θ_lin(t)‖ ÷ ‖θ_real(T) − θ0‖ (parameter-path distance, relative to how
        far the real network travelled)."""
        moved = (self.real_params[-1] - self.real_params[0]).norm()
        return (self.real_params - self.lin_params).norm(dim=1) / moved


def train_linearised_and_real(model: FlatModel, theta0: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                              steps: int, lr: float, loss: str = "mse", batch_size: int | None = None,
                              record_every: int = 1, seed: int = 0, eval_images: torch.Tensor | None = None,
                              eval_labels: torch.Tensor | None = None) -> PairedRun:
    """Plain gradient descent, θ ← θ − lr ∇L, on the real network and on its linearisation around θ0.

    Full batch by default; with `batch_size` both see the same minibatch sequence (seeded by
    `seed`). ``loss="mse"`` is the squared loss of the closed form (module docstring), ``"ce"``
    cross-entropy. Records both parameter vectors, the training logits, loss and accuracy (and
    accuracy on the evaluation set, if given) at steps 0, record_every, 2·record_every, …, steps.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} must be one of {LOSSES}")
    if steps < 0 or record_every < 1:
        raise ValueError(f"steps={steps} must be >= 0 and record_every={record_every} >= 1")
    n = images.shape[0]
    lin = linearise(model, theta0)
    gen = torch.Generator().manual_seed(int(seed))
    full = batch_size is None or batch_size >= n
    # J0 is constant, so the training set's linearised outputs (a traced jvp) and, full batch, its
    # pullback J0ᵀ(·) are built once at θ0 and replayed every step.
    lin_train = lin.on(images)
    lin_eval = lin.on(eval_images) if eval_images is not None else None
    if full:
        _, pullback_train = vjp(lambda p: model(p, images), lin.theta0)

    def real_loss(th, x, y):
        return _loss_and_dloss(model(th, x), y, loss)[0]

    real_step = grad_and_value(real_loss)
    record = {k: [] for k in ("step", "real", "lin", "real_logits", "lin_logits", "real_test", "lin_test")}

    @torch.no_grad()
    def snapshot(step, th_real, th_lin):
        record["step"].append(step)
        record["real"].append(th_real.clone())
        record["lin"].append(th_lin.clone())
        record["real_logits"].append(model(th_real, images))
        record["lin_logits"].append(lin_train(th_lin))
        if eval_images is not None:
            record["real_test"].append((model(th_real, eval_images).argmax(-1) == eval_labels).float().mean())
            record["lin_test"].append((lin_eval(th_lin).argmax(-1) == eval_labels).float().mean())

    th_real, th_lin = theta0.detach().clone(), theta0.detach().clone()
    snapshot(0, th_real, th_lin)
    order, cursor = None, n
    for step in range(1, steps + 1):
        if full:
            x, y = images, labels
        else:
            if cursor + batch_size > n:  # a fresh permutation per epoch; drop the ragged tail
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + batch_size]
            cursor += batch_size
            x, y = images[idx], labels[idx]
        g_real, _ = real_step(th_real, x, y)
        with torch.no_grad():
            if full:
                g_lin = pullback_train(_loss_and_dloss(lin_train(th_lin), y, loss)[1])[0]
            else:
                g_lin = lin.gradient(x, _loss_and_dloss(lin(th_lin, x), y, loss)[1])
            th_real = th_real - lr * g_real
            th_lin = th_lin - lr * g_lin
        if not (torch.isfinite(th_real).all() and torch.isfinite(th_lin).all()):
            raise FloatingPointError(f"gradient descent diverged at step {step}; lower lr (it is {lr:.3g})")
        if step % record_every == 0 or step == steps:
            snapshot(step, th_real, th_lin)

    real_logits, lin_logits = torch.stack(record["real_logits"]), torch.stack(record["lin_logits"])

    def losses(logits):
        return torch.stack([_loss_and_dloss(f, labels, loss)[0] for f in logits])

    def accs(logits):
        return (logits.argmax(-1) == labels).float().mean(-1)

    has_eval = eval_images is not None
    return PairedRun(
        steps=torch.tensor(record["step"]), real_params=torch.stack(record["real"]),
        lin_params=torch.stack(record["lin"]), real_logits=real_logits, lin_logits=lin_logits,
        real_loss=losses(real_logits), lin_loss=losses(lin_logits), real_acc=accs(real_logits),
        lin_acc=accs(lin_logits), real_test_acc=torch.stack(record["real_test"]) if has_eval else None,
        lin_test_acc=torch.stack(record["lin_test"]) if has_eval else None, lr=float(lr), loss=loss,
        batch_size=None if full else batch_size)


# ---------------------------------------------------------------------------------------------
# The closed-form gradient-flow trajectory of the linearised network

@dataclass
class Spectrum:
    """Θ0 = V diag(λ) Vᵀ in float64: eigenvalues ascending (clamped at 0, Θ0 is PSD), eigenvectors as
    columns. Pass it instead of Θ0 to the functions below to decompose a large kernel only once."""

    eigvals: torch.Tensor   # (N·C,)
    eigvecs: torch.Tensor   # (N·C, N·C)


def spectrum(ntk: torch.Tensor) -> Spectrum:
    """The eigendecomposition of a symmetric PSD kernel, in float64."""
    lam, vecs = torch.linalg.eigh(ntk.double())
    return Spectrum(lam.clamp_min(0), vecs)


def _spectrum(ntk: torch.Tensor | Spectrum) -> Spectrum:
    return ntk if isinstance(ntk, Spectrum) else spectrum(ntk)


@dataclass
class _Flow:
    eigvals: torch.Tensor   # (K,) float64, ascending, clamped at 0
    eigvecs: torch.Tensor   # (N·C, K) float64
    r0: torch.Tensor        # (K,) eigen-coordinates of the initial residual f0 − Y
    rate: float             # η/N (mean) or η (sum)


def _flow(ntk: torch.Tensor | Spectrum, f0: torch.Tensor, y: torch.Tensor, eta: float, reduction: str) -> _Flow:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")
    if y.dim() == 1:
        y = F.one_hot(y, f0.shape[-1])
    size = ntk.eigvecs.shape if isinstance(ntk, Spectrum) else ntk.shape
    if tuple(size) != (f0.numel(), f0.numel()):
        raise ValueError(f"ntk must be ({f0.numel()}, {f0.numel()}) for f0 of shape {tuple(f0.shape)}, "
                         f"got {tuple(size)}")
    spec = _spectrum(ntk)
    r0 = spec.eigvecs.T @ (f0.double() - y.double()).reshape(-1)
    return _Flow(spec.eigvals, spec.eigvecs, r0, eta / f0.shape[0] if reduction == "mean" else eta)


def _times(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64).reshape(-1)


def closed_form_trajectory(ntk: torch.Tensor | Spectrum, f0: torch.Tensor, y: torch.Tensor, eta: float, t,
                           reduction: str = "mean") -> torch.Tensor:
    """f(t) = Y + e^{−rate·Θ0 t}(f0 − Y), the linearised network's training outputs under gradient
    flow with squared loss (rate = η/N for the mean convention, η for the sum; t in steps).

    `ntk` is Θ0 on the training inputs (N·C, N·C), or its `Spectrum`; `f0` the outputs f(X; θ0) (N, C), `y` one-hot
    targets (N, C) or labels (N,), `t` a scalar or a sequence of times. Returns (T, N, C) in f0's
    dtype, computed in float64 through an eigendecomposition of Θ0.
    """
    flow = _flow(ntk, f0, y, eta, reduction)
    decay = torch.exp(-flow.rate * _times(t)[:, None] * flow.eigvals[None])       # (T, K)
    residual = (decay * flow.r0) @ flow.eigvecs.T                                   # (T, N·C)
    target = y if y.dim() == 2 else F.one_hot(y, f0.shape[-1])
    return (target.double().reshape(1, -1) + residual).reshape(-1, *f0.shape).to(f0.dtype)


def closed_form_params(model: FlatModel, theta0: torch.Tensor, x: torch.Tensor, ntk: torch.Tensor | Spectrum,
                       f0: torch.Tensor, y: torch.Tensor, eta: float, t, reduction: str = "mean") -> torch.Tensor:
    """θ(t) = θ0 − J0ᵀ Θ0⁻¹ (I − e^{−rate·Θ0 t})(f0 − Y) (METHOD.md ch. 2), shape (T, D).

    Θ0⁻¹(I − e^{−rate·λ t}) is taken per eigenvalue as −expm1(−rate·λ t)/λ, whose limit rate·t at
    λ → 0 keeps it finite for a singular Θ0; J0ᵀ is applied with one vjp at θ0 (no Jacobian).
    """
    flow = _flow(ntk, f0, y, eta, reduction)
    lam, times = flow.eigvals[None], _times(t)[:, None]
    small = lam <= 1e-12 * flow.eigvals.max().clamp_min(1e-300)
    gain = torch.where(small, flow.rate * times, -torch.expm1(-flow.rate * times * lam) / torch.where(small, 1, lam))
    coeffs = ((gain * flow.r0) @ flow.eigvecs.T).reshape(-1, *f0.shape)             # (T, N, C)
    _, pullback = vjp(lambda p: model(p, x), theta0)
    return torch.stack([theta0 - pullback(c.to(theta0.dtype))[0] for c in coeffs]).detach()


# ---------------------------------------------------------------------------------------------
# Progress per eigen-direction, and straightness of a path

@dataclass
class EigenProgress:
    """Per eigen-direction v_i of Θ0: eigenvalue λ_i and progress p_i(t) = 1 − ⟨v_i, f(t) − Y⟩ ÷
    ⟨v_i, f0 − Y⟩ (0 at the start, 1 at the fit; 1 − e^{−rate·λ_i t} under the linear flow)."""

    ranks: torch.Tensor      # (K,) 0 = largest eigenvalue
    eigvals: torch.Tensor    # (K,)
    progress: torch.Tensor   # (T, K)
    start: torch.Tensor | None = None  # (K,) ⟨v_i, f0 − Y⟩, the denominator of p_i

    def backtrack(self) -> torch.Tensor:
        """(K,) how much of each curve's movement is undone: B / F, where F sums the steps that go the
        way the curve ends up going (sign of p_i(T) − p_i(0)) and B the steps against it.

        0 for any monotone curve, whichever way it runs (a direction drifting steadily away from the
        fit is not turning back); 1 for a curve that returns to where it started. Unchanged by
        rescaling a curve, so a small denominator ⟨v_i, f0 − Y⟩ in p_i does not inflate it.
        Resolution is that of the recorded times: moves between them are not seen."""
        steps = self.progress.diff(dim=0)
        total = steps.abs().sum(0)
        net = (self.progress[-1] - self.progress[0]).abs()
        return torch.where(total > 0, (total - net) / (total + net).clamp_min(1e-300), torch.zeros_like(total))


def eigen_components(ntk: torch.Tensor | Spectrum, f0: torch.Tensor, y: torch.Tensor, f_path: torch.Tensor,
                     ranks: Sequence[int] | None = None, k: int = 8) -> EigenProgress:
    """Progress of a function-space path f_path (T, N, C) along the eigen-directions of Θ0.

    `ranks` picks directions by eigenvalue rank (0 = largest); default the top `k`. For the
    linearised network the same curves describe parameter space: θ(t) − θ0 = −Σ_i u_i p_i(t)
    ⟨v_i, f0 − Y⟩/√λ_i with u_i = J0ᵀv_i/√λ_i orthonormal, so a monotone p_i is a parameter-space
    component moving monotonically from θ0's value to θ∞'s.
    """
    if y.dim() == 1:
        y = F.one_hot(y, f0.shape[-1])
    spec = _spectrum(ntk)
    lam, vecs = spec.eigvals, spec.eigvecs
    order = torch.argsort(lam, descending=True)
    ranks = torch.arange(k) if ranks is None else torch.as_tensor(list(ranks))
    idx = order[ranks]
    v = vecs[:, idx]                                                                # (N·C, K)
    start = (f0.double() - y.double()).reshape(-1) @ v                              # (K,)
    now = (f_path.double().reshape(f_path.shape[0], -1) - y.double().reshape(1, -1)) @ v
    return EigenProgress(ranks=ranks, eigvals=lam[idx], progress=1 - now / start, start=start)


@dataclass
class ClassStructure:
    """How close Θ0 is to K ⊗ I_C: one input-by-input kernel K, the same for every class, and no
    coupling between different classes' outputs (the structure of a last linear layer's NTK); and to
    the nearest K' ⊗ B, which lets the class outputs couple through one C x C matrix B."""

    kernel: torch.Tensor          # (N, N) K, the Frobenius-nearest K with Θ0 ≈ K ⊗ I_C
    residual: float               # ‖Θ0 − K ⊗ I_C‖_F / ‖Θ0‖_F
    kernel_eigvals: torch.Tensor  # (N,) eigenvalues of K, descending; each is C-fold in K ⊗ I_C
    coupling: torch.Tensor        # (C, C) B of the nearest Kronecker product Θ0 ≈ K' ⊗ B (any B), trace C
    kron_residual: float          # ‖Θ0 − K' ⊗ B‖_F / ‖Θ0‖_F for that nearest product
    kron_kernel: torch.Tensor | None = None  # (N, N) K' of that nearest product (so Θ0 ≈ K' ⊗ B)

    def kron_eigvals(self) -> torch.Tensor:
        """The eigenvalues K' ⊗ B would give Θ0, all products λ_i(K') μ_j(B), descending: what the nearest
        Kronecker product predicts for the whole spectrum (the knee after rank C included)."""
        if self.kron_kernel is None:
            raise ValueError("this ClassStructure has no K' (build it with class_structure)")
        lam = torch.linalg.eigvalsh(self.kron_kernel)
        mu = torch.linalg.eigvalsh(self.coupling)
        return torch.sort((lam[:, None] * mu[None, :]).reshape(-1), descending=True).values


def class_structure(ntk: torch.Tensor, num_classes: int) -> ClassStructure:
    """Fit Θ0 ≈ K ⊗ I_C (sample-major layout) and measure what it leaves out.

    The nearest K in Frobenius norm is the mean of the diagonals of the C × C blocks
    (`sample_kernel`): each block's best multiple of I_C. If the residual is small, the eigenvalues
    of Θ0 come in near-degenerate groups of C, each λ_j(K) repeated once per class, and an
    eigenvector inside such a group is fixed only up to a rotation of the group. With a general B,
    the eigenvalues of K' ⊗ B are the products λ_i(K') μ_j(B): a dominant λ_1(K') gives a group of C
    led by it, spread by B's spectrum.
    """
    n = ntk.shape[0] // num_classes
    if ntk.shape != (n * num_classes, n * num_classes):
        raise ValueError(f"ntk of shape {tuple(ntk.shape)} is not (N·C, N·C) for C = {num_classes}")
    theta = ntk.double()
    kernel = sample_kernel(theta, num_classes)
    fitted = torch.kron(kernel, torch.eye(num_classes, dtype=theta.dtype))
    residual = float((theta - fitted).norm() / theta.norm().clamp_min(1e-300))
    eig = torch.linalg.eigvalsh(kernel).flip(0)
    # Nearest Kronecker product with any class coupling B (Van Loan and Pitsianis): rearrange Θ0 so
    # that each C x C block is one row; the best K' ⊗ B is its leading singular pair.
    rows = theta.reshape(n, num_classes, n, num_classes).permute(0, 2, 1, 3).reshape(n * n, num_classes ** 2)
    u, sv, vh = torch.linalg.svd(rows, full_matrices=False)
    coupling = vh[0].reshape(num_classes, num_classes)
    scale = num_classes / coupling.trace()  # fix the free scale (and sign): trace B = C
    coupling = coupling * scale
    kron_kernel = (sv[0] * u[:, 0] / scale).reshape(n, n)  # K' ⊗ B = σ_1 u_1 v_1ᵀ, rearranged back
    kron_residual = float((1 - sv[0] ** 2 / sv.pow(2).sum()).clamp_min(0).sqrt())
    return ClassStructure(kernel=kernel, residual=residual, kernel_eigvals=eig, coupling=coupling,
                          kron_residual=kron_residual, kron_kernel=kron_kernel)


def full_batch_path(model: FlatModel, theta0: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                    lr: float, steps: int, augment=None, seed: int = 0) -> torch.Tensor:
    """Every iterate of full-batch gradient descent with the experts' loss: (steps + 1, D), θ0 first.

    Each step is one `training.train_networks` epoch whose single minibatch is the whole training set
    (cross-entropy, plain SGD, the same `augment` as the experts, drawn afresh each step), so it is an
    expert of the experts' own kind with the minibatch noise taken out (chapter 2: is the bend of the
    experts' path SGD noise or the order in which the network learns?). With lr = k · expert lr, one
    step stands for an epoch of k minibatch steps to first order.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps = {steps} must be >= 1 and lr = {lr} > 0")
    path: list[torch.Tensor] = []
    recipe = SGDRecipe(lr=float(lr), epochs=int(steps), batch_size=images.shape[0])
    train_networks(model, theta0.detach().reshape(1, -1), images, labels, recipe, [int(seed)], augment,
                   on_epoch=lambda e, p: path.append(p[0].detach().clone()))
    return torch.stack(path)


def chord_coordinates(path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each θ_t of a path (T, D) lies relative to its chord, the straight line θ_0 → θ_end:
    (s_t, d_t), the position along the chord ⟨θ_t − θ_0, θ_end − θ_0⟩ / ‖θ_end − θ_0‖² (0 at θ_0,
    1 at θ_end) and the orthogonal distance from the line ÷ ‖θ_end − θ_0‖; both (T,), float64."""
    p = path.double()
    rel = p - p[0]
    chord = rel[-1]
    length = chord.norm()
    if length == 0:
        raise ValueError("the path ends where it starts, so it has no chord")
    along = rel @ chord / length**2
    return along, (rel - along[:, None] * chord).norm(dim=1) / length


def distance_from_chord(path: torch.Tensor) -> torch.Tensor:
    """(T,) distance of each θ_t of a path (T, D) from the straight line through θ_0 and θ_end,
    ÷ ‖θ_end − θ_0‖ (float64). 0 for every point of a straight path."""
    return chord_coordinates(path)[1]


def points_on_chord(theta_start: torch.Tensor, theta_end: torch.Tensor, s) -> torch.Tensor:
    """(S, D) the points θ_start + s (θ_end − θ_start) for each s (a stack, ready for `accuracy`)."""
    s = torch.as_tensor(s, dtype=theta_start.dtype, device=theta_start.device).reshape(-1, 1)
    return theta_start + s * (theta_end - theta_start)
