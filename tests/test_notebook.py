"""What every chapter's plumbing promises: parameters that compose per IPC, misspelt papermill names
refused with the valid ones listed, numbers printed where the prose states them, figures shown once."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from mctlib.notebook import Chapter, ParameterError, check_parameter_names, format_value, per_ipc  # noqa: E402


def test_per_ipc_takes_one_value_for_every_ipc_a_list_or_a_default_rule():
    assert per_ipc("num_seeds", 3, [1, 10], 1, 50) == {1: 3, 10: 3}
    assert per_ipc("num_seeds", [5, 2], [1, 10], 1, 50) == {1: 5, 10: 2}
    rule = lambda i: 5 if i == 0 else 2  # noqa: E731
    assert per_ipc("num_seeds", 0, [1, 10, 50], 1, 50, default=rule) == {1: 5, 10: 2, 50: 2}
    assert per_ipc("num_seeds", 0, [10], 1, 50, default=rule) == {10: 5}  # `-p ipcs 10` alone still runs
    with pytest.raises(ParameterError, match=r"needs one entry per IPC in ipcs = \[1\]"):
        per_ipc("num_seeds", [2, 1], [1], 1, 50)
    with pytest.raises(ParameterError, match=r"num_seeds\[1\] = 0 is out of range"):
        per_ipc("num_seeds", [2, 0], [1, 10], 1, 50)
    with pytest.raises(ParameterError, match=r"num_seeds\[0\] = 0 is out of range"):
        per_ipc("num_seeds", 0, [1], 1, 50)  # no default rule: 0 is just a value


def test_a_misspelt_injected_parameter_is_refused_listing_the_valid_names():
    history = ["import sys", "seed: int = 0\nipcs: list = [1]", "# Parameters\nseed = 1\nno_such_param = 3\n"]
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) \['no_such_param'\].*\['ipcs', 'seed'\]"):
        check_parameter_names(["seed", "ipcs"], history)
    check_parameter_names(["seed", "ipcs"], history[:2])  # nothing injected: nothing to check
    check_parameter_names(["seed", "ipcs", "no_such_param"], history)


def test_record_prints_and_keeps_the_number_and_figure_saves_without_returning_a_path(tmp_path, capsys):
    chapter = Chapter(tmp_path, {"seed": 0})
    assert chapter.record("storage_ratio", 3.99812) is None
    chapter.record("label", "within noise", show=False)
    assert capsys.readouterr().out == "storage_ratio = 3.998\n"
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert chapter.figure("line", fig) is None
    assert (tmp_path / "line.png").stat().st_size > 1000 and not plt.get_fignums()  # saved, and closed
    chapter.save()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == {"storage_ratio": 3.99812, "label": "within noise"} and saved["parameters"] == {"seed": 0}


def test_format_value():
    assert format_value(0.123456) == "0.1235" and format_value(77450) == "77450" and format_value(True) == "True"
    assert format_value(float("nan")) == "nan"
