"""The original MTT distillation iteration, reimplemented faithfully, as the baseline the engine is timed against.

The engine's speed targets are relative to the original code (Cazenavette et al., 2022:
`distill.py`, and DSA's `DiffAugment` in `utils.py`). That code cannot be fetched here, so this
module re-creates its inner loop, structure for structure, to be timed beside the engine in the
same run on the same machine (`mctlib check` on a GPU, `timings.time_original_loop`; `make bench`,
its reference section):

- a fresh random ConvNet wrapped to take one flat parameter vector, built every iteration
  (`ReparamModule` there: parameters swapped in as views of the vector before each forward);
- the student as a growing Python list of parameter vectors, each step
  `student_params.append(student_params[-1] - syn_lr * grad)` with `create_graph=True`;
- minibatches popped from `torch.split(torch.randperm(n), batch_syn)`;
- DSA in 'S' mode drawing from the global RNG, with the scale and rotation matrices built per
  image in Python lists on the CPU and then moved to the images' device;
- the loss as two `mse_loss(..., reduction="sum")` divided by the parameter count and by each
  other, then `backward()` and one SGD step each on the images and the learnable lr;
- torch's own `nn.AvgPool2d`, in-place ReLU, and whatever thread and allocator settings the
  process has (the bench runs it under torch's defaults, as the original ran).

It computes the same objective as `matching.match(..., "unrolled")` (checked against it in
tests/test_reference.py with augmentation off); the library never calls it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

STRATEGY = "color_crop_cutout_flip_scale_rotate"


class ParamDiffAug:
    """DSA's parameters, as in the original `utils.ParamDiffAug`."""

    def __init__(self):
        self.aug_mode = "S"
        self.prob_flip = 0.5
        self.ratio_scale = 1.2
        self.ratio_rotate = 15.0
        self.ratio_crop_pad = 0.125
        self.ratio_cutout = 0.5
        self.brightness = 1.0
        self.saturation = 2.0
        self.contrast = 0.5
        self.batchmode = False
        self.latestseed = -1


def _set_seed(param: ParamDiffAug) -> None:
    if param.latestseed == -1:
        return
    torch.random.manual_seed(param.latestseed)
    param.latestseed += 1


def diff_augment(x: torch.Tensor, strategy: str = STRATEGY, seed: int = -1, param: ParamDiffAug | None = None):
    """DiffAugment: in 'S' mode one of the strategy's transforms, drawn from the global RNG."""
    param = ParamDiffAug() if param is None else param
    if strategy in ("None", "none", ""):
        return x
    param.batchmode = seed != -1
    param.latestseed = seed
    policies = strategy.split("_")
    _set_seed(param)
    policy = policies[torch.randint(0, len(policies), size=(1,)).item()]
    for f in AUGMENT_FNS[policy]:
        x = f(x, param)
    return x.contiguous()


def rand_scale(x, param):
    ratio = param.ratio_scale
    _set_seed(param)
    sx = torch.rand(x.shape[0]) * (ratio - 1.0 / ratio) + 1.0 / ratio
    _set_seed(param)
    sy = torch.rand(x.shape[0]) * (ratio - 1.0 / ratio) + 1.0 / ratio
    theta = [[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])]
    theta = torch.tensor(theta, dtype=torch.float)
    if param.batchmode:
        theta[:] = theta[0]
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def rand_rotate(x, param):
    ratio = param.ratio_rotate
    _set_seed(param)
    theta = (torch.rand(x.shape[0]) - 0.5) * 2 * ratio / 180 * float(np.pi)
    theta = [[[torch.cos(theta[i]), torch.sin(-theta[i]), 0],
              [torch.sin(theta[i]), torch.cos(theta[i]), 0]] for i in range(x.shape[0])]
    theta = torch.tensor(theta, dtype=torch.float)
    if param.batchmode:
        theta[:] = theta[0]
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def rand_flip(x, param):
    _set_seed(param)
    randf = torch.rand(x.size(0), 1, 1, 1, device=x.device)
    if param.batchmode:
        randf[:] = randf[0]
    return torch.where(randf < param.prob_flip, x.flip(3), x)


def rand_brightness(x, param):
    _set_seed(param)
    randb = torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device)
    if param.batchmode:
        randb[:] = randb[0]
    return x + (randb - 0.5) * param.brightness


def rand_saturation(x, param):
    x_mean = x.mean(dim=1, keepdim=True)
    _set_seed(param)
    rands = torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device)
    if param.batchmode:
        rands[:] = rands[0]
    return (x - x_mean) * (rands * param.saturation) + x_mean


def rand_contrast(x, param):
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    _set_seed(param)
    randc = torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device)
    if param.batchmode:
        randc[:] = randc[0]
    return (x - x_mean) * (randc + param.contrast) + x_mean


def rand_crop(x, param):
    ratio = param.ratio_crop_pad
    shift_x, shift_y = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    _set_seed(param)
    translation_x = torch.randint(-shift_x, shift_x + 1, size=[x.size(0), 1, 1], device=x.device)
    _set_seed(param)
    translation_y = torch.randint(-shift_y, shift_y + 1, size=[x.size(0), 1, 1], device=x.device)
    if param.batchmode:
        translation_x[:] = translation_x[0]
        translation_y[:] = translation_y[0]
    grid_batch, grid_x, grid_y = torch.meshgrid(
        torch.arange(x.size(0), dtype=torch.long, device=x.device),
        torch.arange(x.size(2), dtype=torch.long, device=x.device),
        torch.arange(x.size(3), dtype=torch.long, device=x.device), indexing="ij")
    grid_x = torch.clamp(grid_x + translation_x + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def rand_cutout(x, param):
    ratio = param.ratio_cutout
    cutout_size = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    _set_seed(param)
    offset_x = torch.randint(0, x.size(2) + (1 - cutout_size[0] % 2), size=[x.size(0), 1, 1], device=x.device)
    _set_seed(param)
    offset_y = torch.randint(0, x.size(3) + (1 - cutout_size[1] % 2), size=[x.size(0), 1, 1], device=x.device)
    if param.batchmode:
        offset_x[:] = offset_x[0]
        offset_y[:] = offset_y[0]
    grid_batch, grid_x, grid_y = torch.meshgrid(
        torch.arange(x.size(0), dtype=torch.long, device=x.device),
        torch.arange(cutout_size[0], dtype=torch.long, device=x.device),
        torch.arange(cutout_size[1], dtype=torch.long, device=x.device), indexing="ij")
    grid_x = torch.clamp(grid_x + offset_x - cutout_size[0] // 2, min=0, max=x.size(2) - 1)
    grid_y = torch.clamp(grid_y + offset_y - cutout_size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[grid_batch, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


AUGMENT_FNS = {"color": [rand_brightness, rand_saturation, rand_contrast], "crop": [rand_crop],
               "cutout": [rand_cutout], "flip": [rand_flip], "scale": [rand_scale], "rotate": [rand_rotate]}


class ConvNet(nn.Module):
    """The original ConvNet (instance norm as GroupNorm, in-place ReLU, torch's average pooling);
    parameter names and order match `networks.ConvNet`, so the engine's expert vectors fit it."""

    def __init__(self, channel: int, num_classes: int, width: int, depth: int, im_size: int):
        super().__init__()
        layers, size = [], im_size
        for d in range(depth):
            pad = 3 if channel == 1 and im_size == 28 and d == 0 else 1
            layers += [nn.Conv2d(channel if d == 0 else width, width, 3, padding=pad),
                       nn.GroupNorm(width, width, affine=True), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            size = (size + 2 * pad - 2) // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x):
        # The original's `.view` fails on recent torch when one-channel images come out of the crop
        # augmentation in channels-last strides; `reshape` is the same values (a copy only then).
        return self.classifier(self.features(x).reshape(x.size(0), -1))


class ReparamModule(nn.Module):
    """The original's wrapper: the module's parameters are removed and, before each forward,
    re-attached as views of one flat vector."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._infos = []
        for mname, m in module.named_modules():
            for n, p in list(m.named_parameters(recurse=False)):
                self._infos.append((m, n, p.shape, p.numel()))
        self.flat_param = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in module.parameters()]))
        for m, n, _, _ in self._infos:
            delattr(m, n)

    def forward(self, x, flat_param):
        for (m, n, shape, _), t in zip(self._infos, flat_param.split([i[3] for i in self._infos])):
            setattr(m, n, t.view(shape))
        return self.module(x)


def iteration(net_args: dict, image_syn: torch.Tensor, label_syn: torch.Tensor, syn_lr: torch.Tensor,
              trajectory: list[list[torch.Tensor]], start_epoch: int, expert_epochs: int, syn_steps: int,
              batch_syn: int, optimizer_img: torch.optim.Optimizer, optimizer_lr: torch.optim.Optimizer,
              dsa: bool = True) -> float:
    """One distillation iteration of the original loop; returns the loss. `trajectory` is one
    expert as the original buffers hold it: per epoch, a list of parameter tensors."""
    device = image_syn.device
    student_net = ReparamModule(ConvNet(**net_args)).to(device)  # a fresh random model, as the original
    student_net.train()
    num_params = sum(np.prod(p.size()) for p in student_net.parameters())
    starting_params = trajectory[start_epoch]
    target_params = torch.cat([p.data.to(device).reshape(-1) for p in trajectory[start_epoch + expert_epochs]], 0)
    student_params = [torch.cat([p.data.to(device).reshape(-1) for p in starting_params], 0).requires_grad_(True)]
    starting_params = torch.cat([p.data.to(device).reshape(-1) for p in starting_params], 0)
    dsa_param = ParamDiffAug()
    indices_chunks = []
    for _ in range(syn_steps):
        if not indices_chunks:
            indices = torch.randperm(len(image_syn))
            indices_chunks = list(torch.split(indices, batch_syn))
        these_indices = indices_chunks.pop()
        x = image_syn[these_indices]
        this_y = label_syn[these_indices]
        if dsa:
            x = diff_augment(x, STRATEGY, param=dsa_param)
        out = student_net(x, flat_param=student_params[-1])
        ce_loss = F.cross_entropy(out, this_y)
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    param_loss = torch.tensor(0.0).to(device)
    param_dist = torch.tensor(0.0).to(device)
    param_loss += F.mse_loss(student_params[-1], target_params, reduction="sum")
    param_dist += F.mse_loss(starting_params, target_params, reduction="sum")
    param_loss /= num_params
    param_dist /= num_params
    param_loss /= param_dist
    optimizer_img.zero_grad()
    optimizer_lr.zero_grad()
    param_loss.backward()
    optimizer_img.step()
    optimizer_lr.step()
    for _ in student_params:
        del _
    return float(param_loss.item())


def unflatten(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """A flat parameter vector as the original buffers store an epoch: one tensor per parameter."""
    sizes = [math.prod(s) for s in shapes]
    return [t.view(s).clone() for t, s in zip(flat.split(sizes), shapes)]
