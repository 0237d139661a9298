"""The command line end to end on digits: experts -> convexify -> distill (both methods, all gradient
modes) -> evaluate, plus the refusals that must happen before any work starts."""

import json

import pytest
import torch

from mctlib.cli import main, make_parser
from mctlib.config import FLOAT32_MAX, DataConfig, DistillConfig, EvalConfig, ExpertConfig, LimitError

TINY_NET = ["--dataset", "digits", "--data-image-size", "8", "--net-width", "16", "--net-depth", "2"]


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "full"
    assert main(["experts", "--out", str(out), "--num-experts", "2", "--epochs", "5", "--record", "full",
                 "--batch-size", "128", "--no-progress", "--device", "cpu", *TINY_NET[:4], "--net-width", "16",
                 "--net-depth", "2"]) == 0
    return out


def test_every_command_has_help(capsys):
    for command in ("experts", "convexify", "distill", "evaluate"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "--out" in capsys.readouterr().out


def test_invalid_values_are_refused_naming_the_flag(capsys, tmp_path):
    cases = [
        (["distill", "--store", "x", "--out", str(tmp_path / "r"), "--syn-steps", "0"], "--syn-steps"),
        (["distill", "--store", "x", "--out", str(tmp_path / "r"), "--gradient-mode", "fast"], "--gradient-mode"),
        (["distill", "--store", "x", "--out", str(tmp_path / "r"), "--eval-epochs", "-3"], "--eval-epochs"),
        (["distill", "--store", "x", "--out", str(tmp_path / "r"), "--preset", "nope"], "mct-digits-ipc1"),
        (["experts", "--out", str(tmp_path / "e"), "--dataset", "imagenet"], "--dataset"),
        (["experts", "--out", str(tmp_path / "e"), "--num-waypoints", "1"], "--num-waypoints"),
        (["distill", "--store", "x", "--out", str(tmp_path / "r"), "--ipc", "ten"], "--ipc"),
        (["distill", "--store", "x", "--out", str(tmp_path / "r"), "--precision", "fp16"], "--precision"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_pipeline_end_to_end(full_store, tmp_path, capsys):
    convex = tmp_path / "k2"
    assert main(["convexify", "--store", str(full_store), "--out", str(convex), "--num-waypoints", "2",
                 "--no-store-theta0"]) == 0
    assert "smaller" in capsys.readouterr().out
    common = ["--no-progress", "--device", "cpu", "--dataset", "digits", "--data-image-size", "8", "--ipc", "1",
              "--syn-steps", "3", "--expert-epochs", "2", "--max-start-epoch", "2", "--lr-lr", "1e-7",
              "--iterations", "3", "--eval-every", "3", "--eval-num-eval", "2", "--eval-epochs", "3"]
    runs = {}
    for method, store in (("mtt", full_store), ("mct", convex)):
        for mode in ("unrolled", "checkpointed", "constant_memory"):
            out = tmp_path / f"{method}-{mode}"
            assert main(["distill", "--store", str(store), "--out", str(out), "--method", method,
                         "--gradient-mode", mode, *common]) == 0
            runs[method, mode] = out
            metrics = json.loads((out / "metrics.json").read_text())
            assert metrics["iteration"] == 3 and metrics["final"]["iteration"] == 3
    # The two exact modes agree; the whole pipeline is seeded, so unrolled == checkpointed up to float error.
    from mctlib.distill import load_synthetic

    a = load_synthetic(runs["mct", "unrolled"] / "synthetic_final.safetensors")[0]
    b = load_synthetic(runs["mct", "checkpointed"] / "synthetic_final.safetensors")[0]
    assert torch.allclose(a, b, atol=1e-4)

    evaluated = tmp_path / "eval"
    assert main(["evaluate", "--synthetic", str(runs["mct", "unrolled"] / "synthetic_best.safetensors"),
                 "--out", str(evaluated), "--num-eval", "2", "--epochs", "3", "--no-progress", "--device", "cpu"]) == 0
    result = json.loads((evaluated / "metrics.json").read_text())
    assert len(result["results"][0]["accuracies"]) == 2
    assert result["compute"] == {"device": "cpu", "precision": "fp32"} and result["versions"]["gpu"] is None
    assert json.loads((runs["mct", "unrolled"] / "config.json").read_text())["compute"]["device"] == "cpu"
    assert result["config"]["net"]["width"] == 16  # the network the set was distilled with, from its config.json
    with pytest.raises(SystemExit):  # network flags beside a run's config are ambiguous: refused
        main(["evaluate", "--synthetic", str(runs["mct", "unrolled"] / "synthetic_best.safetensors"),
              "--out", str(tmp_path / "e2"), "--device", "cpu", "--net-width", "32"])
    assert main(["evaluate", "--baseline", "random_real", "--ipc", "1", "--out", str(tmp_path / "rr"),
                 "--num-eval", "2", "--epochs", "3", "--device", "cpu", *TINY_NET]) == 0
    # A second run into the same folder is refused instead of overwriting it.
    with pytest.raises(SystemExit):
        main(["distill", "--store", str(convex), "--out", str(runs["mct", "unrolled"]), *common])
    assert "--resume" in capsys.readouterr().err


def test_foreign_store_is_refused(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SystemExit):
        main(["distill", "--store", str(tmp_path), "--out", str(tmp_path / "r"), "--no-progress"])
    assert "not an mctlib trajectory manifest" in capsys.readouterr().err


def test_config_file_and_flags_layer_over_presets(tmp_path):
    from mctlib.cli import build_configs

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"distill": {"syn_steps": 7, "ipc": 3}}))
    parser = make_parser()
    args = parser.parse_args(["distill", "--store", "s", "--out", "o", "--preset", "mtt-cifar10-ipc10",
                              "--config", str(cfg_file), "--ipc", "5"])
    configs = build_configs(args, ["distill", "eval", "data"], "distill", parser)
    assert configs["distill"].syn_steps == 7          # from the file
    assert configs["distill"].ipc == 5                # the flag wins
    assert configs["distill"].max_start_epoch == 20   # from the preset
    assert configs["data"].zca is True


def test_check_receives_its_own_flags(capsys):
    """`mctlib check --help` reaches the acceptance check's parser (not the top-level one)."""
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--help"])
    assert exit_.value.code == 0
    assert "--no-timings" in capsys.readouterr().out


def test_work_commands_configure_threads_first(monkeypatch, tmp_path):
    import mctlib.cli

    calls = []
    monkeypatch.setattr(mctlib.cli, "configure_threads", lambda *a, **k: calls.append(a) or {})
    assert main(["convexify", "--store", str(tmp_path / "missing"), "--out", str(tmp_path / "k")]) == 1
    assert calls == [()]
    main(["presets"])  # listing presets does no work and leaves torch alone
    assert calls == [()]


@pytest.mark.parametrize("cores, given, expected", [(2, None, "PASSIVE"), (1, None, "PASSIVE"),
                                                    (16, None, None), (2, "ACTIVE", "ACTIVE")])
def test_command_line_lets_openmp_sleep_on_small_machines(cores, given, expected):
    """`python -m mctlib` sets OMP_WAIT_POLICY=PASSIVE before torch loads on <= 2 cores, never over the user's."""
    import os
    import subprocess
    import sys

    code = ("import os, runpy, sys\n"
            f"os.cpu_count = lambda: {cores}\n"
            f"os.sched_getaffinity = lambda pid: set(range({cores}))\n"
            "sys.argv = ['mctlib', 'presets']\n"
            "try:\n    runpy.run_module('mctlib', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('POLICY', os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert f"POLICY {expected}" in out.splitlines()


def test_library_errors_become_one_line_messages(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["convexify", "--store", str(missing), "--out", str(tmp_path / "k")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mctlib convexify: error: ") and "not a trajectory store" in err
    assert "Traceback" not in err and not (tmp_path / "k").exists()


def test_bad_thread_variable_is_a_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MCTLIB_THREADS", "two")
    with pytest.raises(SystemExit) as exit_:
        main(["convexify", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "k")])
    assert exit_.value.code == 2 and "MCTLIB_THREADS='two'" in capsys.readouterr().err


def test_the_distill_path_checks_each_thing_once(full_store, tmp_path, monkeypatch):
    """The store is loaded and matched to the data once, the run folder's contents checked once, and the
    --config file read once (before: twice each)."""
    import mctlib.cli
    import mctlib.distill
    import mctlib.rundir
    import mctlib.storage

    calls = {"load_store": 0, "check_match": 0, "folder_kind": 0, "config": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    load_store = counted("load_store", mctlib.storage.load_store)
    for module in (mctlib.storage, mctlib.cli):  # the CLI holds its own name for it
        monkeypatch.setattr(module, "load_store", load_store)
    monkeypatch.setattr(mctlib.distill, "check_match", counted("check_match", mctlib.storage.check_match))
    monkeypatch.setattr(mctlib.rundir, "folder_kind", counted("folder_kind", mctlib.rundir.folder_kind))
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"distill": {"syn_steps": 2}}))
    real_read = type(config).read_text
    monkeypatch.setattr(type(config), "read_text",
                        lambda self, *a, **k: (calls.__setitem__("config", calls["config"] + (self == config)),
                                               real_read(self, *a, **k))[1])
    assert main(["distill", "--store", str(full_store), "--out", str(tmp_path / "run"), "--config", str(config),
                 "--method", "mtt", "--no-progress", "--device", "cpu", "--dataset", "digits", "--data-image-size",
                 "8", "--ipc", "1", "--expert-epochs", "2", "--max-start-epoch", "2", "--iterations", "1",
                 "--eval-every", "0"]) == 0
    assert calls == {"load_store": 1, "check_match": 1, "folder_kind": 1, "config": 1}


@pytest.mark.parametrize("make, words", [
    (lambda: DistillConfig(lr_img=1e300), "DistillConfig.lr_img = 1e+300 is beyond what float32 holds"),
    (lambda: ExpertConfig(seed=-1), "ExpertConfig.seed = -1 must be a non-negative integer below 2**63"),
    (lambda: DataConfig(image_size=2000), "DataConfig.image_size = 2000 is larger than mctlib resizes images to"),
    (lambda: EvalConfig(epochs=2 ** 63), f"EvalConfig.epochs = {2 ** 63} is beyond what a 64-bit integer holds"),
])
def test_the_configs_refuse_what_the_engine_cannot_take_without_the_command_line(make, words):
    """The limits the command line reports with a flag (`--lr-img 1e+300 ...`) are the configs' own: a config
    built in Python is refused with the same words, naming its field."""
    with pytest.raises(LimitError) as err:
        make()
    assert str(err.value).startswith(words)
    assert FLOAT32_MAX == torch.finfo(torch.float32).max  # the float limit is float32's own
