"""What every chapter shares: parameter checks, glue, metrics JSON, cached expert stores.

Chapters call these so that a wrong papermill parameter fails in the first cell with its
name, every number the prose states is glued from the run, and heavy results are loaded
from a run directory when one already holds them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from .device import versions
from .experts import make_experts
from .storage import atomic_write_json, load_store


class ParameterError(ValueError):
    """A notebook parameter of the wrong type or outside its range."""


def check_parameter(name: str, value: Any, kind: type | tuple[type, ...], low: float | None = None,
                    high: float | None = None, choices: tuple | None = None) -> None:
    """Raise ParameterError naming `name` unless value has type `kind` and lies in [low, high] / choices."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and int not in kinds:
        kinds = kinds + (int,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ParameterError(f"parameter {name} = {value!r} has type {type(value).__name__}; expected {names} "
                             f"(papermill: pass it with -p {name} VALUE, or -y '{name}: VALUE' for exact YAML types)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"parameter {name} = {value!r} must be finite")
    if low is not None and value < low or high is not None and value > high:
        raise ParameterError(f"parameter {name} = {value!r} is out of range [{low}, {high}]")
    if choices is not None and value not in choices:
        raise ParameterError(f"parameter {name} = {value!r} must be one of {list(choices)}")


def glue(name: str, value: Any, display: bool = False) -> Any:
    """myst-nb's glue when available (the book build), a no-op elsewhere (a bare Colab runtime)."""
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return value
    _glue(name, value, display=display)
    return value


def per_ipc(name: str, value: Any, ipcs: list[int], low: int, high: int, default=None) -> dict[int, int]:
    """{ipc: value} for a parameter that may differ per IPC: one int applies to every IPC, a list gives
    one value per entry of `ipcs`, and 0 takes `default(position)` when a default rule is given (so the
    default follows `ipcs`: any single -p override of `ipcs` still runs)."""
    check_parameter(name, value, (list, int))
    if isinstance(value, int) and value == 0 and default is not None:
        values = [default(i) for i in range(len(ipcs))]
    else:
        values = [value] * len(ipcs) if isinstance(value, int) else list(value)
    if len(values) != len(ipcs):
        raise ParameterError(f"parameter {name} = {value!r} needs one entry per IPC in ipcs = {ipcs}, or one int")
    for i, v in enumerate(values):
        check_parameter(f"{name}[{i}]", v, int, low, high)
    return dict(zip(ipcs, values))


def check_parameter_names(known, history: list[str] | None = None) -> None:
    """Raise ParameterError if papermill injected a parameter this chapter does not define.

    papermill only warns about an unknown `-p NAME VALUE` and runs the chapter on its defaults; the
    chapter's check cell calls this with the names of its parameters cell. The injected cell (its
    source starts with papermill's "# Parameters" comment) is read from IPython's input history;
    outside IPython, or where nothing was injected, there is nothing to check.
    """
    if history is None:
        try:
            history = list(get_ipython().user_ns.get("In", []))  # type: ignore[name-defined]  # noqa: F821
        except NameError:
            return
    known = set(known)
    injected: list[str] = []
    for source in history:
        if not source.lstrip().startswith("# Parameters"):
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign):
                injected += [t.id for t in node.targets if isinstance(t, ast.Name)]
    unknown = sorted(set(injected) - known)
    if unknown:
        raise ParameterError(f"unknown parameter(s) {unknown}: this chapter's parameters are {sorted(known)} "
                             "(check the spelling of papermill's -p/-y names)")


def save_metrics(out_dir: str | Path, metrics: dict, parameters: dict) -> Path:
    """Write metrics.json (numbers, the parameters that produced them, versions) atomically."""
    out = Path(out_dir)
    path = out / "metrics.json"
    atomic_write_json(path, {"metrics": metrics, "parameters": parameters, "versions": versions()})
    return path


def config_key(*parts: Any) -> str:
    """A short stable hash of JSON-able config parts (names cache folders)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def dataset_identity(desc: dict) -> dict:
    """What makes two loaded datasets the same data: the whole description, floats rounded (so a
    changed split, size or normalisation never reuses experts trained on something else)."""
    return json.loads(json.dumps(desc), parse_float=lambda x: round(float(x), 6))


def cached_experts(dataset, net, expert_cfg, root: str | Path = "runs", device=None, progress: bool = False,
                   workers: int = 1):
    """The expert store for this (dataset, network, recipe): loaded from `root` if a chapter already
    trained it, trained and saved otherwise (into a temporary folder renamed into place). With `workers`
    > 1 the experts train in that many processes at once, in ensembles of ceil(experts / workers): the
    ensemble size is part of the store's name, since it is part of how the bits came about."""
    root = Path(root)
    desc = dataset.describe()
    ensemble_size = -(-expert_cfg.num_experts // workers) if workers > 1 else 8
    key = config_key(dataset_identity(desc), net.to_dict(), expert_cfg.to_dict(),
                     *(() if ensemble_size == 8 else (ensemble_size,)))
    path = root / f"experts-{desc['name']}-{expert_cfg.record}-{key}"
    if (path / "manifest.json").exists():
        return load_store(path, net=net, dataset=desc)
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_folders(root)
    # The folder names its host and process, so a later call can tell one a kill abandoned.
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".experts-{socket.gethostname()}-{os.getpid()}-"))
    try:
        make_experts(dataset, net, expert_cfg, tmp, device=device, progress=progress, overwrite=True,
                     ensemble_size=ensemble_size, workers=workers)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_store(path, net=net, dataset=desc)


def remove_abandoned_folders(root: Path) -> list[Path]:
    """Remove the `.experts-HOST-PID-*` folders of `cached_experts` calls on this host whose process is
    gone (killed before it could clean up); a live process's folder is left alone. Returns those removed."""
    removed = []
    prefix = f".experts-{socket.gethostname()}-"
    for folder in Path(root).glob(".experts-*"):
        pid = folder.name[len(prefix):].split("-", 1)[0] if folder.name.startswith(prefix) else ""
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def resolve_runs_dir(runs_dir: str = "") -> Path:
    """Where chapters keep their runs: `runs_dir` if given, else $MCTLIB_RUNS, else `runs/` at the
    book's root (the nearest folder above the working directory holding _config.yml), else ./runs."""
    if runs_dir:
        return Path(runs_dir).expanduser().resolve()
    if os.environ.get("MCTLIB_RUNS"):
        return Path(os.environ["MCTLIB_RUNS"]).expanduser().resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "_config.yml").exists() and (folder / "mctlib").is_dir():
            return folder / "runs"
    return here / "runs"


class Chapter:
    """What a chapter produces: numbers for its prose and figures, shown where the reader is.

    `record` glues a number for the book's prose, keeps it for metrics.json and prints it, so a
    reader in plain Jupyter, on Colab or in a papermill output notebook sees every number the
    prose states. `figure` saves a PNG beside metrics.json and displays the figure once, inline
    under the cell that made it; the book captions that output from the cell's `mystnb.figure`
    metadata, so no figure is glued or shown twice.
    """

    def __init__(self, out: str | Path, parameters: dict) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.parameters = dict(parameters)
        self.metrics: dict[str, Any] = {}

    def record(self, name: str, value: Any, show: bool = True) -> None:
        """Glue a number for the prose, keep it for metrics.json, and print `name = value` (returns
        nothing, so a cell that ends with it shows no stray value)."""
        self.metrics[name] = value
        glue(name, _PlainText(value) if isinstance(value, str) else value)
        if show:
            print(f"{name} = {format_value(value)}")

    def figure(self, name: str, fig) -> None:
        """Save `fig` as out/<name>.png, display it inline once and close it."""
        import matplotlib.pyplot as plt

        fig.savefig(self.out / f"{name}.png", dpi=120)
        try:
            from IPython.display import display
        except ImportError:
            plt.close(fig)
            return
        display(fig)
        plt.close(fig)

    def save(self) -> None:
        """metrics.json with the parameters and versions, beside the figures."""
        save_metrics(self.out, self.metrics, self.parameters)
        print(f"{len(self.metrics)} numbers saved with the parameters and versions")


class _PlainText(str):
    """A string whose repr is itself, so `{glue:text}` pastes it without quotes."""

    def __repr__(self) -> str:
        return str(self)


def format_value(value: Any) -> str:
    """A number as a reader wants it: 4 significant digits for floats, ints as they are."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"
