"""The one training loop: plain/momentum SGD on flat parameter vectors, for experts and evaluation.

Several networks train at once as an ensemble: their parameters are stacked into an (M, D)
tensor and one backward pass serves all of them. On a GPU the forward pass is `torch.func.vmap`
of the flat model, so convolutions run as one grouped call instead of M small ones; on a CPU the
M forwards run one after another inside the same graph (see `VMAP_DEVICES`). Each network keeps
its own data order and augmentation draws (its own generator), so the ensemble computes what M
separate runs would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import vmap

from .networks import FlatModel

Augment = Callable[[torch.Tensor, int], torch.Tensor]
EpochHook = Callable[[int, torch.Tensor], None]


def derive_seed(seed: int, *keys: int) -> int:
    """A reproducible, well-mixed child seed for (seed, *keys) (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class SGDRecipe:
    """SGD as torch.optim.SGD computes it (dampening 0, no Nesterov), lr x `decay` from `decay_epoch`."""

    lr: float
    epochs: int
    batch_size: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0
    decay_epoch: int | None = None
    decay: float = 0.1


# Device types on which the ensemble forward is vmap-ed by default. Not on CPU: there vmap turns each
# convolution into a grouped one and the norm's affine into broadcast ops, measured 0.6-0.8x the
# speed of M separate calls (`make bench`, book/performance.md); a loop matches them.
VMAP_DEVICES = ("cuda",)


def _forward(model: FlatModel, params: torch.Tensor, images: torch.Tensor, use_vmap: bool | None = None) -> torch.Tensor:
    """Logits of M networks on their own (M, B, ...) batches; `use_vmap` None: by device (`VMAP_DEVICES`)."""
    if use_vmap is None:
        use_vmap = params.device.type in VMAP_DEVICES
    if params.shape[0] > 1 and model.supports_vmap and use_vmap:
        return vmap(model, in_dims=(0, 0))(params, images)
    return torch.stack([model(p, x) for p, x in zip(params, images)])


def train_networks(model: FlatModel, params: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                   recipe: SGDRecipe, seeds: list[int], augment: Augment | None = None,
                   on_epoch: EpochHook | None = None, progress: Callable | None = None,
                   use_vmap: bool | None = None) -> torch.Tensor:
    """Train M networks (rows of `params`, shape (M, D)) on (images, labels); returns the final (M, D).

    `seeds[m]` fixes network m's shuffling and augmentation. `on_epoch(e, params)` is called with
    e = 0 (the initialisation) and after each epoch e = 1..E; the tensor it gets is read-only.
    `use_vmap`: the ensemble's forward as one vmap call (True) or a loop (False); None chooses by
    device (`VMAP_DEVICES`). Both compute the same networks (up to rounding).
    """
    if params.dim() != 2 or params.shape[0] != len(seeds):
        raise ValueError(f"params must be (M, D) with one seed per row; got {tuple(params.shape)} and {len(seeds)} seeds")
    num_nets, n = params.shape[0], images.shape[0]
    device = params.device
    params = params.detach().clone()
    velocity = torch.zeros_like(params) if recipe.momentum else None
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    lr = recipe.lr
    if on_epoch is not None:
        on_epoch(0, params)
    for epoch in range(1, recipe.epochs + 1):
        if recipe.decay_epoch is not None and epoch == recipe.decay_epoch + 1:
            lr = lr * recipe.decay
        orders = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
        for start in range(0, n, recipe.batch_size):
            idx = orders[:, start:start + recipe.batch_size]
            x, y = images[idx], labels[idx]                       # (M, B, ...), (M, B)
            if augment is not None:
                x = torch.stack([augment(x[m], int(torch.randint(2**62, (1,), generator=gens[m])))
                                 for m in range(num_nets)])
            params.requires_grad_(True)
            logits = _forward(model, params, x, use_vmap)
            # Summing the per-network mean losses gives each row its own network's gradient.
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]
            (grad,) = torch.autograd.grad(loss, params)
            params = params.detach()
            with torch.no_grad():
                if recipe.weight_decay:
                    grad = grad.add(params, alpha=recipe.weight_decay)
                if velocity is not None:
                    velocity.mul_(recipe.momentum).add_(grad)
                    grad = velocity
                params.sub_(grad, alpha=float(lr) if not torch.is_tensor(lr) else lr.item())
        if not torch.isfinite(params).all():
            raise FloatingPointError(
                f"training diverged at epoch {epoch} (non-finite parameters); lower the learning rate "
                f"(it is {float(lr):.3g}) or check the inputs for NaN")
        if on_epoch is not None:
            on_epoch(epoch, params)
        if progress is not None:
            progress(epoch)
    return params


@torch.no_grad()
def accuracy(model: FlatModel, params: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1024, use_vmap: bool | None = None) -> torch.Tensor:
    """Top-1 accuracy of each of the M networks in `params` (M, D) on a labelled set; shape (M,).
    `use_vmap` as in `train_networks`."""
    correct = torch.zeros(params.shape[0], device=params.device)
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        y = labels[start:start + batch_size]
        xs = x.unsqueeze(0).expand(params.shape[0], *x.shape)
        logits = _forward(model, params, xs, use_vmap)
        correct += (logits.argmax(-1) == y).float().sum(-1)
    return correct / images.shape[0]
