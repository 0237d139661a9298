"""The evaluation protocol (METHOD.md): fresh networks trained on a synthetic set alone.

SGD momentum 0.9, weight decay 5e-4, the learned lr alpha, lr x 0.1 after half the epochs,
batch 256, DSA; test accuracy mean +- std over `num_eval` networks, all trained at once as one
vmapped ensemble. The random-real and full-data baselines go through the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .augment import make_augment
from .config import EvalConfig
from .data import Dataset, real_images_per_class
from .device import precision_context, resolve_device
from .networks import FlatModel, NetConfig, build_network
from .training import SGDRecipe, _forward, accuracy, derive_seed, train_networks


class EvaluationDivergedError(FloatingPointError):
    """Evaluation networks whose loss or weights became non-finite: their accuracy would mean nothing.
    `suggested` is a learning rate ten times lower."""

    def __init__(self, message: str, lr: float) -> None:
        super().__init__(message)
        self.lr, self.suggested = lr, float(f"{lr / 10:.3g}")


@dataclass
class EvalResult:
    arch: str
    accuracies: list[float]

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.accuracies).mean())

    @property
    def std(self) -> float:
        return float(torch.tensor(self.accuracies).std(unbiased=False)) if len(self.accuracies) > 1 else 0.0

    def to_dict(self) -> dict:
        return {"arch": self.arch, "mean": self.mean, "std": self.std, "accuracies": self.accuracies}

    def __str__(self) -> str:
        return f"{self.arch}: {100 * self.mean:.2f} +- {100 * self.std:.2f} % (n={len(self.accuracies)})"


def eval_net_config(net: NetConfig, arch: str) -> NetConfig:
    """The same data shape on another architecture (cross-architecture evaluation)."""
    if arch == net.arch:
        return net
    return NetConfig(arch=arch, channels=net.channels, num_classes=net.num_classes, image_size=net.image_size,
                     width=net.width, norm=net.norm)


def train_and_test(images: torch.Tensor, labels: torch.Tensor, lr: float, dataset: Dataset, net: NetConfig,
                   cfg: EvalConfig, device=None, progress=None, share=None,
                   precision: str = "fp32") -> list[EvalResult]:
    """Train cfg.num_eval fresh networks per architecture on (images, labels); test on dataset's test split.
    Training and testing run at `precision` (see device.precision_context).

    `share` (a `distributed.Group`): this rank trains its share of the networks and the accuracies of
    all ranks are gathered; network i of architecture a is seeded by (a, i) wherever it trains."""
    check_training_set(images, labels, lr, net)
    device = resolve_device(device)
    with precision_context(precision, device):
        return _train_and_test(images, labels, lr, dataset, net, cfg, device, progress, share)


def _train_and_test(images: torch.Tensor, labels: torch.Tensor, lr: float, dataset: Dataset, net: NetConfig,
                    cfg: EvalConfig, device, progress, share) -> list[EvalResult]:
    images, labels = images.detach().to(device), labels.to(device)
    test_x, test_y = dataset.test_images.to(device), dataset.test_labels.to(device)
    augment = make_augment(cfg.dsa)
    recipe = SGDRecipe(lr=float(lr), epochs=cfg.epochs, batch_size=cfg.batch_size, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, decay_epoch=cfg.epochs // 2)
    results = []
    members = share.members(len(cfg.archs), cfg.num_eval) if share is not None else None
    for a, arch in enumerate(cfg.archs):
        net_a = eval_net_config(net, arch)
        nets = range(cfg.num_eval) if members is None else members[a]
        if not nets:
            results.append(EvalResult(arch, []))
            continue
        init_seeds = [derive_seed(cfg.seed, a, i, 0) for i in nets]
        model = FlatModel(build_network(net_a)).to(device)
        params = torch.stack([FlatModel(build_network(net_a, seed=s)).flatten() for s in init_seeds]).to(device)
        try:
            if not model.supports_vmap:  # batchnorm nets train one at a time
                finals = [train_networks(model, p[None], images, labels, recipe, [derive_seed(cfg.seed, a, i, 1)],
                                         augment, progress=progress) for i, p in zip(nets, params)]
                params = torch.cat(finals)
            else:
                params = train_networks(model, params, images, labels, recipe,
                                        [derive_seed(cfg.seed, a, i, 1) for i in nets], augment,
                                        progress=progress)
        except FloatingPointError as err:
            raise _diverged(arch, lr, str(err).split(";")[0]) from err
        check_outputs(model, params, test_x[:256], arch, lr)
        results.append(EvalResult(arch, accuracy(model, params, test_x, test_y).tolist()))
    return results if share is None else share.gather(results, cfg.num_eval)


def _diverged(arch: str, lr: float, what: str) -> EvaluationDivergedError:
    return EvaluationDivergedError(f"evaluation diverged: the {arch} networks trained at lr {lr:g} went non-finite "
                                   f"({what}), so their accuracy would mean nothing; lower the learning rate, e.g. "
                                   f"{float(f'{lr / 10:.3g}'):g}", lr)


@torch.no_grad()
def check_outputs(model: FlatModel, params: torch.Tensor, images: torch.Tensor, arch: str, lr: float) -> None:
    """Refuse trained networks whose outputs are not finite (weights so large that the logits overflow:
    every argmax would then be class 0, a chance-level accuracy that looks like a result)."""
    logits = _forward(model, params, images.unsqueeze(0).expand(params.shape[0], *images.shape))
    if not torch.isfinite(logits).all():
        raise _diverged(arch, lr, "logits on the test images overflow")


def check_training_set(images: torch.Tensor, labels: torch.Tensor, lr: float, net: NetConfig) -> None:
    """Refuse, before training, a set the network cannot learn from: one ValueError line naming what is wrong."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate {lr} must be a finite number > 0 (a negative one ascends the loss)")
    want = (net.channels, net.image_size, net.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"the images have shape {tuple(images.shape)}; the network takes (N, {want[0]}, {want[1]}, "
                         f"{want[2]}): {want[0]} channel(s) of {want[1]}x{want[2]} pixels")
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ValueError("the images must be finite floating-point values")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ValueError(f"the labels must be {images.shape[0]} integers, one per image; got shape "
                         f"{tuple(labels.shape)} of {labels.dtype}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < net.num_classes):
        raise ValueError(f"the labels run from {int(labels.min())} to {int(labels.max())}; the network has "
                         f"{net.num_classes} classes (0 .. {net.num_classes - 1})")


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, alpha: float, dataset: Dataset, net: NetConfig,
                       cfg: EvalConfig, device=None, share=None, precision: str = "fp32") -> list[EvalResult]:
    """Accuracy of networks trained on a distilled set with its learned lr alpha."""
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"learned lr alpha = {alpha} must be a finite positive number to train on the synthetic set")
    return train_and_test(images, labels, alpha, dataset, net, cfg, device, share=share, precision=precision)


def random_real_baseline(dataset: Dataset, ipc: int, net: NetConfig, cfg: EvalConfig, lr: float = 0.01,
                         seed: int = 0, device=None, share=None, precision: str = "fp32") -> list[EvalResult]:
    """Same protocol on a random real subset with `ipc` images per class."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = real_images_per_class(dataset.train_images, dataset.train_labels, dataset.num_classes, ipc, gen)
    return train_and_test(images, labels, lr, dataset, net, cfg, device, share=share, precision=precision)


def full_data_baseline(dataset: Dataset, net: NetConfig, cfg: EvalConfig, lr: float = 0.01,
                       device=None, share=None, precision: str = "fp32") -> list[EvalResult]:
    """Same protocol on the whole training set: the ceiling a synthetic set is measured against."""
    return train_and_test(dataset.train_images, dataset.train_labels, lr, dataset, net, cfg, device, share=share,
                          precision=precision)
