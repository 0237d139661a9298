"""Section gpu: the CIFAR-10 preset shapes on CUDA, with their ratios in one run:
the engine against the original loop (IPC 1 and 50), the achieved fraction of the measured matmul
rate, and peak memory against the engine's own estimate (`cost.estimate_cost`)."""

from __future__ import annotations

import torch

from .child import run_child
from .common import MODES, Sizes, _cifar_configs, matmul_rate

NET = {"arch": "convnet", "channels": 3, "num_classes": 10, "image_size": 32, "width": 128}


def section_gpu(sizes: Sizes, precision: str, layout: bool, log) -> dict:
    """CIFAR-10 preset shapes on CUDA; without a CUDA device every row says so."""
    configs = _cifar_configs()
    if not torch.cuda.is_available():
        rows = [{"method": m, "ipc": ipc, "syn_steps": s, "mode": mode, "status": "no CUDA device"}
                for m, ipc, s, _ in configs for mode in MODES]
        log("gpu: no CUDA device; nothing measured")
        return {"status": "no CUDA device", "rows": rows}
    matmul = matmul_rate("cuda")
    rows = []
    for method, ipc, steps, batch_syn in configs:
        estimate = _activation_estimate_mb(method.split("+")[0], ipc)
        for mode in MODES:
            spec = {"kind": "match", "device": "cuda", "net": NET, "ipc": ipc, "syn_steps": steps,
                    "batch_syn": batch_syn, "mode": mode, "warmup": 2, "iterations": sizes.gpu_iterations,
                    "precision": precision, "channels_last": layout, "count_flops": mode == "unrolled"}
            res = run_child(spec)
            row = {"method": method, "ipc": ipc, "syn_steps": steps, "batch_syn": batch_syn, "mode": mode,
                   "status": "measured",
                   "precision": precision, "channels_last": layout, **res}
            if "tflops" in row:
                row["fraction_of_matmul"] = row["tflops"] / matmul[precision]
            if "peak_mb" in row and estimate.get(mode):
                row["memory_estimate_mb"] = estimate[mode]
                row["memory_vs_estimate"] = row["peak_mb"] / estimate[mode]
            rows.append(row)
            log(f"gpu {method} ipc {ipc} {mode}: " + (res.get("error") or
                f"{res['match_seconds']['median']:.4f} s/it, peak {res['peak_mb']:.0f} MB"
                + (f", {res['tflops']:.2f} TFLOP/s" if "tflops" in res else "")))
    return {"status": "measured", "rows": rows, "matmul": matmul,
            "versus_original": _versus_original(sizes, rows, log)}


def _activation_estimate_mb(method: str, ipc: int) -> dict:
    """The engine's own estimate of a match's memory per gradient mode (without the expert records,
    which a match on random inputs does not hold), MB."""
    from ..config import get_preset
    from ..cost import estimate_cost

    cost = estimate_cost(get_preset(f"{method}-cifar10-ipc{ipc}"))
    return {m: (b - cost["records_bytes"]) / 2**20 for m, b in cost["gpu_bytes_by_mode"].items()}


def _versus_original(sizes: Sizes, rows: list[dict], log) -> list[dict]:
    """The original MTT loop at the IPC 1 and 50 shapes, against the engine's unrolled row of the same shape."""
    out = []
    targets = {1: 3.0, 50: 2.0}
    for ipc in sizes.reference_gpu_ipcs:
        engine = next((r for r in rows if r["ipc"] == ipc and r["mode"] == "unrolled" and "match_seconds" in r), None)
        if engine is None:
            continue
        ref = run_child({"kind": "reference", "device": "cuda", "net": NET, "ipc": ipc, "syn_steps": engine["syn_steps"],
                         "batch_syn": engine["batch_syn"], "mode": "unrolled", "warmup": 2,
                         "iterations": sizes.gpu_iterations})
        if "error" in ref:
            out.append({"ipc": ipc, "error": ref["error"]})
            continue
        ref_s, eng_s = ref["match_seconds"]["median"], engine["match_seconds"]["median"]
        out.append({"ipc": ipc, "reference_s": ref_s, "engine_s": eng_s, "speedup": ref_s / eng_s,
                    "target": targets.get(ipc), "met": ref_s / eng_s >= targets.get(ipc, 0)})
        log(f"gpu original loop ipc {ipc}: {ref_s:.4f} s/it, engine {eng_s:.4f} s/it = {ref_s / eng_s:.2f}x")
    return out
