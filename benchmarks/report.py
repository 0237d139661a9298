"""Reporting: the before/after of each speed change, the table (text or Markdown) and the figures."""

from __future__ import annotations

from pathlib import Path

from .common import MODES


def changes(result: dict) -> list[dict]:
    """One entry per speed change: the same figure with the change off (before) and on (after)."""
    out = []
    thr = {r["label"]: r for r in result.get("threads", {}).get("rows", [])
           if "match_seconds" in r and r.get("condition", "as found") == "as found"}
    if "1 thread" in thr and "1 thread, allocator untuned" in thr:
        b, a = thr["1 thread, allocator untuned"], thr["1 thread"]
        out.append({"change": "allocator tuning (device.configure_threads)", "figure": "MTT unrolled s/iteration",
                    "before": b["match_seconds"]["median"], "after": a["match_seconds"]["median"],
                    "before_cpu": b["match_cpu_seconds"]["median"], "after_cpu": a["match_cpu_seconds"]["median"]})
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
    lines = []

    def table(header: list[str], rows: list[list[str]]):
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines.extend("| " + " | ".join(r) + " |" for r in rows)
        else:
            widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
            lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
        lines.append("")

    def med(s):
        return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]" if s and s.get("n") else "-"

    d = result.get("distill")
    if d:
        lines.append("Distillation, digits bench config, CPU: seconds per iteration, median [q1, q3]")
        table(["method", "gradient mode", "s/iteration (wall)", "CPU s/iteration", "peak memory MB"],
              [[r["method"], r["mode"], med(r.get("iteration_seconds") or r.get("match_seconds")),
                med(r.get("match_cpu_seconds")), f"{r['peak_mb']:.0f}" if "peak_mb" in r else r.get("error", "-")]
               for r in d["rows"]])
    g = result.get("gpu")
    if g:
        if g["status"] != "measured":
            lines.append(f"CIFAR-10 preset shapes on CUDA: {g['status']} (not measured)")
            lines.append("")
        else:
            lines.append("CIFAR-10 preset shapes on CUDA: seconds per iteration, median [q1, q3]")
            table(["method", "IPC", "syn_steps", "mode", "s/iteration", "peak MB", "peak / estimate", "TFLOP/s",
                   "of matmul rate"],
                  [[r["method"], str(r["ipc"]), str(r["syn_steps"]), r["mode"], med(r.get("match_seconds")),
                    f"{r['peak_mb']:.0f}" if "peak_mb" in r else r.get("error", "-")[:40],
                    f"{r['memory_vs_estimate']:.2f}" if "memory_vs_estimate" in r else "-",
                    f"{r['tflops']:.2f}" if "tflops" in r else "-",
                    f"{100 * r['fraction_of_matmul']:.1f}%" if "fraction_of_matmul" in r else "-"] for r in g["rows"]])
            lines.append("matmul TFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in g["matmul"].items()))
            lines.append("")
            if g.get("versus_original"):
                table(["IPC", "original loop s", "engine s", "speed-up", "target"],
                      [[str(v["ipc"]), f"{v['reference_s']:.4f}", f"{v['engine_s']:.4f}", f"{v['speedup']:.2f}x",
                        f">= {v['target']:g}x" if v.get("target") else "-"] if "error" not in v
                       else [str(v["ipc"]), v["error"][:40], "-", "-", "-"] for v in g["versus_original"]])
    m = result.get("memory")
    if m:
        lines.append("Peak memory (MB) against syn_steps, MTT, digits, CPU")
        table(["gradient mode"] + [str(s) for s in m["syn_steps"]],
              [[mode] + [f"{r['peak_mb']:.0f}" if "peak_mb" in r else "err" for s in m["syn_steps"]
                         for r in m["rows"] if r["mode"] == mode and r["syn_steps"] == s] for mode in MODES])
    e = result.get("eval")
    if e:
        lines.append(f"Evaluation: {e['num_eval']} networks x {e['epochs']} epochs on {e['images']} images, seconds")
        table(["variant", "s (wall)", "CPU s", "speed-up vs sequential", "mean test accuracy"],
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
        table(["pooling", "s (wall)", "CPU s"],
              [[k, med(v["seconds"]), med(v["cpu_seconds"])] for k, v in pl["variants"].items()])
    r = result.get("reference")
    if r:
        lines.append(f"The original MTT loop (mctlib.bench.reference) against the engine, MTT unrolled, {r['device']}, "
                     "seconds per iteration")
        table(["shape", "setting", "implementation", "s/iteration (wall)", "CPU s/iteration"],
              [[row["shape"], row["setting"], row["impl"], med(row.get("match_seconds")),
                med(row.get("match_cpu_seconds"))] if "error" not in row
               else [row["shape"], row["setting"], row["impl"], row["error"][:60], "-"] for row in r["rows"]])
        table(["shape", "setting", "reference s", "engine s", "speed-up"],
              [[x["shape"], x["setting"], f"{x['reference_s']:.3f}", f"{x['engine_s']:.3f}", f"{x['speedup']:.2f}x"]
               for x in r["speedups"]])
    x = result.get("experts")
    if x:
        lines.append(f"Experts: {x['experts_per_minute']:.2f} experts per minute "
                     f"({x['config']['expert']['num_experts']} x {x['config']['expert']['epochs']} epochs, CPU)")
        table(["record", "bytes per expert", "x smaller than full"],
              [[k, f"{v:,.0f}", f"{x['ratio_to_full'][k]:.1f}"] for k, v in x["bytes_per_expert"].items()])
    t = result.get("threads")
    if t:
        lines.append("Threads and allocator, MTT unrolled, seconds per iteration")
        table(["setting", "machine", "s/iteration (wall)", "CPU s/iteration"],
              [[r["label"], r.get("condition", "as found"), med(r.get("match_seconds")),
                med(r.get("match_cpu_seconds"))] if "error" not in r
               else [r["label"], r.get("condition", "as found"), r["error"][:60], "-"] for r in t["rows"]])
    p = result.get("precision")
    if p:
        lines.append("Precision and layout against fp32 (one unrolled match, CPU)")
        table(["setting", "loss rel. diff", "image-grad cosine", "within tolerance"],
              [[f"{r['precision']}{' channels_last' if r['channels_last'] else ''}", f"{r['loss_rel_diff']:.1e}",
                f"{r['image_grad_cosine']:.5f}", str(r["within_tolerance"])] for r in p["rows"]])
    if result.get("distributed"):
        from .distributed import format_rows

        lines.append(format_rows(result["distributed"]))
    c = result.get("changes")
    if c:
        lines.append("Speed changes, before -> after (wall s; CPU s)")
        table(["change", "figure", "before", "after"],
              [[r["change"], r["figure"], f"{r['before']:.3f} ({r['before_cpu']:.3f})",
                f"{r['after']:.3f} ({r['after_cpu']:.3f})"] for r in c])
    return "\n".join(lines)


def write_figures(result: dict, folder: Path) -> list[Path]:
    """The book's PNGs: memory vs syn_steps, time per iteration per mode, before/after."""
    from ..plotting import bench_before_after, bench_memory_vs_syn_steps, bench_seconds_per_iteration, bench_threads

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn, key in (("bench_memory_vs_syn_steps.png", bench_memory_vs_syn_steps, "memory"),
                          ("bench_seconds_per_iteration.png", bench_seconds_per_iteration, "distill"),
                          ("bench_before_after.png", bench_before_after, "changes"),
                          ("bench_threads.png", bench_threads, "threads")):
        if result.get(key):
            fig = fn(result)
            fig.savefig(folder / name, dpi=130)
            written.append(folder / name)
            import matplotlib.pyplot as plt

            plt.close(fig)
    return written
