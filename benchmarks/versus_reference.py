"""Section reference: the original MTT loop (`mctlib.check.reference`) against the engine, same shapes, same run."""

from __future__ import annotations

import dataclasses

import torch

from mctlib import available_cores
from mctlib.config import get_preset

from .child import run_child
from .common import TARGET_MTT_UNROLLED_SECONDS, Sizes, digits_net


def section_reference(sizes: Sizes, log) -> dict:
    """The engine's MTT-unrolled match against the original loop (`mctlib.check.reference`), same shapes,
    same run, each in a fresh process. CPU: the digits bench config under the original's process
    settings (torch's default threads, busy-waiting, allocator untouched), under ours, and on one
    thread. CUDA: the CIFAR-10 shapes of the published IPC 1 and IPC 50 presets."""
    cuda = torch.cuda.is_available()
    if cuda:
        net = {"arch": "convnet", "channels": 3, "num_classes": 10, "image_size": 32, "width": 128}
        shapes = []
        for ipc in sizes.reference_gpu_ipcs:
            d = get_preset(f"mtt-cifar10-ipc{ipc}").distill
            shapes.append((f"CIFAR-10 IPC {ipc}", ipc, d.syn_steps, d.batch_syn))
        settings = [("GPU", None, None, None)]
    else:
        net = dataclasses.asdict(digits_net(sizes))
        shapes = [("digits bench config", 10, sizes.syn_steps, None)]
        cores = available_cores()
        # (label, threads, allocator tuned, OMP_WAIT_POLICY): threads "default" leaves torch's own
        # count; tuned None: the engine's processes tune glibc's allocator, the original's do not;
        # policy None unsets one inherited from `python -m mctlib`.
        settings = [("torch defaults (its thread count, busy-waiting)", "default", None, None),
                    ("1 thread", 1, None, None),
                    (f"{cores} threads, OMP passive (the command line's default here)", cores, True, "PASSIVE")]
    rows = []
    for label, ipc, steps, batch_syn in shapes:
        for setting, threads, tuned, policy in settings:
            for impl in ("reference", "engine"):
                if impl == "reference" and policy == "PASSIVE":
                    continue  # the original never ran so
                spec = {"kind": "reference" if impl == "reference" else "match", "device": "cuda" if cuda else "cpu",
                        "net": net, "ipc": ipc, "syn_steps": steps, "batch_syn": batch_syn, "mode": "unrolled",
                        "warmup": 1, "iterations": sizes.reference_iterations, "threads": threads,
                        # the original leaves glibc's allocator alone; the engine's processes tune it
                        "tune_allocator": impl == "engine" if tuned is None else tuned,
                        "env": {"OMP_WAIT_POLICY": policy}}
                res = run_child(spec)
                rows.append({"shape": label, "ipc": ipc, "syn_steps": steps, "setting": setting, "impl": impl, **res})
                log(f"reference {label}, {setting}, {impl}: " + (res.get("error") or
                    f"{res['match_seconds']['median']:.3f} s/it wall, {res['match_cpu_seconds']['median']:.3f} s CPU"))
    speedups = []
    for label, *_ in shapes:
        for setting, *_ in settings:
            pair = {r["impl"]: r for r in rows if r["shape"] == label and r["setting"] == setting and "error" not in r}
            if len(pair) == 2:
                speedups.append({"shape": label, "setting": setting,
                                 "reference_s": pair["reference"]["match_seconds"]["median"],
                                 "engine_s": pair["engine"]["match_seconds"]["median"],
                                 "speedup": pair["reference"]["match_seconds"]["median"]
                                 / pair["engine"]["match_seconds"]["median"]})
    return {"device": "cuda" if cuda else "cpu", "rows": rows, "speedups": speedups,
            "targets": {"cpu_same_settings_s": TARGET_MTT_UNROLLED_SECONDS, "gpu_ipc1": 3.0, "gpu_ipc50": 2.0}}
