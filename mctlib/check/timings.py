"""The timings of `mctlib check`, on the device it checked.

CUDA: one match per gradient mode at the CIFAR-10 shapes of the published presets (IPC 1/10/50, one
row per distinct shape), the achieved TFLOP/s of the student unroll against a measured matmul rate,
peak memory against the engine's own estimate (`cost.estimate_cost`), and the original MTT loop
(`reference`) beside the engine at IPC 1 and 50. CPU: the digits shapes, small. On both: 5 evaluation
networks trained together against one after another, and experts per minute. Times are wall-clock
medians with quartiles over repeats (`stats`). The developer benchmarks in the repository's
`benchmarks/` folder (`make bench`) build on these functions.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..augment import make_augment
from ..config import get_preset
from ..cost import estimate_cost
from ..device import channels_last, precision_context, resolve_device
from ..matching import Student, match, plan_student
from ..networks import FlatModel, NetConfig, build_network
from . import reference
from .checks import MODES, CheckSizes, check_net, train_eval_nets

METHODS = ("mtt", "mct")
CIFAR10_NET = NetConfig(arch="convnet", channels=3, num_classes=10, image_size=32, width=128)
# The engine's targets against the original loop on CUDA, by IPC (book/performance.md).
ORIGINAL_LOOP_TARGETS = {1: 3.0, 50: 2.0}
# ... and of 5 evaluation networks trained together against one after another, on CUDA.
ENSEMBLE_TARGET = 3.0


def stats(values: list[float]) -> dict:
    """Median, quartiles (inclusive method), IQR, min, max and n of `values`."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0}
    q1, q3 = (statistics.quantiles(vals, n=4, method="inclusive")[i] for i in (0, 2)) if len(vals) > 1 else (vals[0],) * 2
    return {"n": len(vals), "median": statistics.median(vals), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": vals[0], "max": vals[-1], "values": [round(v, 5) for v in values]}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: str, n: int = 8192, repeats: int = 10, kinds=("fp32", "tf32", "bf16")) -> dict:
    """Measured dense matmul TFLOP/s on `device` in fp32 (TF32 off and on) and bf16 (`kinds`: which of them;
    a CPU without bf16 matmul units takes minutes for the bf16 row, so ask only for what is used)."""
    dev = torch.device(device)
    out = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        if name not in kinds:
            continue
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a = torch.randn(n, n, device=dev, dtype=dtype)
            b = torch.randn(n, n, device=dev, dtype=dtype)
            a @ b
            sync(dev)
            times = []
            for _ in range(repeats):
                w = time.perf_counter()
                a @ b
                sync(dev)
                times.append(time.perf_counter() - w)
            out[name] = 2 * n**3 / statistics.median(times) / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    return out


def time_match(net: NetConfig, ipc: int, syn_steps: int, batch_syn: int | None, mode: str, device,
               precision: str = "fp32", warmup: int = 1, iterations: int = 2, layout: bool = False,
               count_flops: bool = False) -> dict:
    """`match()` on seeded random inputs of `net`'s shape with DSA: wall and CPU seconds per call
    (`stats`), on CUDA the rise of peak allocated memory, and with `count_flops` its FLOPs and TFLOP/s."""
    device = torch.device(device)
    model = FlatModel(build_network(net, seed=0)).to(device)
    augment = make_augment(True)
    student = Student(model, (lambda x, seed: channels_last(augment(x, seed))) if layout else augment)
    gen = torch.Generator().manual_seed(0)
    n = ipc * net.num_classes
    images = torch.randn(n, net.channels, net.image_size, net.image_size, generator=gen).to(device)
    labels = torch.arange(net.num_classes).repeat_interleave(ipc).to(device)
    theta_start = model.flatten().to(device)
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=gen).to(device)
    alpha = torch.tensor(0.01, device=device)
    wall, cpu, out = [], [], {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        for i in range(warmup + iterations):
            plan = plan_student(n, syn_steps, batch_syn, gen, device)
            x, a = images.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
            sync(device)
            w, c = time.perf_counter(), time.process_time()
            with precision_context(precision, device):
                match(student, x, labels, a, theta_start, theta_target, plan, mode)
            sync(device)
            if i >= warmup:
                wall.append(time.perf_counter() - w)
                cpu.append(time.process_time() - c)
    except torch.cuda.OutOfMemoryError as err:  # a configuration that does not fit is a result too
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(err).splitlines()[0]}"}
    if device.type == "cuda":
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    out.update(match_seconds=stats(wall), match_cpu_seconds=stats(cpu))
    if count_flops:
        counter = FlopCounterMode(display=False)
        with counter, precision_context(precision, device):
            match(student, images.clone().requires_grad_(True), labels, alpha.clone().requires_grad_(True),
                  theta_start, theta_target, plan_student(n, syn_steps, batch_syn, gen, device), mode)
        out["flops_per_iteration"] = int(counter.get_total_flops())
        out["tflops"] = out["flops_per_iteration"] / statistics.median(wall) / 1e12
    return out


def time_original_loop(net: NetConfig, ipc: int, syn_steps: int, batch_syn: int | None, device, warmup: int = 1,
                       iterations: int = 2) -> dict:
    """The original MTT iteration (`reference`) on random inputs of the same shapes as `time_match`:
    a two-point trajectory (start, start + noise), images left unchanged (lr 0), so every iteration
    times the same work. Wall and CPU seconds per iteration, on CUDA peak allocated memory."""
    device = torch.device(device)
    net_args = {"channel": net.channels, "num_classes": net.num_classes, "width": net.width, "depth": net.depth,
                "im_size": net.image_size}
    torch.manual_seed(0)
    template = reference.ConvNet(**net_args)
    shapes = [p.shape for p in template.parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in template.parameters()])
    gen = torch.Generator().manual_seed(0)
    target = start + 0.01 * torch.randn(start.shape, generator=gen)
    trajectory = [reference.unflatten(start, shapes), reference.unflatten(target, shapes)]
    n = ipc * net.num_classes
    images = torch.randn(n, net.channels, net.image_size, net.image_size, generator=gen).to(device)
    images.requires_grad_(True)
    labels = torch.arange(net.num_classes).repeat_interleave(ipc).to(device)
    syn_lr = torch.tensor(0.01, device=device).requires_grad_(True)
    opt_img = torch.optim.SGD([images], lr=0.0, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=0.0, momentum=0.5)
    wall, cpu, out = [], [], {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        for i in range(warmup + iterations):
            sync(device)
            w, c = time.perf_counter(), time.process_time()
            reference.iteration(net_args, images, labels, syn_lr, trajectory, 0, 1, syn_steps, batch_syn or n,
                                opt_img, opt_lr)
            sync(device)
            if i >= warmup:
                wall.append(time.perf_counter() - w)
                cpu.append(time.process_time() - c)
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(err).splitlines()[0]}"}
    if device.type == "cuda":
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    out.update(match_seconds=stats(wall), match_cpu_seconds=stats(cpu))
    return out


def cifar_shapes() -> list[tuple[str, int, int, int | None]]:
    """(methods joined by "+", ipc, syn_steps, batch_syn) for each distinct CIFAR-10 preset shape: MTT
    and MCT share (ipc, syn_steps, batch_syn) at IPC 10 and 50, and a match on random inputs does not
    depend on the method, so such a shape is timed once and labelled with both."""
    shapes: dict[tuple, list[str]] = {}
    for method in METHODS:
        for ipc in (1, 10, 50):
            d = get_preset(f"{method}-cifar10-ipc{ipc}").distill
            shapes.setdefault((ipc, d.syn_steps, d.batch_syn), []).append(method)
    return [("+".join(methods), ipc, steps, batch) for (ipc, steps, batch), methods in shapes.items()]


def memory_estimate_mb(method: str, ipc: int) -> dict:
    """The engine's own estimate of a match's memory per gradient mode at a CIFAR-10 preset (without
    the expert records, which a match on random inputs does not hold), MB."""
    cost = estimate_cost(get_preset(f"{method}-cifar10-ipc{ipc}"))
    return {m: (b - cost["records_bytes"]) / 2**20 for m, b in cost["gpu_bytes_by_mode"].items()}


def gpu_rows(precision: str = "fp32", iterations: int = 5, reference_ipcs: tuple[int, ...] = (1, 50),
             layout: bool = False, log=print) -> dict:
    """The CIFAR-10 preset shapes on CUDA per gradient mode, with the matmul-rate fraction, memory
    against the estimate, and the original loop at `reference_ipcs`; without CUDA every row says so."""
    shapes = cifar_shapes()
    if not torch.cuda.is_available():
        log("gpu: no CUDA device; nothing measured")
        return {"status": "no CUDA device", "rows": [{"method": m, "ipc": ipc, "syn_steps": s, "mode": mode,
                                                       "status": "no CUDA device"}
                                                      for m, ipc, s, _ in shapes for mode in MODES]}
    resolve_device("cuda")  # deterministic kernels and TF32 off, as every CUDA run of the engine has them
    matmul = matmul_rate("cuda")
    rows = []
    for method, ipc, steps, batch_syn in shapes:
        estimate = memory_estimate_mb(method.split("+")[0], ipc)
        for mode in MODES:
            res = time_match(CIFAR10_NET, ipc, steps, batch_syn, mode, "cuda", precision, warmup=2,
                             iterations=iterations, layout=layout, count_flops=mode == "unrolled")
            row = {"method": method, "ipc": ipc, "syn_steps": steps, "batch_syn": batch_syn, "mode": mode,
                   "status": "measured", "precision": precision, "channels_last": layout, **res}
            if "tflops" in row:
                row["fraction_of_matmul"] = row["tflops"] / matmul[precision]
            if "peak_mb" in row and estimate.get(mode):
                row["memory_estimate_mb"] = estimate[mode]
                row["memory_vs_estimate"] = row["peak_mb"] / estimate[mode]
            rows.append(row)
            log(f"gpu {method} ipc {ipc} {mode}: " + (res.get("error") or
                f"{res['match_seconds']['median']:.4f} s/it, peak {res['peak_mb']:.0f} MB"
                + (f", {res['tflops']:.2f} TFLOP/s" if "tflops" in res else "")))
    versus = []
    for ipc in reference_ipcs:
        engine = next((r for r in rows if r["ipc"] == ipc and r["mode"] == "unrolled" and "match_seconds" in r), None)
        if engine is None:
            continue
        ref = time_original_loop(CIFAR10_NET, ipc, engine["syn_steps"], engine["batch_syn"], "cuda", warmup=2,
                                 iterations=iterations)
        if "error" in ref:
            versus.append({"ipc": ipc, "error": ref["error"]})
            continue
        ref_s, eng_s = ref["match_seconds"]["median"], engine["match_seconds"]["median"]
        target = ORIGINAL_LOOP_TARGETS.get(ipc)
        versus.append({"ipc": ipc, "reference_s": ref_s, "engine_s": eng_s, "speedup": ref_s / eng_s,
                       "target": target, "met": ref_s / eng_s >= (target or 0)})
        log(f"gpu original loop ipc {ipc}: {ref_s:.4f} s/it, engine {eng_s:.4f} s/it = {ref_s / eng_s:.2f}x")
    return {"status": "measured", "rows": rows, "matmul": matmul, "versus_original": versus}


def table(header: list[str], rows: list[list[str]], markdown: bool = False) -> list[str]:
    """A table's lines: aligned plain text for the terminal, or Markdown for the book."""
    if markdown:
        return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                + ["| " + " | ".join(r) + " |" for r in rows] + [""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return (["  ".join(h.ljust(w) for h, w in zip(header, widths))]
            + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows] + [""])


def median_text(s: dict | None) -> str:
    """"median [q1, q3]" of a `stats` dict, or "-"."""
    return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]" if s and s.get("n") else "-"


def format_gpu(g: dict, markdown: bool = False) -> list[str]:
    """`gpu_rows`'s result as lines of text."""
    if g["status"] != "measured":
        return [f"CIFAR-10 preset shapes on CUDA: {g['status']} (not measured)", ""]
    lines = ["CIFAR-10 preset shapes on CUDA: seconds per iteration, median [q1, q3]"]
    lines += table(["method", "IPC", "syn_steps", "mode", "s/iteration", "peak MB", "peak / estimate", "TFLOP/s",
                    "of matmul rate"],
                   [[r["method"], str(r["ipc"]), str(r["syn_steps"]), r["mode"], median_text(r.get("match_seconds")),
                     f"{r['peak_mb']:.0f}" if "peak_mb" in r else r.get("error", "-")[:40],
                     f"{r['memory_vs_estimate']:.2f}" if "memory_vs_estimate" in r else "-",
                     f"{r['tflops']:.2f}" if "tflops" in r else "-",
                     f"{100 * r['fraction_of_matmul']:.1f}%" if "fraction_of_matmul" in r else "-"] for r in g["rows"]],
                   markdown)
    lines += ["matmul TFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in g["matmul"].items()), ""]
    if g.get("versus_original"):
        lines += table(["IPC", "original loop s", "engine s", "speed-up", "target"],
                       [[str(v["ipc"]), f"{v['reference_s']:.4f}", f"{v['engine_s']:.4f}", f"{v['speedup']:.2f}x",
                         f">= {v['target']:g}x" if v.get("target") else "-"] if "error" not in v
                        else [str(v["ipc"]), v["error"][:40], "-", "-", "-"] for v in g["versus_original"]], markdown)
    return lines


def timings(device, precision: str, sizes: CheckSizes, data, experts_per_minute: float, log=print) -> dict:
    """MTT/MCT per gradient mode with the original loop beside the engine, 5 networks together vs
    one after another, experts per minute (see the module docstring for the shapes per device)."""
    device = torch.device(device)
    out: dict = {"experts_per_minute": {"value": experts_per_minute,
                                        "shape": f"digits 16x16, ConvNet width {sizes.width}, "
                                                 f"{sizes.expert_epochs} epochs"}}
    if device.type == "cuda":
        out["match"] = gpu_rows(precision, iterations=5, reference_ipcs=tuple(ORIGINAL_LOOP_TARGETS), log=log)
        eval_sizes = dataclasses.replace(sizes, eval_nets=5, eval_epochs=50, eval_images=1000)
    else:
        rows = []
        net = check_net(sizes)
        shapes: dict = {}
        for method in METHODS:
            d = get_preset(f"{method}-digits-ipc{sizes.timing_ipc}").distill
            shapes.setdefault((min(d.syn_steps, sizes.timing_syn_steps), d.batch_syn), []).append(method)
        for (steps, batch_syn), methods in shapes.items():
            label = "+".join(methods)
            for mode in MODES:
                r = time_match(net, sizes.timing_ipc, steps, batch_syn, mode, device, precision,
                               iterations=sizes.timing_repeats)
                rows.append({"method": label, "impl": "engine", "mode": mode, "syn_steps": steps,
                             "seconds": r["match_seconds"]})
            r = time_original_loop(net, sizes.timing_ipc, steps, batch_syn, device, iterations=sizes.timing_repeats)
            rows.append({"method": label, "impl": "original loop", "mode": "unrolled", "syn_steps": steps,
                         "seconds": r["match_seconds"]})
        out["match"] = {"device": "cpu", "shape": f"digits 16x16, ConvNet width {sizes.width}, IPC {sizes.timing_ipc}",
                        "rows": rows}
        eval_sizes = dataclasses.replace(sizes, eval_nets=5)
    seconds = {}
    for name, together in (("ensemble", True), ("sequential", False)):
        w = time.perf_counter()
        train_eval_nets(device, eval_sizes, data, together=together, use_vmap=device.type == "cuda",
                        precision=precision)
        seconds[name] = time.perf_counter() - w
    out["eval"] = {"nets": eval_sizes.eval_nets, "epochs": eval_sizes.eval_epochs, "images": eval_sizes.eval_images,
                   "seconds": seconds, "speedup": seconds["sequential"] / seconds["ensemble"],
                   "target": ENSEMBLE_TARGET if device.type == "cuda" else None}
    return out


def format_timings(t: dict) -> list[str]:
    """`timings`'s result as lines of text."""
    lines = []
    m = t["match"]
    if "status" in m:  # the CUDA rows
        lines += format_gpu(m)
    else:
        lines.append(f"Matching, {m['shape']}, seconds per match, median [q1, q3]")
        for r in m["rows"]:
            s = r["seconds"]
            lines.append(f"  {r['method']:8s} {r['impl']:13s} {r['mode']:15s} syn_steps {r['syn_steps']:3d}  "
                         f"{median_text(s)}")
    e = t["eval"]
    lines.append(f"Evaluation, {e['nets']} networks x {e['epochs']} epochs on {e['images']} images: together "
                 f"{e['seconds']['ensemble']:.2f} s, one after another {e['seconds']['sequential']:.2f} s "
                 f"({e['speedup']:.2f}x" + (f"; target {e['target']:g}x)" if e["target"] else ")"))
    x = t["experts_per_minute"]
    lines.append(f"Experts per minute: {x['value']:.1f} ({x['shape']})")
    return lines
