"""The networks: the papers' ConvNet, the cross-architecture nets, and a network as a function of
one flat parameter vector.

Everything downstream (experts, trajectories, matching, evaluation) treats a network's weights as
one vector θ ∈ R^D: trajectories are lists of such vectors, the student steps θ̂_{k+1} = θ̂_k − α g_k
act on it, and the MCT β table has one column per parameter tensor (`FlatModel.layer_slices`).
`FlatModel` is the bridge from such a vector to logits, built on `torch.func.functional_call`
so it is differentiable w.r.t. θ and the images, and can be `vmap`-ed over an ensemble.

Which config fields each architecture reads:

- ``convnet`` / ``convnet_d4``: all of them (``convnet_d4`` is ``convnet`` with depth 4).
- ``resnet18``, ``vgg11``: channels, num_classes, image_size, norm, activation; their widths,
  depths and pooling are the published ones.
- ``alexnet``: channels, num_classes, image_size, activation; norm-free, as published.

As in the original code (for MNIST), a 1-channel 28×28 input gets extra padding on the first
convolution so that it enters the rest of the network as 32×32.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("convnet", "convnet_d4", "resnet18", "vgg11", "alexnet")
NORMS = ("instancenorm", "batchnorm", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid")
POOLINGS = ("avgpool", "maxpool", "none")

_CONVNETS = ("convnet", "convnet_d4")
_ALEXNET_POOLS = 3


def _mnist_padding(cfg: "NetConfig", default: int, extra: int) -> int:
    """First-layer padding: the original pads 1-channel 28×28 images up to 32×32."""
    return default + extra if cfg.channels == 1 and cfg.image_size == 28 else default


@dataclass(frozen=True)
class NetConfig:
    """Which network to build. Validated on creation; see the module docstring for which fields
    each architecture reads."""

    arch: str = "convnet"
    channels: int = 1
    num_classes: int = 10
    image_size: int = 16  # square images (H == W)
    width: int = 128  # net_width
    depth: int = 3  # ConvNet blocks (convnet_d4 forces 4)
    norm: str = "instancenorm"  # instancenorm | batchnorm | none
    activation: str = "relu"  # relu | leakyrelu | sigmoid
    pooling: str = "avgpool"  # avgpool | maxpool | none

    def __post_init__(self):
        for name, allowed in (("arch", ARCHS), ("norm", NORMS), ("activation", ACTIVATIONS), ("pooling", POOLINGS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"NetConfig.{name}={value!r} is not one of {', '.join(map(repr, allowed))}")
        for name in ("channels", "num_classes", "image_size", "width", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NetConfig.{name}={value!r} must be a positive integer")
        if self.arch == "convnet_d4":
            if self.depth not in (3, 4):  # 3 is the field's default, i.e. "not set"
                raise ValueError(f"NetConfig.depth={self.depth} conflicts with arch 'convnet_d4' (depth 4); "
                                 "leave depth at its default or set it to 4")
            object.__setattr__(self, "depth", 4)
        if self.arch in _CONVNETS and self.pooling != "none":
            size = _convnet_first_size(self)
            if size // 2**self.depth < 1:
                raise ValueError(f"NetConfig.depth={self.depth} halves a {size}x{size} feature map below 1x1 "
                                 f"(image_size={self.image_size}); need image_size // 2**depth >= 1 "
                                 "when pooling != 'none', so use a smaller depth or pooling='none'")
        if self.arch == "alexnet" and self.image_size < 2**_ALEXNET_POOLS:
            raise ValueError(f"NetConfig.image_size={self.image_size} is too small for 'alexnet', "
                             f"which pools {_ALEXNET_POOLS} times: need image_size >= {2**_ALEXNET_POOLS}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"NetConfig.from_dict: unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Building blocks

def _norm(kind: str, channels: int) -> nn.Module | None:
    if kind == "instancenorm":  # instance norm with learnable affine = GroupNorm, one group per channel
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    return None


def _norm_or_identity(kind: str, channels: int) -> nn.Module:
    norm = _norm(kind, channels)
    return nn.Identity() if norm is None else norm


def _activation(kind: str) -> nn.Module:
    # Never in-place: keeps autograd, vmap and functional_call free of aliasing surprises.
    return {"relu": nn.ReLU, "leakyrelu": lambda: nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid}[kind]()


# ---------------------------------------------------------------------------------------------
# ConvNet (the papers' default) and ConvNetD4

class AvgPool2x2(nn.Module):
    """2×2 average pooling with stride 2, the ConvNet's pooling (``nn.AvgPool2d(2, 2)``).

    On a CPU, for a contiguous float32/float64 NCHW input of even size outside autocast, it is
    computed as (row 2i + row 2i+1), then a matmul with a constant (W, W/2) matrix of 0.25s that
    averages column pairs. Both steps are plain differentiable ops, so its backward is a matmul and
    a contiguous copy and its double backward (the matching loss differentiates through the
    student's gradients) is as cheap. In a microbenchmark on the bench CPU (one thread, batch 100 ×
    64 channels, forward + backward) it took 3.1 against 6.7 ms at 16×16 and 0.8 against 1.7 ms at
    8×8; `python -m benchmarks --sections eval,pool` measures what that does to training and
    matching (book/performance.md). It differs from `F.avg_pool2d` in rounding only, except that an
    infinite activation turns its whole output row into NaN (0 · inf) where torch keeps one
    infinite window; training stops on non-finite values either way. Elsewhere (CUDA, where a
    second kernel launch would cost more than it saves; odd sizes; channels-last inputs, whose
    layout it would not keep; autocast, whose bf16 matmul would round more than torch's pooling)
    it is `F.avg_pool2d`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (x.device.type != "cpu" or x.dim() != 4 or h % 2 or w % 2 or not x.is_contiguous()
                or torch.is_autocast_enabled("cpu") or x.dtype not in (torch.float32, torch.float64)):
            return F.avg_pool2d(x, 2, 2)
        n, c = x.shape[:2]
        top, bottom = x.reshape(n, c, h // 2, 2, w).unbind(3)
        pairs = torch.zeros(w, w // 2, dtype=x.dtype, device=x.device)
        cols = torch.arange(w // 2, device=x.device)
        pairs[2 * cols, cols] = 0.25
        pairs[2 * cols + 1, cols] = 0.25
        return (top + bottom) @ pairs


# Devices whose adaptive average pooling backward is deterministic (CPU: one thread per sample), which
# keep torch's kernel and its rounding; on CUDA it accumulates with atomics and a mean runs instead.
NATIVE_POOL_DEVICES = ("cpu",)


class GlobalAvgPool(nn.Module):
    """Average over the whole map, (N, C, H, W) -> (N, C, 1, 1): `adaptive_avg_pool2d(x, 1)`.

    Off the CPU it is a mean over (H, W), whose backward is an expand (deterministic on CUDA, where
    adaptive pooling's backward is not); the two differ in rounding only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in NATIVE_POOL_DEVICES:
            return F.adaptive_avg_pool2d(x, 1)
        return x.mean(dim=(2, 3), keepdim=True)


def _convnet_first_size(cfg: NetConfig) -> int:
    """Spatial size after the first 3×3 convolution."""
    return cfg.image_size + 2 * _mnist_padding(cfg, 1, 2) - 2


class ConvNet(nn.Module):
    """`depth` × [conv3×3(width) → norm → activation → pool 2×2], then one linear layer.
    Parameter names (`features.0.weight`, …, `classifier.bias`) follow the MTT code."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        layers, in_ch, size = [], cfg.channels, _convnet_first_size(cfg)
        for d in range(cfg.depth):
            layers.append(nn.Conv2d(in_ch, cfg.width, 3, padding=_mnist_padding(cfg, 1, 2) if d == 0 else 1))
            norm = _norm(cfg.norm, cfg.width)
            if norm is not None:
                layers.append(norm)
            layers.append(_activation(cfg.activation))
            if cfg.pooling != "none":
                layers.append(AvgPool2x2() if cfg.pooling == "avgpool" else nn.MaxPool2d(2, 2))
                size //= 2
            in_ch = cfg.width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.width * size * size, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------
# ResNet18 (DC/MTT small-image variant: 3×3 stem, no max-pool)

class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm_or_identity(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm_or_identity(norm, planes)
        self.act = _activation(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          _norm_or_identity(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """BasicBlock ×[2, 2, 2, 2], widths 64–512. Global average pooling (the original's
    `avg_pool2d(out, 4)` at 32×32) is global here, so any image_size >= 8 works."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(cfg.channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = _norm_or_identity(cfg.norm, 64)
        self.act = _activation(cfg.activation)
        in_planes, stages = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, cfg.norm, cfg.activation),
                                        BasicBlock(planes, planes, 1, cfg.norm, cfg.activation)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = GlobalAvgPool()
        self.classifier = nn.Linear(512, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.classifier(self.pool(out).flatten(1))


# ---------------------------------------------------------------------------------------------
# VGG11 (DC variant: norm after every conv, linear classifier on 512 features)

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """The DC 'VGG11'. A max-pool that would shrink the map below 1×1 (images under 32 px) is
    skipped, and the final pooling is global, so 16–64 px inputs all give 512 features."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        layers, in_ch = [], cfg.channels
        size = _convnet_first_size(cfg)  # same 3×3 first layer as the ConvNet
        for i, v in enumerate(_VGG11):
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
                continue
            layers.append(nn.Conv2d(in_ch, v, 3, padding=_mnist_padding(cfg, 1, 2) if i == 0 else 1))
            norm = _norm(cfg.norm, v)
            if norm is not None:
                layers.append(norm)
            layers.append(_activation(cfg.activation))
            in_ch = v
        layers.append(GlobalAvgPool())
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------
# AlexNet (DC small-image variant, no norm)

class AlexNet(nn.Module):
    """The DC 'AlexNet': five convolutions (128-192-256-192-192), three max-pools, one linear
    layer on the flattened map (192·4·4 at 32 px)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        act = lambda: _activation(cfg.activation)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(cfg.channels, 128, 5, padding=_mnist_padding(cfg, 2, 2)), act(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, 5, padding=2), act(), nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, 3, padding=1), act(),
            nn.Conv2d(256, 192, 3, padding=1), act(),
            nn.Conv2d(192, 192, 3, padding=1), act(), nn.MaxPool2d(2, 2),
        )
        size = cfg.image_size + 2 * _mnist_padding(cfg, 2, 2) - 4
        size = size // 2**_ALEXNET_POOLS
        self.fc = nn.Linear(192 * size * size, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


_BUILDERS = {"convnet": ConvNet, "convnet_d4": ConvNet, "resnet18": ResNet18, "vgg11": VGG11, "alexnet": AlexNet}


def build_network(cfg: NetConfig, seed: int | None = None) -> nn.Module:
    """Build `cfg`'s network on CPU (float32). With `seed`, the initialisation is reproducible
    bit-for-bit and the caller's global RNG state is left untouched; without, it draws from the
    global RNG."""
    if not isinstance(cfg, NetConfig):
        raise TypeError(f"build_network expects a NetConfig, got {type(cfg).__name__}")
    if seed is None:
        return _BUILDERS[cfg.arch](cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _BUILDERS[cfg.arch](cfg)


def count_parameters(module: nn.Module) -> int:
    """D, the length of the flat parameter vector."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# A network as a pure function of one flat parameter vector

class FlatModel:
    """A network as a pure function of ONE flat parameter vector θ ∈ R^D:
    ``logits = model(theta, x)``, differentiable w.r.t. θ and x.

    The template module (a private deep copy) supplies the architecture, the buffers and a
    default initialisation for `flatten()`; its parameters are never used in `__call__`.
    Train/eval mode is the template's (`model.train()`, `model.eval()`).

    Ensembles: ``torch.func.vmap(model, in_dims=(0, 0))(P, X)`` with P (M, D) and
    X (M, B, C, H, W) evaluates M networks at once. Batchnorm nets cannot do this in train mode
    (running statistics are updated in place, which vmap forbids) and `supports_vmap` is False
    for them; in train mode outside vmap the template's running statistics are updated.
    """

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module)
        named = list(self.module.named_parameters())
        if not named:
            raise ValueError("FlatModel: the module has no parameters")
        self.names: tuple[str, ...] = tuple(n for n, _ in named)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for _, p in named)
        self.numels: tuple[int, ...] = tuple(p.numel() for _, p in named)
        self.numel: int = sum(self.numels)
        offsets, start = [], 0
        for n in self.numels:
            offsets.append(slice(start, start + n))
            start += n
        self.layer_slices: tuple[slice, ...] = tuple(offsets)
        self.supports_vmap: bool = not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                           for m in self.module.modules())
        self._buffers = dict(self.module.named_buffers())

    # -- conversions ---------------------------------------------------------------------------
    def flatten(self, module: nn.Module | None = None) -> torch.Tensor:
        """Detached copy of the module's parameters (default: the template), concatenated in
        `names` order."""
        module = self.module if module is None else module
        params = dict(module.named_parameters())
        self._check_names(params)
        return torch.cat([params[n].detach().reshape(-1) for n in self.names]).clone()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views (no copies) of `flat`, shaped like the parameters."""
        if flat.shape != (self.numel,):
            raise ValueError(f"FlatModel: expected a flat vector of shape ({self.numel},), got {tuple(flat.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def load_into(self, flat: torch.Tensor, module: nn.Module) -> None:
        """Copy `flat` into `module`'s parameters in place (no autograd)."""
        params = dict(module.named_parameters())
        self._check_names(params)
        with torch.no_grad():
            for n, v in self.unflatten(flat).items():
                params[n].copy_(v)

    # -- the function ---------------------------------------------------------------------------
    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits f(x; θ) with θ = `flat`."""
        return torch.func.functional_call(self.module, (self.unflatten(flat), self._buffers), (x,))

    # -- housekeeping ---------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "FlatModel":
        """Move the template (its buffers, and its default parameters) to `device`; returns self."""
        self.module.to(device)
        self._buffers = dict(self.module.named_buffers())
        return self

    def train(self, mode: bool = True) -> "FlatModel":
        self.module.train(mode)
        return self

    def eval(self) -> "FlatModel":
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.module.training

    def __repr__(self) -> str:
        return (f"FlatModel({type(self.module).__name__}, D={self.numel}, tensors={len(self.names)}, "
                f"supports_vmap={self.supports_vmap})")

    def _check_names(self, params: dict) -> None:
        if tuple(params) != self.names or any(params[n].shape != s for n, s in zip(self.names, self.shapes)):
            raise ValueError("FlatModel: the module's parameters do not match the template's names and shapes")
