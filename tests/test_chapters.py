"""Each chapter under papermill: overridden parameters (another seed, a smaller size) reach its
metrics JSON; every figure is an inline image under the cell that makes it, once; no cell prints a
path or an object repr; and a wrong-typed, out-of-range or misspelt parameter fails in the first
cell, naming itself."""

import json
import re
from pathlib import Path

import nbformat
import papermill as pm
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# Per chapter: small overrides (another seed, fewer/shorter experts), a wrong-typed and an out-of-range value.
CHAPTERS = {
    "01_objective_transformation": dict(
        override={"seed": 1, "num_experts": 2, "expert_epochs": 6, "max_start_epoch": 3, "syn_steps": 5, "replays": 2},
        wrong_type=("num_experts", "two"), out_of_range=("ipc", 0)),
    "02_ntk_linearisation": dict(
        override={"seed": 1, "width": 8, "num_train": 60, "steps": 20, "num_experts": 2, "expert_epochs": 6,
                  "chord_points": 5},
        wrong_type=("width", "wide"), out_of_range=("steps", 0)),
    "03_convexified_trajectories": dict(
        override={"seed": 1, "num_experts": 2, "expert_epochs": 6, "max_start_epoch": 3.0, "num_samples": 500},
        wrong_type=("tau_step", "half"), out_of_range=("num_waypoints", 1)),
    "04_experiments": dict(
        override={"seed": 1, "ipcs": [1, 2], "num_seeds": 2, "iterations": 2, "eval_iterations": [1], "num_eval": 1,
                  "eval_epochs": 2, "random_subsets": 2, "full_data_epochs": 1, "num_experts": 2, "expert_epochs": 6,
                  "ablation_iterations": 1},
        wrong_type=("run_ablations", "yes"), out_of_range=("num_eval", 0)),
}


def _run(name: str, tmp_path: Path, parameters: dict):
    out_dir = tmp_path / "out"
    params = {"runs_dir": str(tmp_path / "runs"), "out_dir": str(out_dir), **parameters}
    pm.execute_notebook(NOTEBOOKS / f"{name}.ipynb", tmp_path / "executed.ipynb", parameters=params,
                        kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
    return json.loads((out_dir / "metrics.json").read_text())


# What a reader must never see in a cell's output: a path object, an absolute path, an object repr.
LEAKS = re.compile(r"PosixPath\(|WindowsPath\(|(?:^|[\s'\"(=])/(?:[\w.-]+/)+[\w.-]+|<[\w.]+ object at 0x")


def _shown_text(output) -> str:
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    data = output.get("data", {})
    if "image/png" in data:  # a figure's text/plain fallback is never shown
        return ""
    return "".join(data.get("text/markdown", data.get("text/plain", "")))


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_overridden_parameters_reach_the_metrics_and_every_figure_is_inline_once(name, tmp_path):
    spec = CHAPTERS[name]
    result = _run(name, tmp_path, spec["override"])
    for key, value in spec["override"].items():
        assert result["parameters"][key] == value, key
    assert result["metrics"], "the chapter wrote no metrics"
    assert "torch" in result["versions"]

    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    defined = [c for c in code if "figure" in c.metadata.get("mystnb", {})]
    assert defined, f"{name} defines no captioned figure"
    for cell in code:
        images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        if cell in defined:
            caption = cell.metadata["mystnb"]["figure"]
            assert caption.get("caption") and caption.get("name"), f"{name}: a figure without caption or name"
            assert len(images) == 1, f"{name}: figure {caption['name']} shown {len(images)} times inline"
        else:
            assert not images, f"{name}: an uncaptioned figure in cell {cell.source[:60]!r}"
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "execute_result" or "image/png" in output.get("data", {}) or \
                "text/markdown" in output.get("data", {}), f"{name}: a stray value {output['data']} in {cell.source[:60]!r}"
            leak = LEAKS.search(_shown_text(output))
            assert not leak, f"{name}: a cell prints {leak.group(0)!r}"


def _failing_cell(name: str, tmp_path: Path, key: str, value):
    with pytest.raises(pm.PapermillExecutionError) as err:
        _run(name, tmp_path, {key: value})
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    failed = next(i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    return err.value, failed, code


@pytest.mark.parametrize("name", sorted(CHAPTERS))
@pytest.mark.parametrize("kind", ["wrong_type", "out_of_range"])
def test_bad_parameters_fail_in_the_first_cell_naming_the_parameter(name, kind, tmp_path):
    key, value = CHAPTERS[name][kind]
    error, failed, code = _failing_cell(name, tmp_path, key, value)
    assert error.ename == "ParameterError" and key in error.evalue
    # The failing cell is the check cell right after the parameters (and papermill's injected) cells.
    params = max(i for i, c in enumerate(code) if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", [])))
    assert failed == params + 1


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_a_misspelt_parameter_fails_in_the_first_cell_listing_the_valid_names(name, tmp_path):
    error, failed, code = _failing_cell(name, tmp_path, "no_such_param", 3)
    assert error.ename == "ParameterError" and "no_such_param" in error.evalue and "seed" in error.evalue
    params = max(i for i, c in enumerate(code) if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", [])))
    assert failed == params + 1
