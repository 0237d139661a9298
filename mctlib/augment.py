"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021), as MTT and MCT use it.

One call of `DSA` picks ONE group of the strategy at random ('S' mode) and applies it with
random parameters drawn per sample. Every random number comes from a `torch.Generator`
seeded by the caller, so a seed replays the exact same augmentation: the constant-memory
gradient mode recomputes g_k on the same augmented batch, and the "siamese" property of DSA
(the same transform on two batches) is simply "call twice with the same seed".
All operations are differentiable w.r.t. the images and vectorised over the batch, and their
backwards are deterministic on every device (off the CPU, scale, rotate and crop are written as
explicit interpolations; see `NATIVE_DEVICES`). Which group a call applies is drawn on the host, so
choosing it never waits for a GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .device import generator as make_generator

Augment = Callable[[torch.Tensor, int], torch.Tensor]

# Strategy groups and the operations each applies in sequence (DSA's AUGMENT_FNS).
GROUPS: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}
OPS: tuple[str, ...] = ("brightness", "saturation", "contrast", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """DSA hyper-parameters; defaults are the DSA/MTT/MCT `ParamDiffAug` values."""

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    flip: float = 0.5  # probability of a horizontal flip
    scale: float = 1.2  # sx, sy ~ U[1/scale, scale]
    rotate: float = 15.0  # angle ~ U[-rotate, rotate] degrees
    crop: float = 0.125  # translation up to crop * size pixels
    cutout: float = 0.5  # side of the zeroed square, as a fraction of the size
    brightness: float = 1.0  # x + (u - 0.5) * brightness
    saturation: float = 2.0  # (x - mean_C) * (u * saturation) + mean_C
    contrast: float = 0.5  # (x - mean_CHW) * (u + contrast) + mean_CHW

    def __post_init__(self):
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ValueError(
                f"DSAParams.strategy must be a non-empty '_'-joined string of groups from "
                f"{sorted(GROUPS)}, got {self.strategy!r}"
            )
        groups = self.strategy.split("_")
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise ValueError(
                f"DSAParams.strategy has unknown group(s) {unknown}; allowed groups are "
                f"{sorted(GROUPS)}, joined with '_' (e.g. 'color_crop_cutout_flip_scale_rotate')"
            )
        if len(set(groups)) != len(groups):
            # A repeated group would silently double its chance of being picked in 'S' mode.
            raise ValueError(f"DSAParams.strategy repeats a group: {self.strategy!r}; list each group once")
        bounds = {
            "flip": (0.0, 1.0, "a probability in [0, 1]"),
            "scale": (1.0, math.inf, "a ratio >= 1 (1 = no scaling)"),
            "rotate": (0.0, 180.0, "an angle in [0, 180] degrees"),
            "crop": (0.0, 1.0, "a pad ratio in [0, 1]"),
            "cutout": (0.0, 1.0, "a size ratio in [0, 1]"),
            "brightness": (0.0, math.inf, "a magnitude >= 0"),
            "saturation": (0.0, math.inf, "a magnitude >= 0"),
            "contrast": (0.0, math.inf, "a magnitude >= 0"),
        }
        for name, (lo, hi, what) in bounds.items():
            value = getattr(self, name)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"DSAParams.{name} must be {what}, got {value!r}")

    @property
    def groups(self) -> tuple[str, ...]:
        """The strategy's groups, in the order 'S' mode indexes them."""
        return tuple(self.strategy.split("_"))


def _uniform(n: int, g: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """n draws of U[0, 1) on x.device, made in float32 so the draws do not depend on x.dtype."""
    return torch.rand(n, generator=g, device=x.device, dtype=torch.float32).to(x.dtype)


# Devices on which grid_sample's and gather's backwards are deterministic (the CPU kernels accumulate
# each sample's gradient in one thread) and which therefore keep them: they are faster there and
# keep CPU results bit for bit what they were. Elsewhere (CUDA: atomics) the explicit formulations
# below run instead; tests/test_augment.py checks both give the same values and gradients.
NATIVE_DEVICES = ("cpu",)


def _native(x: torch.Tensor) -> bool:
    return x.device.type in NATIVE_DEVICES


def _grid_sample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """DSA's own resampling: affine_grid + grid_sample (bilinear, zero padding, align_corners=True)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _tent(source: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear interpolation weights: (..., size) with weight max(0, 1 - |source - q|) on pixel q.

    `source` holds source coordinates in pixels. A pixel outside 0..size-1 gets no weight, which is
    grid_sample's zero padding; an integer coordinate gives an exact one-hot row."""
    q = torch.arange(size, device=source.device, dtype=source.dtype)
    return (1 - (source.unsqueeze(-1) - q).abs()).clamp_min(0)


def _resample_separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[n, c] = rows[n] @ x[n, c] @ cols[n]^T for rows (n, H, H), cols (n, W, W).

    Written as matmuls so that the backward is matmuls too: deterministic on every device, where
    grid_sample's and gather's backwards accumulate with atomics on CUDA."""
    return rows.unsqueeze(1) @ x @ cols.transpose(1, 2).unsqueeze(1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample x through per-sample 2x3 matrices, bilinear with zero padding (DSA: affine_grid +
    grid_sample, align_corners=True), written out so that its backward is deterministic.

    Each output pixel is the weighted sum of its four neighbours around grid_sample's source point,
    read from x padded by one zero pixel by advanced indexing. Its backward is index_put with
    accumulation, which CUDA computes deterministically (sorted indices, as for the student's
    `images[batch]`), where grid_sample's backward accumulates with atomics."""
    if _native(x):
        return _grid_sample(x, theta)
    n, c, h, w = x.shape
    grid = F.affine_grid(theta.detach(), [n, c, h, w], align_corners=True)          # (n, h, w, 2), no grad
    ix = ((grid[..., 0] + 1) / 2 * (w - 1)).flatten(1)                               # (n, hw) source columns
    iy = ((grid[..., 1] + 1) / 2 * (h - 1)).flatten(1)
    x0, y0 = ix.floor(), iy.floor()
    wx1, wy1 = ix - x0, iy - y0                                                      # grid_sample's weights
    wx0, wy0 = 1 - wx1, 1 - wy1
    # Indices into the padded image; anything beyond one pixel outside reads the zero border.
    cx = [(x0 + d).clamp(-1, w).long() + 1 for d in (0, 1)]
    cy = [(y0 + d).clamp(-1, h).long() + 1 for d in (0, 1)]
    flat = F.pad(x, [1, 1, 1, 1]).flatten(2)                                          # (n, c, (h+2)(w+2))
    index = torch.cat([cy[a] * (w + 2) + cx[b] for a in (0, 1) for b in (0, 1)], 1)  # (n, 4hw)
    corners = flat[torch.arange(n, device=x.device)[:, None], :, index]              # (n, 4hw, c)
    weights = torch.cat([wy * wx for wy in (wy0, wy1) for wx in (wx0, wx1)], 1).to(x.dtype)
    out = (corners * weights.unsqueeze(-1)).reshape(n, 4, h * w, c).sum(1)          # (n, hw, c)
    return out.transpose(1, 2).reshape(n, c, h, w)


def _base(size: int, x: torch.Tensor) -> torch.Tensor:
    """affine_grid's normalised pixel centres for align_corners=True: linspace(-1, 1, size)."""
    return torch.linspace(-1, 1, size, device=x.device, dtype=x.dtype)


def rand_scale(x: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """DSA rand_scale: diag(sx, sy) with sx, sy ~ U[1/ratio, ratio] per sample.

    A diagonal matrix maps rows to rows and columns to columns, so the resampling is separable:
    out = Ry @ x @ Rx^T, with the tent weights of grid_sample's source coordinates."""
    n, _, h, w = x.shape
    sx = _uniform(n, g, x) * (ratio - 1.0 / ratio) + 1.0 / ratio
    sy = _uniform(n, g, x) * (ratio - 1.0 / ratio) + 1.0 / ratio
    if _native(x):
        zero = torch.zeros_like(sx)
        return _grid_sample(x, torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1))
    ix = (sx[:, None] * _base(w, x) + 1) / 2 * (w - 1)                                 # (n, w)
    iy = (sy[:, None] * _base(h, x) + 1) / 2 * (h - 1)                                 # (n, h)
    return _resample_separable(x, _tent(iy, h), _tent(ix, w))


def rand_rotate(x: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    """DSA rand_rotate: rotation by an angle ~ U[-degrees, degrees] per sample."""
    angle = (_uniform(x.shape[0], g, x) - 0.5) * 2 * degrees / 180 * math.pi
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def rand_flip(x: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    """DSA rand_flip: horizontal flip of each sample with probability prob (exact, no interpolation)."""
    u = torch.rand(x.shape[0], 1, 1, 1, generator=g, device=x.device, dtype=torch.float32)
    return torch.where(u < prob, x.flip(3), x)


def rand_brightness(x: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """DSA rand_brightness: x + (u - 0.5) * ratio, u ~ U[0, 1) per sample."""
    u = _uniform(x.shape[0], g, x).view(-1, 1, 1, 1)
    return x + (u - 0.5) * ratio


def rand_saturation(x: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """DSA rand_saturation: (x - mean over channels) * (u * ratio) + mean; identity on 1 channel."""
    mean = x.mean(dim=1, keepdim=True)
    u = _uniform(x.shape[0], g, x).view(-1, 1, 1, 1)
    return (x - mean) * (u * ratio) + mean


def rand_contrast(x: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """DSA rand_contrast: (x - mean over C,H,W) * (u + ratio) + mean."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    u = _uniform(x.shape[0], g, x).view(-1, 1, 1, 1)
    return (x - mean) * (u + ratio) + mean


def rand_crop(x: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """DSA rand_crop: integer translation by up to round(ratio * size) pixels, zeros shifted in."""
    n, c, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (n,), generator=g, device=x.device)
    tx = torch.randint(-sw, sw + 1, (n,), generator=g, device=x.device)
    if _native(x):
        # Zero padding by the largest shift, then a per-sample gather: out[i, j] = x[i + ty, j + tx] or 0.
        xp = F.pad(x, [sw, sw, sh, sh])
        rows = torch.arange(h, device=x.device) + (ty + sh)[:, None]  # (n, h)
        cols = torch.arange(w, device=x.device) + (tx + sw)[:, None]  # (n, w)
        xp = xp.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * sw))
        return xp.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    # An integer translation is a resampling with one-hot tent weights: out = Sy @ x @ Sx^T, exactly
    # the original's pad-by-1 + clamped index gathering (products with 1 and sums of exact zeros),
    # and, unlike a gather, with a deterministic backward on CUDA.
    rows = torch.arange(h, device=x.device) + ty[:, None]  # (n, h) source rows
    cols = torch.arange(w, device=x.device) + tx[:, None]  # (n, w) source columns
    return _resample_separable(x, _tent(rows.to(x.dtype), h), _tent(cols.to(x.dtype), w))


def rand_cutout(x: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """DSA rand_cutout: zero a square of side round(ratio * size) at a random centre per sample."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    # Offset ranges as in the original (one extra position for even sizes).
    oy = torch.randint(0, h + (1 - ch % 2), (n,), generator=g, device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), (n,), generator=g, device=x.device)
    top, left = (oy - ch // 2)[:, None], (ox - cw // 2)[:, None]
    r, q = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    # The original's clamped index scatter equals this intersection of the square with the image.
    in_rows = (r >= top) & (r < top + ch)  # (n, h)
    in_cols = (q >= left) & (q < left + cw)  # (n, w)
    mask = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * mask.to(x.dtype).unsqueeze(1)


_OP_FNS = {
    "brightness": rand_brightness,
    "saturation": rand_saturation,
    "contrast": rand_contrast,
    "crop": rand_crop,
    "cutout": rand_cutout,
    "flip": rand_flip,
    "scale": rand_scale,
    "rotate": rand_rotate,
}


@functools.lru_cache(maxsize=1 << 16)
def _host_choice(seed: int, n: int) -> int:
    """randint(0, n) as the first draw of a CPU generator seeded with `seed` (read on the host: no sync)."""
    return int(torch.randint(0, n, (1,), generator=make_generator(seed, "cpu")))


class DSA:
    """DSA in 'S' mode: one strategy group per call, random parameters per sample, seeded draws."""

    def __init__(self, params: DSAParams = DSAParams()):
        if not isinstance(params, DSAParams):
            raise TypeError(f"DSA expects a DSAParams, got {type(params).__name__}")
        self.params = params

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups 'S' mode chooses from."""
        return self.params.groups

    def choose_group(self, seed: int) -> str:
        """The group that `self(x, seed)` applies, the same on every device: the first draw of a CPU
        generator seeded with `seed` (DSA's 'S' mode). It is drawn on the host, so choosing which
        operations to launch never waits for a GPU, and remembered per seed, so the recomputations
        of the checkpointed and constant-memory modes do not draw it again."""
        return self.groups[_host_choice(int(seed), len(self.groups))]

    def apply(self, x: torch.Tensor, group: str, generator: torch.Generator) -> torch.Tensor:
        """One group ('color' = brightness, saturation, contrast) or one single op, drawn from generator."""
        _check_images(x)
        if group in GROUPS:
            ops = GROUPS[group]
        elif group in OPS:
            ops = (group,)
        else:
            raise ValueError(f"unknown DSA group {group!r}; allowed: groups {sorted(GROUPS)}, ops {list(OPS)}")
        if generator.device.type != x.device.type:
            # Draws are made on x.device, so that the stream (and thus the replay) is device-specific.
            raise ValueError(f"generator is on {generator.device} but the images are on {x.device}")
        # Outside autocast: the resampling matmuls in bf16 would round the images themselves.
        with torch.autocast(x.device.type, enabled=False):
            for op in ops:
                x = _OP_FNS[op](x, getattr(self.params, op), generator)
        return x.contiguous()

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """DSA 'S' mode: one group chosen by `seed` on the host, then per-sample parameters drawn on
        x.device from a generator seeded with `seed`. On the CPU that is the generator the group was
        drawn from, continued past that draw, as in DSA's code (so CPU results are what they were)."""
        _check_images(x)
        group = self.choose_group(seed)
        g = make_generator(seed, x.device)
        if x.device.type == "cpu":
            torch.randint(0, len(self.groups), (1,), generator=g)  # the group draw, already made
        return self.apply(x, group, g)

    def __repr__(self) -> str:
        return f"DSA({self.params!r})"


def _check_images(x: torch.Tensor) -> None:
    """Images must be a floating (N, C, H, W) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, torch.Tensor) else None
        raise ValueError(f"DSA expects a floating (N, C, H, W) image tensor, got shape {shape}, {dtype}")


def identity_augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """No augmentation, with the same (images, seed) signature as DSA."""
    return x


def make_augment(enabled: bool, params: DSAParams = DSAParams()) -> Augment:
    """DSA(params) when enabled, else the identity; both are called as aug(x, seed)."""
    return DSA(params) if enabled else identity_augment
