"""The bench's figures (book/performance.md), each from a bench result as `python -m benchmarks` writes it."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from mctlib.plotting import new_figure


def wall(row: dict) -> dict:
    """A row's wall seconds per iteration (`stats`); bench JSON before `iteration_seconds` held `match_seconds`."""
    return row.get("iteration_seconds") or row["match_seconds"]


def cpu(row: dict) -> float:
    """A row's CPU seconds per iteration; older bench JSON held their median as `match_cpu_seconds`."""
    return row["cpu_seconds_per_iteration"] if "cpu_seconds_per_iteration" in row else row["match_cpu_seconds"]["median"]


_MODE_STYLE = {"unrolled": ("C3", "o"), "checkpointed": ("C0", "s"), "constant_memory": ("C2", "^")}


def bench_memory_vs_syn_steps(result: dict):
    """Peak memory against syn_steps per gradient mode, from a bench result (its "memory")."""
    mem = result["memory"]
    fig, (ax_m, ax_t) = new_figure(2)
    for mode, (color, marker) in _MODE_STYLE.items():
        rows = sorted((r for r in mem["rows"] if r["mode"] == mode and "peak_mb" in r), key=lambda r: r["syn_steps"])
        if not rows:
            continue
        steps = [r["syn_steps"] for r in rows]
        ax_m.plot(steps, [r["peak_mb"] for r in rows], marker=marker, color=color, label=mode.replace("_", " "))
        sec = [wall(r)["median"] for r in rows]
        ax_t.plot(steps, sec, marker=marker, color=color, label=mode.replace("_", " "))
    for ax, label in ((ax_m, "peak memory rise (MB)"), (ax_t, "seconds per iteration")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(mem["syn_steps"], [str(s) for s in mem["syn_steps"]])
        ax.set_xlabel("syn_steps N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    ax_m.legend(fontsize=8)
    ax_m.set_title("peak memory rise per run")
    ax_t.set_title("seconds per iteration (median)")
    return fig


def bench_seconds_per_iteration(result: dict):
    """Seconds per distillation iteration (median, IQR bars) and peak memory per method x mode."""
    rows = [r for r in result["distill"]["rows"] if "error" not in r]
    fig, (ax_t, ax_m) = new_figure(2, width=4.8)
    short = {"unrolled": "unrolled", "checkpointed": "checkpt.", "constant_memory": "const. mem."}
    labels = [f"{r['method']}\n{short[r['mode']]}" for r in rows]
    x = list(range(len(rows)))
    colors = [_MODE_STYLE[r["mode"]][0] for r in rows]
    sec = [wall(r) for r in rows]
    med = [s["median"] for s in sec]
    err = [[s["median"] - s["q1"] for s in sec], [s["q3"] - s["median"] for s in sec]]
    ax_t.bar(x, med, yerr=err, color=colors, capsize=3, alpha=0.85, label="wall (median, IQR)")
    ax_t.plot(x, [cpu(r) for r in rows], "k_", markersize=16, mew=2, label="CPU seconds")
    ref = result["distill"].get("reference", {})
    if ref.get("target_mtt_unrolled_seconds"):
        ax_t.axhline(ref["target_mtt_unrolled_seconds"], color="k", ls="--", lw=0.8, label="target, MTT unrolled")
    if ref.get("original_mtt_seconds"):
        ax_t.axhline(ref["original_mtt_seconds"], color="0.5", ls=":", lw=0.8, label="original MTT (given)")
    ax_t.set_ylabel("seconds per iteration")
    ax_t.legend(fontsize=7)
    ax_m.bar(x, [r["peak_mb"] for r in rows], color=colors, alpha=0.85)
    for i, r in enumerate(rows):
        ax_m.annotate(f"{r['peak_mb']:.0f}", (i, r["peak_mb"]), ha="center", va="bottom", fontsize=7)
    ax_m.set_ylabel("peak memory rise (MB)")
    ax_m.set_yscale("log")
    for ax in (ax_t, ax_m):
        ax.set_xticks(x, labels, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return fig


def bench_before_after(result: dict):
    """Each speed change: its figure with the change off (before) and on (after), one panel each."""
    changes = result["changes"]
    fig, axes = new_figure(len(changes), width=2.9, height=3.0, squeeze=False)
    for ax, c in zip(axes[0], changes):
        ax.bar([0, 1], [c["before"], c["after"]], color=["0.6", "C0"], alpha=0.9, label="wall")
        ax.plot([0, 1], [c["before_cpu"], c["after_cpu"]], "k_", markersize=20, mew=2, label="CPU seconds")
        for i, v in enumerate((c["before"], c["after"])):
            ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks([0, 1], ["before", "after"])
        ax.set_title(c["change"].split(" (")[0], fontsize=8)
        ax.set_ylabel(c["figure"], fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    return fig


def bench_threads(result: dict):
    """Seconds per MTT-unrolled iteration per thread setting, on the machine as found and contended."""
    rows = [r for r in result["threads"]["rows"] if "error" not in r]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    conditions = list(dict.fromkeys(r.get("condition", "as found") for r in rows))
    fig, ax = new_figure(1, width=6.4, height=3.3)
    width = 0.8 / len(conditions)
    for j, (cond, color) in enumerate(zip(conditions, ("C0", "C1", "C2"))):
        for i, label in enumerate(labels):
            row = next((r for r in rows if r["label"] == label and r.get("condition", "as found") == cond), None)
            if row is None:
                continue
            s = wall(row)
            x = i + (j - (len(conditions) - 1) / 2) * width
            ax.bar(x, s["median"], width=width * 0.95, color=color, alpha=0.85,
                   yerr=[[s["median"] - s["q1"]], [s["q3"] - s["median"]]], capsize=2,
                   label=cond if i == 0 or not ax.get_legend_handles_labels()[1].count(cond) else None)
            ax.annotate(f"{s['median']:.2f}", (x, s["q3"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), [lab.replace(", ", ",\n") for lab in labels], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(wall(r)["q1"] for r in rows) / 4)
    ax.set_ylabel("seconds per iteration (median, IQR)")
    handles, names = ax.get_legend_handles_labels()
    ax.legend(dict(zip(names, handles)).values(), dict(zip(names, handles)).keys(), fontsize=7)
    ax.grid(alpha=0.3, axis="y", which="both")
    return fig


def write_figures(result: dict, folder: Path) -> list[Path]:
    """The book's PNGs: memory vs syn_steps, time per iteration per mode, before/after, threads."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn, key in (("bench_memory_vs_syn_steps.png", bench_memory_vs_syn_steps, "memory"),
                          ("bench_seconds_per_iteration.png", bench_seconds_per_iteration, "distill"),
                          ("bench_before_after.png", bench_before_after, "changes"),
                          ("bench_threads.png", bench_threads, "threads")):
        if result.get(key):
            fig = fn(result)
            fig.savefig(folder / name, dpi=130)
            plt.close(fig)
            written.append(folder / name)
    return written
