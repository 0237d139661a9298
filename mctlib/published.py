"""The published accuracies (METHOD.md "Reported accuracies") and the commands that reproduce them
with this library's presets on a GPU."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .config import Preset, get_preset, presets
from .data import DATASET_INFO


@dataclass(frozen=True)
class Published:
    """One reported accuracy (ConvNet, %), as METHOD.md "Reported accuracies" lists it."""

    method: str        # mtt, mct, tesla, ftd, datm, dc, dsa, full
    dataset: str       # cifar10, cifar100, tiny_imagenet, fashion_mnist
    ipc: int | None    # None: the full training set
    accuracy: float
    std: float | None = None
    source: str = ""


def _rows(method: str, dataset: str, values: tuple[float, ...], source: str) -> list[Published]:
    return [Published(method, dataset, ipc, acc, None, source) for ipc, acc in zip((1, 10, 50), values)]


PUBLISHED: tuple[Published, ...] = tuple(
    _rows("mtt", "cifar10", (46.3, 65.3, 71.6), "MTT paper")
    + _rows("mtt", "cifar100", (24.3, 40.1, 47.7), "MTT paper")
    + _rows("mtt", "tiny_imagenet", (8.8, 23.2, 28.0), "MTT paper")
    + _rows("tesla", "cifar10", (48.5, 66.4, 72.6), "TESLA paper")
    + _rows("ftd", "cifar10", (46.0, 65.3, 73.2), "FTD paper")
    + _rows("datm", "cifar10", (46.9, 66.8, 76.1), "DATM paper")
    + _rows("datm", "cifar100", (27.9, 47.2, 55.0), "DATM paper")
    + [Published("mct", "cifar10", 1, 48.48, 0.23, "MCT authors' logs"),
       Published("mct", "cifar100", 10, 41.64, None, "MCT authors' logs"),
       Published("mct", "cifar100", 50, 46.62, None, "MCT authors' logs"),
       Published("full", "cifar10", None, 84.8, None, "full training set"),
       Published("full", "cifar100", None, 56.2, None, "full training set"),
       Published("full", "tiny_imagenet", None, 37.6, None, "full training set")]
    + _rows("dc", "fashion_mnist", (70.5, 82.3, 83.6), "DC paper")
    + _rows("dsa", "fashion_mnist", (70.6, 84.6, 88.7), "DSA paper")
)
IMPLEMENTED = ("mtt", "mct", "full")
PAPER_ROOT = "runs/paper"
FULL_DATA_EPOCHS = 300  # full-data networks: 300 epochs of the whole set (the synthetic sets get 1000)


def preset_name(method: str, dataset: str, ipc: int) -> str:
    return f"{method}-{dataset.replace('_', '')}-ipc{ipc}"


def experiment_preset(method: str, dataset: str, ipc: int, cpu: bool = False) -> tuple[Preset, bool]:
    """(preset, approximate) for `method` on `dataset` at `ipc`; with `cpu`, the dataset's CPU setting
    where it has one (`<method>-<dataset>-cpu-ipc<IPC>`). The MCT authors published commands for
    CIFAR-10 only; elsewhere MCT takes MTT's preset for the same dataset and IPC with method 'mct'
    (approximate = True: not the authors' settings)."""
    if cpu and preset_name(method, dataset + "-cpu", ipc) in presets():
        return get_preset(preset_name(method, dataset + "-cpu", ipc)), False
    name = preset_name(method, dataset, ipc)
    if name in presets():
        return get_preset(name), False
    if dataset == "digits":  # any IPC on digits: the IPC 1 setting with ipc changed
        base = get_preset(preset_name(method, dataset, 1))
        return Preset(name, base.data, base.net, base.expert, base.distill.replace(ipc=ipc), base.eval,
                      note=f"digits IPC {ipc}: the IPC 1 setting with ipc = {ipc}"), True
    if method != "mct":
        raise ValueError(f"no preset {name!r}; available: {sorted(presets())}")
    base = get_preset(preset_name("mtt", dataset, ipc))
    distill_cfg = base.distill.replace(method="mct", lr_teacher=base.expert.lr)
    expert = base.expert.replace(record="convex")
    return Preset(name, base.data, base.net, expert, distill_cfg, base.eval,
                  note=f"approximate: MTT's published {dataset} IPC {ipc} hyperparameters with method 'mct'"), True


def _store_dir(preset: Preset, root: str) -> str:
    return f"{root}/experts-{preset.data.name}" + ("-zca" if preset.data.zca else "")


def reproduce_commands(method: str, dataset: str, ipc: int | None, root: str = PAPER_ROOT) -> dict:
    """The CLI sequence and the papermill command that reproduce one published row on a GPU.
    MTT and MCT share the experts of MTT's preset; MCT matches their convexified record (K = 4)."""
    if method not in IMPLEMENTED:
        return {"preset": None, "approximate": False, "cli": [], "papermill": None,
                "note": f"{method.upper()} is not implemented in mctlib (reference row)"}
    if method == "full":  # the full-data ceiling: the same evaluation protocol on the whole training set
        base = next(get_preset(preset_name("mtt", dataset, i)) for i in (1, 10, 50)
                    if not get_preset(preset_name("mtt", dataset, i)).data.zca)
        download = " --data-download" if DATASET_INFO[dataset].downloadable else ""
        cli = [f"python -m mctlib evaluate --preset {base.name} --baseline full --epochs {FULL_DATA_EPOCHS}"
               f"{download} --out {root}/full-{dataset}"]
        return {"preset": base.name, "approximate": False, "cli": cli,
                "papermill": _papermill(dataset, base.distill.ipc, base,
                                        f"{root}/chapter4-{dataset}-ipc{base.distill.ipc}"),
                "note": f"full-data ceiling, {FULL_DATA_EPOCHS} evaluation epochs (the chapter reports it next to "
                        f"IPC {base.distill.ipc})"}
    preset, approximate = experiment_preset(method, dataset, ipc)
    mtt = get_preset(preset_name("mtt", dataset, ipc))
    experts = _store_dir(mtt, root)
    download = " --data-download" if DATASET_INFO[dataset].downloadable else ""
    cli = [f"python -m mctlib experts --preset {mtt.name}{download} --out {experts}"]
    store = experts
    if method == "mct":
        e = preset.expert
        store = f"{experts}-convex-K{e.num_waypoints}"
        cli.append(f"python -m mctlib convexify --store {experts} --out {store} --num-waypoints {e.num_waypoints} "
                   f"--beta-schedule {e.beta_schedule}")
    run = f"{root}/{preset.name}"
    if approximate:
        cli.append(f"python -m mctlib distill --preset {mtt.name} --method mct "
                   f"--lr-teacher {preset.distill.lr_teacher:g} --store {store} --out {run}")
    else:
        cli.append(f"python -m mctlib distill --preset {preset.name} --store {store} --out {run}")
    cli.append(f"python -m mctlib evaluate --preset {mtt.name if approximate else preset.name} "
               f"--synthetic {run}/synthetic_best.safetensors "
               f"--out {run}/evaluate-best")
    note = preset.note if approximate else ""
    if dataset == "tiny_imagenet":
        note = (note + "; " if note else "") + ("Tiny ImageNet cannot be downloaded by the CLI: "
                                                 "unzip it into $MCTLIB_DATA")
    return {"preset": preset.name if not approximate else mtt.name, "approximate": approximate, "cli": cli,
            "papermill": _papermill(dataset, ipc, preset, f"{root}/chapter4-{dataset}-ipc{ipc}"), "note": note}


def _papermill(dataset: str, ipc: int, preset: Preset, out: str) -> str:
    """Chapter 4 at paper scale for one dataset and IPC (its parameters cell names every -p used here)."""
    d, e, ev = preset.distill, preset.expert, preset.eval
    params = {"dataset": dataset, "setting": "paper", "ipcs": ipc, "num_seeds": 3, "iterations": d.iterations,
              "eval_every": d.eval_every, "num_eval": ev.num_eval, "eval_epochs": ev.epochs,
              "full_data_epochs": FULL_DATA_EPOCHS, "num_experts": e.num_experts, "expert_epochs": e.epochs,
              "num_waypoints": 4, "sampling_seeds": 1, "run_ablations": False, "out_dir": out}
    flags = " ".join(f"-p {k} {shlex.quote(str(v))}" for k, v in params.items())
    return f"papermill notebooks/04_experiments.ipynb {out}.ipynb {flags}"


def published_table(root: str = PAPER_ROOT) -> list[dict]:
    """METHOD.md's reported accuracies, one dict per row, with the commands that reproduce each."""
    return [{"method": p.method, "dataset": p.dataset, "ipc": p.ipc, "accuracy": p.accuracy, "std": p.std,
             "source": p.source, **reproduce_commands(p.method, p.dataset, p.ipc, root)} for p in PUBLISHED]


def markdown_table(rows: list[dict]) -> str:
    """The published table as Markdown (accuracy, the preset, the distill command)."""
    lines = ["| method | dataset | IPC | reported acc. (%) | preset | distill command |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accuracy']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
        cmd = next((c for c in r["cli"] if " distill " in c or " evaluate --preset" in c and r["method"] == "full"), "")
        cmd = f"`{cmd}`" if cmd else "—"
        preset = f"`{r['preset']}`" + (" (approx.)" if r["approximate"] else "") if r["preset"] else "—"
        lines.append(f"| {r['method'].upper()} | {r['dataset']} | {r['ipc'] or 'all'} | {acc} | {preset} | {cmd} |")
    return "\n".join(lines)



def command_argv(command: str) -> list[str] | None:
    """The argv after `python -m mctlib` of a CLI command (None for anything else)."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "mctlib"]:
        return words[3:]
    return None
