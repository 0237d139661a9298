"""What every chapter promises a reader who changes its parameters or reads its outputs, checked
without executing the chapters again (the book build executes each one once):

- a wrong-typed, out-of-range or misspelt papermill parameter fails in the check cell right after
  the parameters, naming itself; overridden parameters reach metrics.json. Checked by running only
  the parameters cell, papermill's own injected cell and the check cell in one in-process IPython;
- every figure is an inline image under the cell that makes it, once, with a caption; no cell prints
  a path, an object repr or a stray value. Checked on the committed notebooks and on the notebooks
  the book build executed (`--executed-chapters`, which `make test` passes after its build);
- the chapter with the most parameter plumbing (chapter 4: per-IPC lists, workers, ablations) runs
  end to end under papermill at its smallest size, on one worker.

Per chapter, one dict below holds the parameter names these tests use.
"""

import json
import re
import sys
import types
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from IPython.core.interactiveshell import InteractiveShell
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook
from traitlets.config import Config

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# Per chapter: overrides that the check cell accepts (another seed, a smaller size), a wrong-typed and an
# out-of-range value; `papermill`: the smallest end-to-end run (one worker) where the chapter is run at all.
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
        override={"seed": 1, "dataset": "digits", "ipcs": [1, 2], "num_seeds": 2, "iterations": 2,
                  "eval_iterations": [1], "num_eval": 1, "eval_epochs": 2, "random_subsets": 2, "full_data_epochs": 1,
                  "num_experts": 2, "expert_epochs": 6, "equivalence_margin": 0.5, "sampling_seeds": 2,
                  "ablation_iterations": 1, "workers": 1},
        wrong_type=("run_ablations", "yes"), out_of_range=("num_eval", 0),
        # Two IPCs and two seeds keep the per-IPC lists, the paired statistics and every figure in play;
        # one worker: spawned workers re-import torch (116 s against 50 s with one).
        # Digits: the chapter's Fashion-MNIST setting is what the book build executes.
        papermill={"seed": 1, "dataset": "digits", "ipcs": [1, 2], "num_seeds": 2, "iterations": 2,
                   "eval_iterations": [1], "num_eval": 1, "eval_epochs": 1, "random_subsets": 2, "full_data_epochs": 1,
                   "num_experts": 2, "expert_epochs": 3, "syn_steps": 2, "sampling_seeds": 2,
                   "ablation_iterations": 1, "workers": 1}),
}
PAPERMILL = sorted(name for name, spec in CHAPTERS.items() if "papermill" in spec)


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _tagged(cell, *tags) -> bool:
    return bool(set(tags) & set(cell.metadata.get("tags", [])))


# --- the parameters and check cells, in one in-process IPython ------------------------------------------

@pytest.fixture(scope="module")
def shell():
    """An in-process IPython (what a kernel runs cells in): real input history, which the check cell reads
    to find papermill's injected names, and no kernel to start."""
    saved = sys.modules["__main__"], sys.displayhook, sys.excepthook
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    # Its own module, not __main__: multiprocessing's spawn (parallel runs, later tests) reads __main__.__spec__.
    shell = InteractiveShell.instance(config=config, user_module=types.ModuleType("chapter_cells"))
    yield shell
    InteractiveShell.clear_instance()
    sys.modules.pop("chapter_cells", None)
    sys.modules["__main__"], sys.displayhook, sys.excepthook = saved


def _run_first_cells(shell, name: str, tmp_path: Path, parameters: dict, monkeypatch):
    """Papermill's injection of `parameters` (as `papermill -p` does it), then the chapter's code cells
    up to the check cell after the injected one, in a fresh namespace. Returns (index of the first cell
    that failed or None, its error, index of the injected cell)."""
    monkeypatch.setenv("MCTLIB_THREADS", "1")  # the check cell sets torch's threads for this process
    nb = load_notebook_node(str(NOTEBOOKS / f"{name}.ipynb"))  # as papermill reads it
    params = {"runs_dir": str(tmp_path / "runs"), "out_dir": str(tmp_path / "out"), **parameters}
    code = _code_cells(parameterize_notebook(nb, params, kernel_name="python3", language="python"))
    injected = next(i for i, c in enumerate(code) if _tagged(c, "injected-parameters"))
    assert _tagged(code[injected - 1], "parameters"), f"{name}: papermill injected away from the parameters cell"
    shell.reset(new_session=True)
    for i, cell in enumerate(code[:injected + 2]):
        result = shell.run_cell(cell.source, store_history=True)
        if not result.success:
            return i, result.error_in_exec or result.error_before_exec, injected
    return None, None, injected


@pytest.mark.parametrize("name", sorted(CHAPTERS))
@pytest.mark.parametrize("kind", ["wrong_type", "out_of_range"])
def test_bad_parameters_fail_in_the_check_cell_naming_the_parameter(shell, name, kind, tmp_path, monkeypatch):
    key, value = CHAPTERS[name][kind]
    failed, error, injected = _run_first_cells(shell, name, tmp_path, {key: value}, monkeypatch)
    assert error is not None, f"{name}: {key} = {value!r} passed the check cell"
    assert type(error).__name__ == "ParameterError" and f"parameter {key} = {value!r}" in str(error), error
    assert failed == injected + 1, f"{name}: failed in code cell {failed}, not the check cell {injected + 1}"


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_a_misspelt_parameter_fails_in_the_check_cell_listing_the_valid_names(shell, name, tmp_path, monkeypatch):
    failed, error, injected = _run_first_cells(shell, name, tmp_path, {"no_such_param": 3}, monkeypatch)
    assert error is not None, f"{name}: the misspelt no_such_param passed the check cell"
    assert type(error).__name__ == "ParameterError", error
    assert "['no_such_param']" in str(error) and "'seed'" in str(error), error
    assert failed == injected + 1, f"{name}: failed in code cell {failed}, not the check cell {injected + 1}"


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_overridden_parameters_reach_the_metrics(shell, name, tmp_path, monkeypatch):
    override = CHAPTERS[name]["override"]
    failed, error, _ = _run_first_cells(shell, name, tmp_path, override, monkeypatch)
    assert failed is None, f"{name}: the check cell refused {override}: {error}"
    # The chapter's last cell writes metrics.json; here it runs right after the check cell.
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    last = _code_cells(nb)[-1].source.strip()
    assert last == "chapter.save()", f"{name}: the last cell is {last!r}, not chapter.save()"
    assert shell.run_cell(last).success
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {k: saved["parameters"][k] for k in override} == override
    assert saved["parameters"]["runs_dir"] == str(tmp_path / "runs") and "torch" in saved["versions"]


# --- the outputs: committed, and as the book build executed them ------------------------------------------

# What a reader must never see in a cell's output: a path object, an absolute path, an object repr.
LEAKS = re.compile(r"PosixPath\(|WindowsPath\(|(?:^|[\s'\"(=])/(?:[\w.-]+/)+[\w.-]+|<[\w.]+ object at 0x")


def _shown_text(output) -> str:
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    data = output.get("data", {})
    if "image/png" in data:  # a figure's text/plain fallback is never shown
        return ""
    return "".join(data.get("text/markdown", data.get("text/plain", "")))


def check_outputs(name: str, nb) -> None:
    """Every captioned figure shown once inline under its cell, no other figure, no stray value, no path or
    repr, no error, and the last cell saved a non-empty metrics.json."""
    code = _code_cells(nb)
    defined = [c for c in code if "figure" in c.metadata.get("mystnb", {})]
    assert defined, f"{name} defines no captioned figure"
    for cell in code:
        outputs = cell.get("outputs", [])
        assert not [o for o in outputs if o.get("output_type") == "error"], f"{name}: an error in {cell.source[:60]!r}"
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        if cell in defined:
            caption = cell.metadata["mystnb"]["figure"]
            assert caption.get("caption") and caption.get("name"), f"{name}: a figure without caption or name"
            assert len(images) == 1, f"{name}: figure {caption['name']} shown {len(images)} times inline"
        else:
            assert not images, f"{name}: an uncaptioned figure in cell {cell.source[:60]!r}"
        for output in outputs:
            assert output.get("output_type") != "execute_result" or "image/png" in output.get("data", {}) or \
                "text/markdown" in output.get("data", {}), f"{name}: a stray value {output['data']} in {cell.source[:60]!r}"
            leak = LEAKS.search(_shown_text(output))
            assert not leak, f"{name}: a cell prints {leak.group(0)!r}"
    saved = re.search(r"(\d+) numbers saved with the parameters", "".join(_shown_text(o) for o in code[-1].outputs))
    assert saved and int(saved.group(1)) > 0, f"{name}: the last cell saved no numbers"


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_the_committed_outputs_show_each_figure_once_and_no_path_or_repr(name):
    check_outputs(name, nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4))


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_the_book_builds_outputs_show_each_figure_once_and_no_path_or_repr(name, executed_chapters):
    folder, required = executed_chapters
    path = folder / f"{name}.ipynb"
    if not path.exists():
        assert not required, f"{path} is missing: the book build did not execute {name}"
        pytest.skip(f"no book build in {folder}: `make book` (or `make test`) executes the chapters")
    executed = nbformat.read(path, as_version=4)
    source = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert [c.source for c in _code_cells(executed)] == [c.source for c in _code_cells(source)], \
        f"{path} was executed from an older {name}.ipynb: rebuild the book"
    check_outputs(name, executed)


# --- end to end under papermill, at the smallest size --------------------------------------------------

@pytest.mark.parametrize("name", PAPERMILL)
def test_the_chapter_runs_under_papermill_at_its_smallest_size(name, tmp_path):
    parameters = CHAPTERS[name]["papermill"]
    out_dir = tmp_path / "out"
    pm.execute_notebook(NOTEBOOKS / f"{name}.ipynb", tmp_path / "executed.ipynb", kernel_name="python3",
                        parameters={"runs_dir": str(tmp_path / "runs"), "out_dir": str(out_dir), **parameters},
                        cwd=str(NOTEBOOKS), progress_bar=False)
    result = json.loads((out_dir / "metrics.json").read_text())
    assert {k: result["parameters"][k] for k in parameters} == parameters
    check_outputs(name, nbformat.read(tmp_path / "executed.ipynb", as_version=4))
