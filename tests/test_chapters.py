"""Each chapter under papermill: overridden parameters (another seed, a smaller size) reach its
metrics JSON, and a wrong-typed or out-of-range parameter fails in the first cell, naming itself."""

import json
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
        override={"seed": 1, "ipcs": [1], "num_seeds": 1, "iterations": 3, "eval_every": 3, "num_eval": 1,
                  "eval_epochs": 3, "full_data_epochs": 1, "num_experts": 2, "expert_epochs": 6,
                  "run_ablations": False},
        wrong_type=("run_ablations", "yes"), out_of_range=("num_eval", 0)),
}


def _run(name: str, tmp_path: Path, parameters: dict):
    out_dir = tmp_path / "out"
    params = {"runs_dir": str(tmp_path / "runs"), "out_dir": str(out_dir), **parameters}
    pm.execute_notebook(NOTEBOOKS / f"{name}.ipynb", tmp_path / "executed.ipynb", parameters=params,
                        kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
    return json.loads((out_dir / "metrics.json").read_text())


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_overridden_parameters_reach_the_metrics(name, tmp_path):
    spec = CHAPTERS[name]
    result = _run(name, tmp_path, spec["override"])
    for key, value in spec["override"].items():
        assert result["parameters"][key] == value, key
    assert result["metrics"], "the chapter wrote no metrics"
    assert "torch" in result["versions"]


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
