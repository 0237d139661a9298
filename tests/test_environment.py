"""The project's own files describe one environment: pyproject.toml and environment.yml agree."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[@;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_name(r): r.replace(" ", "") for r in reqs}


def _conda() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    assert _conda() == _pyproject()


def test_environment_yml_installs_the_package_and_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert any(isinstance(d, str) and d.startswith("python") for d in deps)
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-e ." in pip


def test_torch_is_not_pinned_exactly():
    """Colab's preinstalled torch/torchvision must satisfy the requirement."""
    for name in ("torch", "torchvision"):
        assert "==" not in _pyproject()[name]


def test_jupyter_book_is_pinned_below_2():
    assert "<2" in _pyproject()["jupyter-book"]


def test_torchvision_really_imports():
    import torchvision
    from torchvision.ops import nms  # compiled ops load next to this torch build

    assert torchvision.__version__


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^make test$", ci, re.M)
