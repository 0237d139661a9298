"""Configs validate themselves, name the bad field, and every preset is valid and faithful to METHOD.md."""

import json

import pytest

from mctlib.config import DataConfig, DistillConfig, EvalConfig, ExpertConfig, get_preset, presets


def test_every_preset_is_valid_and_round_trips_through_json():
    for name, p in presets().items():
        for cfg in (p.data, p.expert, p.distill, p.eval):
            again = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
            assert again == cfg, name


def test_published_settings_match_method_md():
    # syn_steps / expert_epochs / max_start / lr_img / lr_lr / lr_teacher as listed in METHOD.md
    d = get_preset("mtt-cifar10-ipc1").distill
    assert (d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr, d.lr_teacher) == (50, 2, 2, 100, 1e-7, 0.01)
    assert get_preset("mtt-cifar10-ipc1").data.zca
    d = get_preset("mtt-cifar100-ipc50").distill
    assert (d.syn_steps, d.batch_syn) == (80, 125)
    p = get_preset("mtt-tinyimagenet-ipc50")
    assert p.net.arch == "convnet_d4" and p.distill.batch_syn == 300 and p.distill.lr_img == 1e4
    d = get_preset("mct-cifar10-ipc10").distill
    assert (d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr) == (30, 15, 8, 1e3, 1e-5)
    assert d.method == "mct" and d.resolved_sampling == "continuous"
    assert get_preset("mct-cifar10-ipc10").expert.record == "convex"
    assert get_preset("mtt-cifar10-ipc10").distill.resolved_sampling == "integer"
    assert len([n for n in presets() if n.startswith("mtt-") and "digits" not in n and "fashion" not in n]) == 9


def test_fashion_mnist_presets_follow_the_standard_protocol_and_the_cpu_setting_says_how_it_departs():
    # The published Fashion-MNIST tables (DC, DSA): ConvNet width 128, depth 3, instance norm, 28x28.
    for method in ("mtt", "mct"):
        for ipc in (1, 10, 50):
            p = get_preset(f"{method}-fashionmnist-ipc{ipc}")
            assert (p.net.width, p.net.depth, p.net.norm, p.net.image_size, p.net.channels) == (128, 3, "instancenorm", 28, 1)
            assert p.data.image_size is None and p.data.train_per_class is None and not p.data.zca
            assert (p.expert.num_experts, p.expert.epochs, p.eval.num_eval, p.eval.epochs) == (100, 50, 5, 1000)
            cpu = get_preset(f"{method}-fashionmnist-cpu-ipc{ipc}")
            assert (cpu.net.width, cpu.net.image_size, cpu.data.image_size, cpu.data.train_per_class) == (64, 16, 16, 1000)
            # one waypoint every 17 epochs: the paper's spacing (K = 4 on 50 epochs)
            assert (cpu.expert.epochs, cpu.expert.num_waypoints, cpu.expert.batch_size) == (17, 2, 64)
            assert "16x16" in cpu.note and "width 128" in cpu.note
    assert get_preset("mct-fashionmnist-ipc10").distill.expert_epochs == 15  # the MCT CIFAR-10 command


@pytest.mark.parametrize("cls, field, value, words", [
    (DistillConfig, "syn_steps", 0, "syn_steps"),
    (DistillConfig, "gradient_mode", "fast", "unrolled"),
    (DistillConfig, "lr_img", float("nan"), "lr_img"),
    (DistillConfig, "ipc", "10", "expected int"),
    (DistillConfig, "ipc", True, "expected int"),
    (ExpertConfig, "num_waypoints", 99, "num_waypoints"),
    (ExpertConfig, "beta_schedule", "cosine", "arc_length"),
    (EvalConfig, "archs", ("convnet", "transformer"), "resnet18"),
    (DataConfig, "name", "imagenet", "digits"),
])
def test_invalid_values_name_the_field_and_the_allowed_range(cls, field, value, words):
    with pytest.raises(ValueError) as err:
        cls(**{field: value})
    assert field in str(err.value) and words in str(err.value)


def test_mtt_cannot_use_continuous_sampling():
    with pytest.raises(ValueError, match="convexified"):
        DistillConfig(method="mtt", sampling="continuous")


def test_unknown_fields_and_presets_are_refused():
    with pytest.raises(ValueError, match="no field"):
        DistillConfig.from_dict({"synsteps": 3})
    with pytest.raises(ValueError, match="mct-digits-ipc1"):
        get_preset("mct-digits-ipc2")


def test_integer_floats_are_accepted_where_floats_belong():
    assert DistillConfig(expert_epochs=2).expert_epochs == 2.0
