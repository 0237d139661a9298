"""Tests for mctlib.networks: architectures, seeded initialisation, and the flat-vector model."""

import dataclasses

import pytest
import torch

from mctlib import networks
from mctlib.networks import ARCHS, FlatModel, NetConfig, build_network, count_parameters

CIFAR10 = NetConfig(arch="convnet", channels=3, num_classes=10, image_size=32, width=128, depth=3)


def _x(cfg, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g)


# --- architectures -----------------------------------------------------------------------------

def test_cifar10_convnet_has_320010_parameters():
    assert count_parameters(build_network(CIFAR10, seed=0)) == 320_010


def test_convnet_d4_tiny_imagenet_builds_and_runs():
    cfg = NetConfig(arch="convnet_d4", channels=3, num_classes=200, image_size=64)
    assert cfg.depth == 4
    net = build_network(cfg, seed=0)
    assert net(_x(cfg, batch=2)).shape == (2, 200)
    # 4 conv blocks: 64 → 4 px before the classifier
    assert net.classifier.in_features == 128 * 4 * 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels,size", [(1, 16), (3, 32)])
def test_every_arch_forward_shape(arch, channels, size):
    cfg = NetConfig(arch=arch, channels=channels, image_size=size, num_classes=7)
    net = build_network(cfg, seed=0)
    assert net(_x(cfg, batch=3)).shape == (3, 7)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "alexnet"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 64)])
def test_cross_arch_other_sizes(arch, channels, size):
    cfg = NetConfig(arch=arch, channels=channels, image_size=size)
    assert build_network(cfg, seed=0)(_x(cfg, batch=2)).shape == (2, 10)


def test_mnist_padding_matches_original_shapes():
    # 1×28×28 is padded to enter as 32×32, exactly as the original ConvNet
    cfg = NetConfig(channels=1, image_size=28)
    net = build_network(cfg, seed=0)
    assert net.features[0].padding == (3, 3)
    assert net.classifier.in_features == 128 * 4 * 4
    assert build_network(NetConfig(channels=1, image_size=16)).features[0].padding == (1, 1)


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "none"])
@pytest.mark.parametrize("activation", ["relu", "leakyrelu", "sigmoid"])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool", "none"])
def test_convnet_variants_run(norm, activation, pooling):
    cfg = NetConfig(norm=norm, activation=activation, pooling=pooling, width=8, depth=2)
    out = build_network(cfg, seed=0)(_x(cfg, batch=2))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_norm_layers_are_what_they_say():
    gn = build_network(NetConfig(width=16), seed=0).features[1]
    assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == 16 and gn.affine
    assert isinstance(build_network(NetConfig(norm="batchnorm")).features[1], torch.nn.BatchNorm2d)
    assert isinstance(build_network(NetConfig(arch="resnet18", norm="batchnorm")).bn1, torch.nn.BatchNorm2d)


# --- seeding -----------------------------------------------------------------------------------

def test_seeded_build_is_bit_identical_and_leaves_global_rng_alone():
    cfg = NetConfig(width=16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = build_network(cfg, seed=3), build_network(cfg, seed=3)
    c = build_network(cfg, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (nb, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    fa, fc = FlatModel(a).flatten(), FlatModel(c).flatten()
    assert not torch.equal(fa, fc)


# --- FlatModel ---------------------------------------------------------------------------------

@pytest.fixture
def small():
    cfg = NetConfig(channels=3, image_size=16, width=16, depth=2)
    net = build_network(cfg, seed=1)
    return cfg, net, FlatModel(net)


def test_flat_layout(small):
    _, net, model = small
    assert model.numel == count_parameters(net)
    assert model.names == tuple(n for n, _ in net.named_parameters())
    assert len(model.layer_slices) == len(model.names)
    assert model.layer_slices[0].start == 0 and model.layer_slices[-1].stop == model.numel
    flat = model.flatten(net)
    for sl, (_, p) in zip(model.layer_slices, net.named_parameters()):
        assert torch.equal(flat[sl], p.detach().reshape(-1))
    assert not flat.requires_grad


@pytest.mark.parametrize("train", [False, True])
def test_flat_forward_equals_module_exactly(small, train):
    cfg, net, model = small
    net.train(train)
    model.train(train)
    x = _x(cfg)
    assert torch.equal(model(model.flatten(net), x), net(x))


def test_unflatten_returns_views(small):
    _, net, model = small
    flat = model.flatten(net)
    parts = model.unflatten(flat)
    for n, s in zip(model.names, model.shapes):
        assert parts[n].shape == s
        assert parts[n].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    flat[0] = 42.0
    assert parts[model.names[0]].reshape(-1)[0].item() == 42.0


def test_gradients_match_module(small):
    cfg, net, model = small
    x, y = _x(cfg), torch.tensor([0, 1, 2, 3])
    x1 = x.clone().requires_grad_()
    torch.nn.functional.cross_entropy(net(x1), y).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in net.parameters()])

    flat = model.flatten(net).requires_grad_()
    x2 = x.clone().requires_grad_()
    gflat, gx = torch.autograd.grad(torch.nn.functional.cross_entropy(model(flat, x2), y), (flat, x2))
    torch.testing.assert_close(gflat, ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(gx, x1.grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_vmap_ensemble_equals_separate_calls(arch):
    # small images keep the 11M-parameter ResNet18 cheap
    cfg = NetConfig(arch=arch, channels=3, image_size=16 if arch.startswith("convnet") else 8, width=16)
    model = FlatModel(build_network(cfg, seed=0))
    assert model.supports_vmap
    P = torch.stack([FlatModel(build_network(cfg, seed=s)).flatten() for s in range(3)])
    X = torch.stack([_x(cfg, batch=2, seed=s) for s in range(3)])
    out = torch.func.vmap(model, in_dims=(0, 0))(P, X)
    for m in range(3):
        torch.testing.assert_close(out[m], model(P[m], X[m]), rtol=0, atol=1e-5)


def test_vmap_grad_over_ensemble(small):
    # the ensemble-training use: per-network gradients in one call
    cfg, _, model = small
    P = torch.stack([FlatModel(build_network(cfg, seed=s)).flatten() for s in range(2)])
    X = torch.stack([_x(cfg, seed=s) for s in range(2)])
    y = torch.tensor([0, 1, 2, 3])

    def loss(p, x):
        return torch.nn.functional.cross_entropy(model(p, x), y)

    G = torch.func.vmap(torch.func.grad(loss))(P, X)
    for m in range(2):
        torch.testing.assert_close(G[m], torch.func.grad(loss)(P[m], X[m]), rtol=1e-5, atol=1e-6)


def test_batchnorm_flat_model():
    cfg = NetConfig(channels=3, image_size=16, width=8, depth=2, norm="batchnorm")
    net = build_network(cfg, seed=0)
    model = FlatModel(net)
    assert not model.supports_vmap
    x = _x(cfg)
    net.train(); model.train()
    assert torch.equal(model(model.flatten(net), x), net(x))
    # running statistics moved on both sides, identically
    bn_name = "features.1.running_mean"
    torch.testing.assert_close(dict(model.module.named_buffers())[bn_name], dict(net.named_buffers())[bn_name])
    net.eval(); model.eval()
    assert torch.equal(model(model.flatten(net), x), net(x))


def test_load_into_round_trip(small):
    cfg, net, model = small
    other = build_network(cfg, seed=99)
    model.load_into(model.flatten(net), other)
    assert torch.equal(model.flatten(other), model.flatten(net))
    with pytest.raises(ValueError, match="shape"):
        model.unflatten(torch.zeros(model.numel + 1))
    with pytest.raises(ValueError, match="do not match"):
        model.load_into(model.flatten(net), build_network(NetConfig(width=4), seed=0))


def test_flat_model_owns_its_template(small):
    _, net, model = small
    before = model.flatten()
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert torch.equal(model.flatten(), before)
    assert model.to("cpu") is model


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("arch", "resnet50"), ("norm", "layernorm"),
                                         ("activation", "gelu"), ("pooling", "stride")])
def test_config_rejects_unknown_choices(field, value):
    with pytest.raises(ValueError, match=rf"NetConfig\.{field}=.*not one of"):
        NetConfig(**{field: value})


@pytest.mark.parametrize("field", ["channels", "num_classes", "image_size", "width", "depth"])
def test_config_rejects_non_positive_ints(field):
    with pytest.raises(ValueError, match=rf"NetConfig\.{field}=0 must be a positive integer"):
        NetConfig(**{field: 0})
    with pytest.raises(ValueError, match=rf"NetConfig\.{field}"):
        NetConfig(**{field: 2.0})


def test_config_depth_too_deep_for_image():
    with pytest.raises(ValueError, match=r"NetConfig\.depth=5.*image_size // 2\*\*depth >= 1"):
        NetConfig(image_size=16, depth=5)
    NetConfig(image_size=16, depth=4)
    NetConfig(image_size=16, depth=6, pooling="none")
    with pytest.raises(ValueError, match=r"NetConfig\.depth"):
        NetConfig(arch="convnet_d4", depth=5)
    with pytest.raises(ValueError, match=r"NetConfig\.image_size"):
        NetConfig(arch="alexnet", image_size=4)


def test_config_dict_round_trip():
    cfg = NetConfig(arch="convnet_d4", channels=3, num_classes=200, image_size=64, norm="batchnorm")
    d = cfg.to_dict()
    assert d["depth"] == 4
    assert NetConfig.from_dict(d) == cfg
    assert NetConfig.from_dict({}) == NetConfig()
    with pytest.raises(ValueError, match="net_width"):
        NetConfig.from_dict({**d, "net_width": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.width = 3


# ---------------------------------------------------------------------------------------------
# AvgPool2x2: the ConvNet's pooling, a matmul form on CPU; checked against torch's own kernel

@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 5, 16, 6), (1, 1, 2, 2)])
def test_avgpool2x2_matches_torch_forward_and_backward(shape):
    from mctlib.networks import AvgPool2x2

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ours, ref = AvgPool2x2()(x), torch.nn.functional.avg_pool2d(x, 2, 2)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(ours, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    # the matching loss differentiates through student gradients: first and second order by finite differences
    assert torch.autograd.gradcheck(AvgPool2x2(), (x,))
    assert torch.autograd.gradgradcheck(AvgPool2x2(), (x,))


def test_avgpool2x2_hand_computed_and_odd_sizes():
    from mctlib.networks import AvgPool2x2

    x = torch.arange(16.0).view(1, 1, 4, 4)
    expected = torch.tensor([[[[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4],
                               [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]]]])
    assert torch.equal(AvgPool2x2()(x), expected)
    odd = torch.randn(2, 3, 7, 5)  # odd sizes drop the last row/column, as nn.AvgPool2d(2, 2) does
    torch.testing.assert_close(AvgPool2x2()(odd), torch.nn.functional.avg_pool2d(odd, 2, 2))


def test_avgpool2x2_under_torch_func_transforms():
    from torch.func import jacrev, jvp, vmap

    from mctlib.networks import AvgPool2x2

    pool, ref = AvgPool2x2(), lambda t: torch.nn.functional.avg_pool2d(t, 2, 2)
    x, v = torch.randn(4, 2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(vmap(pool)(x), torch.stack([ref(t) for t in x]))
    _, tangent = jvp(pool, (x[0],), (v,))
    torch.testing.assert_close(tangent, ref(v))  # linear: the jvp is the pooled direction
    torch.testing.assert_close(jacrev(pool)(x[0][:1]), jacrev(ref)(x[0][:1]))


def test_avgpool2x2_keeps_torchs_behaviour_where_it_falls_back():
    from mctlib.networks import AvgPool2x2

    x = torch.randn(2, 3, 8, 8)
    channels_last = x.clone(memory_format=torch.channels_last)
    out = AvgPool2x2()(channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout survives, as with torch's
    torch.testing.assert_close(out, torch.nn.functional.avg_pool2d(x, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert AvgPool2x2()(x).dtype == torch.float32  # no bf16 matmul under autocast


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_global_pool_off_the_cpu_is_a_mean_with_a_deterministic_backward(arch, monkeypatch):
    # CUDA's adaptive average pooling backward uses atomics; off the CPU the pool is a mean (issue 12).
    # Run that formulation on the CPU and compare it, values and gradients, with torch's kernel.
    cfg = NetConfig(arch=arch, channels=3, num_classes=10, image_size=16, norm="instancenorm")
    net = build_network(cfg, seed=0).double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    native = net(x)
    (native_grad,) = torch.autograd.grad(native.square().sum(), x)
    monkeypatch.setattr(networks, "NATIVE_POOL_DEVICES", ())
    out = net(x)
    nodes, stack, seen = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            nodes.append(type(node).__name__)
            stack += [f for f, _ in node.next_functions]
    assert "MeanBackward1" in nodes and not any(n.startswith("AdaptiveAvgPool") for n in nodes)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, native, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, native_grad, atol=1e-12, rtol=0)
