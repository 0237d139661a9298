"""mctlib.check.reference, the original MTT loop the bench times the engine against: it must compute what
the engine computes (else the speed comparison compares different work), and its DSA must behave."""

import pytest
import torch

from mctlib.check import reference
from mctlib.matching import Student, match, plan_student
from mctlib.networks import FlatModel, NetConfig, build_network

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed=0):
    net = NetConfig(channels=1, image_size=8, width=8, depth=2)
    model = FlatModel(build_network(net, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    start = model.flatten()
    target = start + 0.05 * torch.randn(start.shape, generator=gen)
    images = torch.randn(20, 1, 8, 8, generator=gen)
    labels = torch.arange(10).repeat_interleave(2)
    return net, model, start, target, images, labels


@pytest.mark.parametrize("syn_steps", [1, 4])
def test_reference_iteration_equals_engine_unrolled_match(syn_steps):
    """Augmentation off and one full batch per step: the same loss and the same gradients."""
    net, model, start, target, images, labels = _setup()
    args = {"channel": 1, "num_classes": 10, "width": 8, "depth": 2, "im_size": 8}
    shapes = [p.shape for p in reference.ConvNet(**args).parameters()]
    assert shapes == list(model.shapes)  # the same parameter order, so expert vectors fit both

    ref_images = images.clone().requires_grad_(True)
    ref_lr = torch.tensor(0.1, requires_grad=True)
    opt_img = torch.optim.SGD([ref_images], lr=0.0)  # lr 0: keep the gradients, leave the images
    opt_lr = torch.optim.SGD([ref_lr], lr=0.0)
    trajectory = [reference.unflatten(start, shapes), reference.unflatten(target, shapes)]
    ref_loss = reference.iteration(args, ref_images, labels, ref_lr, trajectory, 0, 1, syn_steps, 20, opt_img, opt_lr,
                                   dsa=False)

    ours_images = images.clone().requires_grad_(True)
    ours_lr = torch.tensor(0.1, requires_grad=True)
    plan = plan_student(20, syn_steps, None, torch.Generator().manual_seed(1))
    result = match(Student(model, None), ours_images, labels, ours_lr, start, target, plan, "unrolled")

    assert result.loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(ours_images.grad, ref_images.grad, rtol=1e-4, atol=1e-6 * ref_images.grad.abs().max())
    torch.testing.assert_close(ours_lr.grad, ref_lr.grad, rtol=1e-4, atol=0.0)


def test_reparam_module_is_the_network_at_the_given_vector():
    args = {"channel": 1, "num_classes": 10, "width": 8, "depth": 2, "im_size": 8}
    torch.manual_seed(0)
    plain = reference.ConvNet(**args)
    flat = torch.cat([p.detach().reshape(-1) for p in plain.parameters()])
    wrapped = reference.ReparamModule(reference.ConvNet(**args))  # other random weights
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(wrapped(x, flat_param=flat), plain(x))
    assert [n for n, _ in wrapped.named_parameters()] == ["flat_param"]


@pytest.mark.parametrize("policy", sorted(reference.AUGMENT_FNS))
def test_each_dsa_transform_keeps_shape_is_differentiable_and_seedable(policy):
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    out = reference.diff_augment(x, policy, seed=-1)
    assert out.shape == x.shape
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    a = reference.diff_augment(x, policy, seed=7)
    b = reference.diff_augment(x, policy, seed=7)
    torch.testing.assert_close(a, b)  # a seed fixes the draw
    same = x.detach()[:1].repeat(6, 1, 1, 1)
    out = reference.diff_augment(same, policy, seed=3)
    torch.testing.assert_close(out, out[:1].expand_as(out))  # seeded draws are shared by the batch ("Siamese")


def test_dsa_flip_and_cutout_by_hand():
    param = reference.ParamDiffAug()
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    param.prob_flip = 1.0  # always flip
    torch.testing.assert_close(reference.rand_flip(x, param), x.flip(3))
    param.prob_flip = 0.0
    torch.testing.assert_close(reference.rand_flip(x, param), x)
    out = reference.rand_cutout(torch.ones(4, 1, 8, 8), param)  # a 4x4 hole (ratio 0.5), clipped at the border
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert ((zeros >= 4) & (zeros <= 16)).all()
