"""Tests for mctlib.augment: DSA ('S' mode) as in the DSA/MTT code, seeded and differentiable."""

import math

import pytest
import torch
import torch.nn.functional as F

from mctlib import augment
from mctlib.augment import DSA, GROUPS, OPS, DSAParams, identity_augment, make_augment
from mctlib.device import generator

ALL = tuple(OPS) + tuple(g for g in GROUPS if g not in OPS)  # single ops plus 'color'
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(n=6, c=3, h=12, w=10, dtype=torch.float32, device="cpu", seed=0):
    """Random non-square test images."""
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def run(dsa, x, name, seed=0):
    """One op or group with a fresh generator on x.device."""
    return dsa.apply(x, name, generator(seed, x.device))


# ---------------------------------------------------------------- shape, dtype, gradient, seeding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ALL + ("S",))
def test_shape_dtype_and_gradient(name, channels, dtype, device):
    dsa = DSA()
    x = images(c=channels, dtype=dtype, device=device).requires_grad_()
    out = dsa(x, 7) if name == "S" else run(dsa, x, name)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL + ("S",))
def test_same_seed_same_output_different_seed_different_output(name):
    dsa = DSA()
    x = images(n=16)
    aug = (lambda s: dsa(x, s)) if name == "S" else (lambda s: run(dsa, x, name, s))
    assert torch.equal(aug(3), aug(3))
    assert any(not torch.equal(aug(3), aug(s)) for s in range(4, 10))


def test_draws_do_not_depend_on_dtype_or_touch_global_rng():
    dsa = DSA()
    x = images()
    state = torch.get_rng_state()
    for seed in range(12):
        a, b = dsa(x, seed), dsa(x.double(), seed)
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------- exact behaviour of each op


def test_flip_probability_one_and_zero_are_exact():
    x = images()
    assert torch.equal(run(DSA(DSAParams(flip=1.0)), x, "flip"), x.flip(-1))
    assert torch.equal(run(DSA(DSAParams(flip=0.0)), x, "flip"), x)


@pytest.mark.parametrize("name, params", [("scale", DSAParams(scale=1.0)), ("rotate", DSAParams(rotate=0.0))])
def test_identity_affine_reproduces_image(name, params):
    x = images()
    torch.testing.assert_close(run(DSA(params), x, name), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, params", [
    ("crop", DSAParams(crop=0.0)),
    ("cutout", DSAParams(cutout=0.0)),
    ("brightness", DSAParams(brightness=0.0)),
])
def test_zero_magnitude_is_exact_identity(name, params):
    x = images()
    assert torch.equal(run(DSA(params), x, name), x)


def test_saturation_is_identity_on_one_channel():
    x = images(c=1)
    assert torch.equal(run(DSA(), x, "saturation"), x)


def test_brightness_and_contrast_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])  # one 1x2x2 image, mean 2
    u = torch.rand(1, generator=generator(11)).item()  # the one draw each op makes
    bright = run(DSA(DSAParams(brightness=1.0)), x, "brightness", seed=11)
    torch.testing.assert_close(bright, x + (u - 0.5))
    contrast = run(DSA(DSAParams(contrast=0.5)), x, "contrast", seed=11)
    torch.testing.assert_close(contrast, (x - 2.0) * (u + 0.5) + 2.0)


def test_saturation_by_hand():
    x = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)  # channel mean 3
    u = torch.rand(1, generator=generator(5)).item()
    out = run(DSA(DSAParams(saturation=2.0)), x, "saturation", seed=5)
    torch.testing.assert_close(out, (x - 3.0) * (2.0 * u) + 3.0)


def test_color_is_brightness_then_saturation_then_contrast():
    dsa, x = DSA(), images()
    g = generator(4)
    expected = dsa.apply(dsa.apply(dsa.apply(x, "brightness", g), "saturation", g), "contrast", g)
    assert torch.equal(run(dsa, x, "color", seed=4), expected)


def original_style_crop(x, ty, tx):
    """Reference: the DSA code's pad-by-one + clamped index gathering, with given translations."""
    n, _, h, w = x.shape
    b, i, j = torch.meshgrid(torch.arange(n), torch.arange(h), torch.arange(w), indexing="ij")
    i = torch.clamp(i + ty.view(-1, 1, 1) + 1, 0, h + 1)
    j = torch.clamp(j + tx.view(-1, 1, 1) + 1, 0, w + 1)
    return F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[b, i, j].permute(0, 3, 1, 2)


def original_style_cutout(x, oy, ox, ch, cw):
    """Reference: the DSA code's mask built by clamped index scatter, with given offsets."""
    n, _, h, w = x.shape
    b, i, j = torch.meshgrid(torch.arange(n), torch.arange(ch), torch.arange(cw), indexing="ij")
    i = torch.clamp(i + oy.view(-1, 1, 1) - ch // 2, 0, h - 1)
    j = torch.clamp(j + ox.view(-1, 1, 1) - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w)
    mask[b, i, j] = 0
    return x * mask.unsqueeze(1)


@pytest.mark.parametrize("h, w", [(12, 10), (9, 9), (16, 7)])
def test_crop_matches_original_index_gathering(h, w):
    x = images(n=64, h=h, w=w)
    ratio = 0.25
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    g = generator(2)
    ty = torch.randint(-sh, sh + 1, (64,), generator=g)  # the draws rand_crop makes, in order
    tx = torch.randint(-sw, sw + 1, (64,), generator=g)
    out = run(DSA(DSAParams(crop=ratio)), x, "crop", seed=2)
    assert torch.equal(out, original_style_crop(x, ty, tx))


@pytest.mark.parametrize("h, w, ratio", [(12, 10, 0.5), (9, 9, 0.5), (16, 7, 0.3), (8, 8, 1.0)])
def test_cutout_matches_original_mask(h, w, ratio):
    x = images(n=64, h=h, w=w)
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    g = generator(9)
    oy = torch.randint(0, h + (1 - ch % 2), (64,), generator=g)
    ox = torch.randint(0, w + (1 - cw % 2), (64,), generator=g)
    out = run(DSA(DSAParams(cutout=ratio)), x, "cutout", seed=9)
    assert torch.equal(out, original_style_cutout(x, oy, ox, ch, cw))


def test_scale_and_rotate_fix_the_centre_pixel():
    # With align_corners=True the normalised origin is the centre pixel of an odd-sized image,
    # and neither op translates, so that pixel is resampled exactly at itself.
    x = images(n=32, h=9, w=9)
    for name in ("scale", "rotate"):
        out = run(DSA(), x, name)
        torch.testing.assert_close(out[:, :, 4, 4], x[:, :, 4, 4], atol=1e-5, rtol=0)


def test_rotate_leaves_a_radial_image_nearly_unchanged():
    r = torch.linspace(-1, 1, 33)
    blob = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / 0.1).expand(8, 1, 33, 33)
    out = run(DSA(DSAParams(rotate=15.0)), blob, "rotate")
    assert (out - blob).abs().max() < 0.02


def test_scale_zooms_within_the_stated_range():
    # The mass of a centred blob scales like 1 / (sx * sy) with sx, sy in [1/1.2, 1.2].
    r = torch.linspace(-1, 1, 65)
    blob = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / 0.02).expand(64, 1, 65, 65)
    ratio = run(DSA(), blob, "scale").sum((1, 2, 3)) / blob[0].sum()
    assert ratio.min() > 1 / 1.2**2 - 0.02 and ratio.max() < 1.2**2 + 0.02
    assert ratio.std() > 0.05  # per-sample factors, not one per batch


# ---------------------------------------------------------------- 'S' mode and per-sample parameters


def test_choose_group_covers_every_group_and_drives_call():
    dsa, x = DSA(), images()
    chosen = [dsa.choose_group(s) for s in range(200)]
    assert set(chosen) == set(dsa.groups)
    assert chosen[:20] == [dsa.groups[int(torch.randint(0, 6, (1,), generator=generator(s)))] for s in range(20)]
    for seed in range(12):
        g = generator(seed)
        torch.randint(0, len(dsa.groups), (1,), generator=g)  # the group draw __call__ makes first
        assert torch.equal(dsa(x, seed), dsa.apply(x, chosen[seed], g))


def test_single_group_strategy():
    dsa, x = DSA(DSAParams(strategy="flip", flip=1.0)), images()
    assert dsa.groups == ("flip",) and torch.equal(dsa(x, 0), x.flip(-1))


def test_parameters_are_drawn_per_sample():
    x = images(n=64)
    out = run(DSA(), x, "flip")
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (flipped | kept).all() and 0 < flipped.sum() < 64
    shifts = run(DSA(), x, "brightness") - x
    assert shifts.flatten(1).std(1).max() < 1e-6 and shifts.flatten(1).mean(1).std() > 0.1


# ---------------------------------------------------------------- configuration and errors


@pytest.mark.parametrize("kwargs, field", [
    ({"strategy": "color_blur"}, "strategy"),
    ({"strategy": ""}, "strategy"),
    ({"strategy": "flip_flip"}, "strategy"),
    ({"flip": 1.5}, "flip"),
    ({"flip": -0.1}, "flip"),
    ({"scale": 0.9}, "scale"),
    ({"rotate": -1.0}, "rotate"),
    ({"crop": float("nan")}, "crop"),
    ({"cutout": 2.0}, "cutout"),
    ({"brightness": -1.0}, "brightness"),
    ({"saturation": True}, "saturation"),
    ({"contrast": math.inf}, "contrast"),
])
def test_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DSAParams.{field}"):
        DSAParams(**kwargs)


def test_defaults_are_the_papers():
    p = DSAParams()
    assert p.groups == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert (p.flip, p.scale, p.rotate, p.crop, p.cutout) == (0.5, 1.2, 15.0, 0.125, 0.5)
    assert (p.brightness, p.saturation, p.contrast) == (1.0, 2.0, 0.5)


def test_bad_inputs_are_rejected():
    dsa = DSA()
    with pytest.raises(ValueError, match="N, C, H, W"):
        dsa(torch.rand(3, 8, 8), 0)
    with pytest.raises(ValueError, match="floating"):
        dsa(torch.zeros(2, 3, 8, 8, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="unknown DSA group"):
        dsa.apply(images(), "blur", generator(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_replay_and_generator_device_check():
    dsa = DSA()
    x = images(device="cuda")
    assert torch.equal(dsa(x, 5), dsa(x, 5))
    cpu = dsa(x.cpu(), 5)
    for seed in range(6):  # the group is drawn on the host: the same on both devices
        group = dsa.choose_group(seed)
        assert torch.equal(dsa(x, seed), dsa.apply(x, group, generator(seed, "cuda")))
    assert cpu.shape == x.shape
    with pytest.raises(ValueError, match="generator"):
        dsa.apply(x, "flip", generator(0, "cpu"))


def test_make_augment():
    x = images()
    assert make_augment(False) is identity_augment and identity_augment(x, 3) is x
    aug = make_augment(True, DSAParams(strategy="flip", flip=1.0))
    assert isinstance(aug, DSA) and torch.equal(aug(x, 0), x.flip(-1))


# ---------------------------------------------------------------- deterministic formulations (issue 12)


@pytest.fixture
def explicit(monkeypatch):
    """Run the explicit formulations (those CUDA uses) on the CPU."""
    monkeypatch.setattr(augment, "NATIVE_DEVICES", ())


def grid_sample_affine(x, theta):
    """The DSA code's resampling: affine_grid + grid_sample (bilinear, zeros, align_corners=True)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def grid_sample_scale(x, ratio, g):
    """DSA's rand_scale as written there, with the draws mctlib's makes, in order."""
    n = x.shape[0]
    sx = torch.rand(n, generator=g, dtype=torch.float32).to(x.dtype) * (ratio - 1.0 / ratio) + 1.0 / ratio
    sy = torch.rand(n, generator=g, dtype=torch.float32).to(x.dtype) * (ratio - 1.0 / ratio) + 1.0 / ratio
    z = torch.zeros_like(sx)
    return grid_sample_affine(x, torch.stack([torch.stack([sx, z, z], 1), torch.stack([z, sy, z], 1)], 1))


def grid_sample_rotate(x, degrees, g):
    angle = (torch.rand(x.shape[0], generator=g, dtype=torch.float32).to(x.dtype) - 0.5) * 2 * degrees / 180 * math.pi
    c, s, z = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    return grid_sample_affine(x, torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1))


@pytest.mark.parametrize("h, w", [(16, 16), (12, 10), (9, 9), (32, 32)])
@pytest.mark.parametrize("name, params", [("scale", DSAParams()), ("scale", DSAParams(scale=2.0)),
                                          ("rotate", DSAParams()), ("rotate", DSAParams(rotate=90.0)),
                                          ("rotate", DSAParams(rotate=180.0))])
def test_explicit_interpolation_equals_grid_sample_in_values_and_gradients(name, params, h, w, explicit):
    x = images(n=24, h=h, w=w, dtype=torch.float64).requires_grad_()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_fn = grid_sample_scale if name == "scale" else grid_sample_rotate
    ref = ref_fn(x, getattr(params, name), generator(3))
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), x)
    out = run(DSA(params), x, name, seed=3)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("h, w", [(12, 10), (9, 9), (16, 7)])
def test_explicit_crop_is_bit_equal_to_the_gather_in_values_and_gradients(h, w, monkeypatch):
    x = images(n=64, h=h, w=w).requires_grad_()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    native = run(DSA(DSAParams(crop=0.25)), x, "crop", seed=2)
    (native_grad,) = torch.autograd.grad((native * weights).sum(), x)
    monkeypatch.setattr(augment, "NATIVE_DEVICES", ())
    out = run(DSA(DSAParams(crop=0.25)), x, "crop", seed=2)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert torch.equal(out, native) and torch.equal(grad, native_grad)


# Backward nodes whose CUDA kernels accumulate with atomics (torch documents them as non-deterministic).
NONDETERMINISTIC_BACKWARDS = ("GridSampler", "Gather", "Scatter", "AdaptiveAvgPool", "IndexPut", "Put")


def backward_nodes(t):
    """Names of every autograd node under t.grad_fn."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack += [f for f, _ in node.next_functions]
    return names


@pytest.mark.parametrize("name", ALL + ("S",))
def test_explicit_backwards_are_deterministic_by_construction(name, explicit):
    x = images(n=8).requires_grad_()
    for seed in range(8 if name == "S" else 1):
        out = DSA()(x, seed) if name == "S" else run(DSA(), x, name, seed)
        names = backward_nodes(out)
        bad = [n for n in names if n.startswith(NONDETERMINISTIC_BACKWARDS)]
        assert names and not bad, f"{name}: {bad}"
        out.sum().backward()  # and stays differentiable
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("path", ["native", "explicit"])
def test_dsa_runs_at_full_precision_under_autocast(path, monkeypatch):
    # Under bf16 autocast the resampling matmuls would round the images; DSA opts out of it.
    if path == "explicit":
        monkeypatch.setattr(augment, "NATIVE_DEVICES", ())
    x = images(n=16)
    for name in ("crop", "scale", "rotate"):
        plain = run(DSA(), x, name, seed=5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(DSA(), x, name, seed=5)
        assert out.dtype == torch.float32 and torch.equal(out, plain)
