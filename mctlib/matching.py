"""The matching objective and its gradient modes (METHOD.md: "MTT objective", "Gradient modes").

The student starts at theta_start and takes N = syn_steps SGD steps on minibatches of the
synthetic set S with learnable lr alpha:  theta_{k+1} = theta_k - alpha * g_k,
g_k = grad_theta CE(f(DSA(S_{b_k}); theta_k), y_{b_k}).  The loss is
L = ||theta_N - theta_target||^2 / ||theta_start - theta_target||^2 = ||V_S - V_T||^2 / ||V_T||^2.

Gradient modes, all writing d L / d S into `images.grad` and d L / d alpha into `alpha.grad`:
- unrolled: autograd through all N steps (exact; activations of every step stay in memory).
- checkpointed: exact too, by reverse accumulation. The forward keeps only theta_0..theta_{N-1};
  the backward recomputes step k with the same batch and augmentation draw and propagates the
  adjoint lambda_k = lambda_{k+1} - alpha H_k lambda_{k+1} with a Hessian-vector product.
- constant_memory (TESLA / the MCT authors' code): lambda frozen at lambda_N, which drops how
  later steps depend on earlier batches; since lambda is fixed the steps can be replayed in
  forward order, so not even the theta_k are kept. Equals the others at syn_steps = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .networks import FlatModel

Augment = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class StudentPlan:
    """The minibatch (indices into S) and augmentation seed of each student step, drawn up front
    so that every gradient mode, and any recomputation, sees exactly the same steps."""

    batches: tuple[torch.Tensor, ...]
    aug_seeds: tuple[int, ...]

    @property
    def syn_steps(self) -> int:
        return len(self.batches)

    @property
    def device(self) -> torch.device:
        return self.batches[0].device

    def to(self, device: str | torch.device) -> "StudentPlan":
        """The plan with its minibatch indices on `device`, in one host-to-device copy. Indexing a GPU
        tensor with CPU indices copies them at each use (in the unroll and in its backward), and the
        copy waits for the GPU; an index tensor already there does not."""
        device = torch.device(device)
        if self.device == device:
            return self
        flat = torch.cat(self.batches)
        if device.type == "cuda":
            flat = flat.pin_memory()  # a pinned source lets the copy run without waiting for the GPU
        flat = flat.to(device, non_blocking=True)
        return StudentPlan(tuple(flat.split([len(b) for b in self.batches])), self.aug_seeds)


def plan_student(num_images: int, syn_steps: int, batch_syn: int | None, generator: torch.Generator,
                 device: str | torch.device | None = None) -> StudentPlan:
    """MTT's schedule: walk through random permutations of S in chunks of batch_syn, drawn from the
    (CPU) `generator`; the indices are then placed on `device` (the run's device; default the CPU)."""
    batch = num_images if batch_syn is None else min(batch_syn, num_images)
    batches, pending = [], []
    for _ in range(syn_steps):
        if not pending:
            pending = list(torch.randperm(num_images, generator=generator).split(batch))
        batches.append(pending.pop(0))
    seeds = torch.randint(2**62, (syn_steps,), generator=generator).tolist()
    plan = StudentPlan(tuple(batches), tuple(int(s) for s in seeds))
    return plan if device is None else plan.to(device)


def matching_loss(theta_end: torch.Tensor, theta_start: torch.Tensor, theta_target: torch.Tensor) -> torch.Tensor:
    """L = ||theta_N - theta_target||^2 / ||theta_start - theta_target||^2 (METHOD.md, MTT objective)."""
    return (theta_end - theta_target).pow(2).sum() / (theta_start - theta_target).pow(2).sum()


def update_vectors(theta_end: torch.Tensor, theta_start: torch.Tensor, theta_target: torch.Tensor):
    """(V_S, V_T) = (theta_N - theta_start, theta_target - theta_start): the chapter 1 reading."""
    return theta_end - theta_start, theta_target - theta_start


class Student:
    """The student network's SGD step as a pure function of (theta, S, alpha) and one plan step."""

    def __init__(self, model: FlatModel, augment: Augment | None = None) -> None:
        self.model, self.augment = model, augment

    def grad(self, theta: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, plan: StudentPlan, k: int,
             create_graph: bool = False) -> torch.Tensor:
        """g_k = grad_theta CE(f(DSA(S_{b_k}); theta), y_{b_k}); `theta` must require grad."""
        idx = plan.batches[k]
        if idx.device != images.device:
            raise ValueError(f"the student plan is on {idx.device} but the images on {images.device}; "
                             "make it with plan_student(..., device=images.device) or plan.to(device)")
        x = images[idx]
        if self.augment is not None:
            x = self.augment(x, plan.aug_seeds[k])
        loss = F.cross_entropy(self.model(theta, x), labels[idx])
        return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]

    def unroll(self, theta_start: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor,
               plan: StudentPlan, keep: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Run the N steps without a graph: (theta_N, [theta_0..theta_{N-1}] if keep, G = sum_k g_k)."""
        plan = plan.to(images.device)
        theta, kept = theta_start.detach(), []
        grad_sum = torch.zeros_like(theta)
        images, a = images.detach(), alpha.detach()
        for k in range(plan.syn_steps):
            if keep:
                kept.append(theta)
            g = self.grad(theta.requires_grad_(True), images, labels, plan, k)
            grad_sum += g
            theta = (theta.detach() - a * g).detach()
        return theta, kept, grad_sum


# Devices whose tensors the host reads without waiting for queued work: on them match() checks
# the window's length at once; elsewhere (CUDA) the check waits for the caller's one read-back.
HOST_DEVICES = ("cpu",)


class MatchResult:
    """What one matching evaluation returns, as device tensors: reading them waits for the device,
    so the caller reads them once per iteration (`read`, or the `loss`/`start_distance` properties,
    which read and check together on first use)."""

    def __init__(self, loss: torch.Tensor, theta_end: torch.Tensor, start_distance: torch.Tensor) -> None:
        self.loss_tensor = loss.detach()                 # L
        self.theta_end = theta_end                       # theta_N, detached
        self.distance_tensor = start_distance.detach()   # ||theta_start - theta_target||^2
        self._values: tuple[float, ...] | None = None

    def read(self, *extra: torch.Tensor) -> tuple[float, ...]:
        """(loss, start_distance, *extra) as floats, in one device-to-host copy; raises ValueError
        for a zero-length expert window (whose loss is 0/0)."""
        values = torch.stack([t.detach().reshape(()).to(torch.float64)
                              for t in (self.loss_tensor, self.distance_tensor, *extra)]).tolist()
        _check_window(values[1])
        self._values = tuple(values[:2])
        return tuple(values)

    @property
    def loss(self) -> float:
        if self._values is None:
            self.read()
        return self._values[0]

    @property
    def start_distance(self) -> float:
        if self._values is None:
            self.read()
        return self._values[1]


def _check_window(distance: float) -> None:
    if not distance > 0:
        raise ValueError("theta_start equals theta_target: the expert window has zero length (check expert_epochs)")


def match(student: Student, images: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor,
          theta_start: torch.Tensor, theta_target: torch.Tensor, plan: StudentPlan,
          mode: str = "unrolled") -> MatchResult:
    """One matching evaluation; accumulates dL/dS into images.grad and dL/dalpha into alpha.grad.

    Nothing in it waits for the device: the plan is moved to the images' device if it is not there
    yet (distill makes it there), DSA chooses its groups on the host, and the loss stays a tensor.
    On a host device (CPU) a zero-length window raises here, before any gradient is accumulated;
    on a GPU it raises when the result is read."""
    theta_start, theta_target = theta_start.detach(), theta_target.detach()
    plan = plan.to(images.device)
    denom = (theta_start - theta_target).pow(2).sum()
    if denom.device.type in HOST_DEVICES:
        _check_window(float(denom))
    if mode == "unrolled":
        theta = theta_start.clone().requires_grad_(True)
        for k in range(plan.syn_steps):
            theta = theta - alpha * student.grad(theta, images, labels, plan, k, create_graph=True)
        loss = matching_loss(theta, theta_start, theta_target)
        loss.backward()
        return MatchResult(loss, theta.detach(), denom)
    if mode not in ("checkpointed", "constant_memory"):
        raise ValueError(f"gradient mode {mode!r} unknown; choose unrolled, checkpointed or constant_memory")

    exact = mode == "checkpointed"
    theta_end, kept, grad_sum = student.unroll(theta_start, images, labels, alpha, plan, keep=exact)
    loss = matching_loss(theta_end, theta_start, theta_target)
    adjoint = 2 * (theta_end - theta_target) / denom          # lambda_N = dL/dtheta_N
    a = alpha.detach()
    image_grad = torch.zeros_like(images)
    leaf = images.detach().requires_grad_(True)
    if exact:
        alpha_grad = torch.zeros((), dtype=theta_start.dtype, device=theta_start.device)
        for k in reversed(range(plan.syn_steps)):
            theta = kept[k].requires_grad_(True)
            g = student.grad(theta, leaf, labels, plan, k, create_graph=True)
            # One backward gives both H_k lambda (for the adjoint) and (dg_k/dS)^T lambda (for S).
            hvp, dimg = torch.autograd.grad(g, (theta, leaf), grad_outputs=adjoint)
            image_grad -= a * dimg
            alpha_grad -= g.detach().dot(adjoint)
            adjoint = adjoint - a * hvp
    else:
        alpha_grad = -grad_sum.dot(adjoint)
        theta = theta_start
        for k in range(plan.syn_steps):
            theta = theta.detach().requires_grad_(True)
            g = student.grad(theta, leaf, labels, plan, k, create_graph=True)
            (dimg,) = torch.autograd.grad(g, leaf, grad_outputs=adjoint)
            image_grad -= a * dimg
            theta = theta.detach() - a * g.detach()
    _accumulate(images, image_grad)
    _accumulate(alpha, alpha_grad.reshape(alpha.shape))
    return MatchResult(loss, theta_end, denom)


def _accumulate(t: torch.Tensor, grad: torch.Tensor) -> None:
    if t.requires_grad:
        t.grad = grad.detach().clone() if t.grad is None else t.grad + grad.detach()
