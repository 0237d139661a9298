"""Reporting: the before/after of each speed change, and the table (text or Markdown)."""

from __future__ import annotations

from mctlib.check.timings import format_gpu, median_text, table

from .common import MODES
from .distributed import format_rows
from .figures import cpu, wall


def changes(result: dict) -> list[dict]:
    """One entry per speed change: the same figure with the change off (before) and on (after)."""
    out = []
    thr = {r["label"]: r for r in result.get("threads", {}).get("rows", [])
           if "error" not in r and r.get("condition", "as found") == "as found"}
    if "1 thread" in thr and "1 thread, allocator untuned" in thr:
        b, a = thr["1 thread, allocator untuned"], thr["1 thread"]
        out.append({"change": "allocator tuning (device.configure_threads)", "figure": "MTT unrolled s/iteration",
                    "before": wall(b)["median"], "after": wall(a)["median"], "before_cpu": cpu(b), "after_cpu": cpu(a)})
    ev = result.get("eval", {}).get("variants")
    if ev:  # each change against the library just before it: vmap -> loop (torch pooling) -> AvgPool2x2
        loop = ev.get("ensemble_torch_pool", ev["ensemble"])
        out.append({"change": "CPU ensemble as a loop, not vmap (training.VMAP_DEVICES)",
                    "figure": f"{result['eval']['num_eval']} eval networks x {result['eval']['epochs']} epochs, s",
                    "before": ev["ensemble_vmap"]["seconds"]["median"], "after": loop["seconds"]["median"],
                    "before_cpu": ev["ensemble_vmap"]["cpu_seconds"]["median"],
                    "after_cpu": loop["cpu_seconds"]["median"]})
    if ev and "ensemble_torch_pool" in ev:
        out.append({"change": "2x2 average pooling as a matmul on CPU (networks.AvgPool2x2)",
                    "figure": f"{result['eval']['num_eval']} eval networks x {result['eval']['epochs']} epochs, s",
                    "before": ev["ensemble_torch_pool"]["seconds"]["median"],
                    "after": ev["ensemble"]["seconds"]["median"],
                    "before_cpu": ev["ensemble_torch_pool"]["cpu_seconds"]["median"],
                    "after_cpu": ev["ensemble"]["cpu_seconds"]["median"]})
    pool = result.get("pool", {}).get("variants")
    if pool:
        b, a = pool["torch_avg_pool2d"], pool["AvgPool2x2"]
        out.append({"change": "2x2 average pooling as a matmul on CPU (networks.AvgPool2x2)",
                    "figure": "one MTT-unrolled match, s", "before": b["seconds"]["median"],
                    "after": a["seconds"]["median"], "before_cpu": b["cpu_seconds"]["median"],
                    "after_cpu": a["cpu_seconds"]["median"]})
    ex = result.get("experts", {}).get("runs", {})
    if "vmap" in ex and "loop" in ex:
        out.append({"change": "CPU ensemble as a loop, not vmap (training.VMAP_DEVICES)",
                    "figure": "expert training, s", "before": ex["vmap"]["seconds"], "after": ex["loop"]["seconds"],
                    "before_cpu": ex["vmap"]["cpu_seconds"], "after_cpu": ex["loop"]["cpu_seconds"]})
    return out


def format_table(result: dict, markdown: bool = False) -> str:
    """The benchmark table (plain text for the terminal, or Markdown for the book)."""
    lines: list[str] = []

    def add(header: list[str], rows: list[list[str]]):
        lines.extend(table(header, rows, markdown))

    med = median_text

    d = result.get("distill")
    if d:
        lines.append("Distillation, digits bench config, CPU: seconds per iteration, median [q1, q3]")
        add(["method", "gradient mode", "s/iteration (wall)", "CPU s/iteration", "peak memory MB"],
            [[r["method"], r["mode"], med(wall(r)), f"{cpu(r):.3f}", f"{r['peak_mb']:.0f}"] if "error" not in r
             else [r["method"], r["mode"], r["error"][:60], "-", "-"] for r in d["rows"]])
    if result.get("gpu"):
        lines.extend(format_gpu(result["gpu"], markdown))
    m = result.get("memory")
    if m:
        lines.append("Peak memory (MB) against syn_steps, MTT, digits, CPU")
        add(["gradient mode"] + [str(s) for s in m["syn_steps"]],
            [[mode] + [f"{r['peak_mb']:.0f}" if "peak_mb" in r else "err" for s in m["syn_steps"]
                       for r in m["rows"] if r["mode"] == mode and r["syn_steps"] == s] for mode in MODES])
    e = result.get("eval")
    if e:
        lines.append(f"Evaluation: {e['num_eval']} networks x {e['epochs']} epochs on {e['images']} images, seconds")
        add(["variant", "s (wall)", "CPU s", "speed-up vs sequential", "mean test accuracy"],
            [[k, med(v["seconds"]), med(v["cpu_seconds"]),
              f"{v['speedup_vs_sequential']:.2f}x" if "speedup_vs_sequential" in v else "1x",
              f"{100 * v['mean_accuracy']:.1f}%"] for k, v in e["variants"].items()])
        f = e.get("compute_floor")
        if f:
            lines.append(f"Compute floor: {f['flops'] / 1e9:.0f} GFLOP of convolutions and matmuls at the measured "
                         f"{f['matmul_gflops']:.0f} GFLOP/s = {f['floor_seconds']:.2f} s; no batched form can be more "
                         f"than {f['max_speedup_vs_sequential']:.2f}x faster than sequential here")
            lines.append("")
    pl = result.get("pool")
    if pl:
        lines.append(f"Pooling, one MTT-unrolled match ({pl['syn_steps']} steps), seconds; loss moves by "
                     f"{pl['loss_rel_diff']:.1e}, image gradient by {pl['image_grad_rel_err']:.1e} (relative)")
        add(["pooling", "s (wall)", "CPU s"],
            [[k, med(v["seconds"]), med(v["cpu_seconds"])] for k, v in pl["variants"].items()])
    r = result.get("reference")
    if r:
        lines.append(f"The original MTT loop (mctlib.check.reference) against the engine, MTT unrolled, {r['device']}, "
                     "seconds per iteration")
        add(["shape", "setting", "implementation", "s/iteration (wall)", "CPU s/iteration"],
            [[row["shape"], row["setting"], row["impl"], med(row.get("match_seconds")),
              med(row.get("match_cpu_seconds"))] if "error" not in row
             else [row["shape"], row["setting"], row["impl"], row["error"][:60], "-"] for row in r["rows"]])
        add(["shape", "setting", "reference s", "engine s", "speed-up"],
            [[x["shape"], x["setting"], f"{x['reference_s']:.3f}", f"{x['engine_s']:.3f}", f"{x['speedup']:.2f}x"]
             for x in r["speedups"]])
    x = result.get("experts")
    if x:
        lines.append(f"Experts: {x['experts_per_minute']:.2f} experts per minute "
                     f"({x['config']['expert']['num_experts']} x {x['config']['expert']['epochs']} epochs, CPU)")
        add(["record", "bytes per expert", "x smaller than full"],
            [[k, f"{v:,.0f}", f"{x['ratio_to_full'][k]:.1f}"] for k, v in x["bytes_per_expert"].items()])
    t = result.get("threads")
    if t:
        lines.append("Threads and allocator, MTT unrolled, seconds per iteration")
        add(["setting", "machine", "s/iteration (wall)", "CPU s/iteration"],
            [[r["label"], r.get("condition", "as found"), med(wall(r)), f"{cpu(r):.3f}"] if "error" not in r
             else [r["label"], r.get("condition", "as found"), r["error"][:60], "-"] for r in t["rows"]])
    p = result.get("precision")
    if p:
        lines.append("Precision and layout against fp32 (one unrolled match, CPU)")
        add(["setting", "loss rel. diff", "image-grad cosine", "within tolerance"],
            [[f"{r['precision']}{' channels_last' if r['channels_last'] else ''}", f"{r['loss_rel_diff']:.1e}",
              f"{r['image_grad_cosine']:.5f}", str(r["within_tolerance"])] for r in p["rows"]])
    if result.get("distributed"):
        lines.append(format_rows(result["distributed"]))
    c = result.get("changes")
    if c:
        lines.append("Speed changes, before -> after (wall s; CPU s)")
        add(["change", "figure", "before", "after"],
            [[r["change"], r["figure"], f"{r['before']:.3f} ({r['before_cpu']:.3f})",
              f"{r['after']:.3f} ({r['after_cpu']:.3f})"] for r in c])
    return "\n".join(lines)
