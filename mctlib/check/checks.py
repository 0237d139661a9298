"""`python -m mctlib check --device DEVICE`: the engine verified on a device, then timed.

Checks, each passed or failed against a stated tolerance:

- modes_vs_float64: each gradient mode on DEVICE at --precision (DSA off, so that both sides see the
  same images) against the same mode in float64 on the CPU, on the same inputs: the loss, the
  image gradient (cosine and relative error) and the alpha gradient (`TOLERANCES`).
- checkpointed_equals_unrolled: the two exact modes on DEVICE, with DSA, agree.
- ensemble_equals_sequential: M evaluation networks trained together as a vmap ensemble equal the
  same networks trained one after another (parameters and test accuracy).
- precision_vs_fp32: tf32 and bf16 against fp32 on DEVICE: one match's loss and image-gradient
  cosine, and the final test accuracy of networks trained on digits (`PRECISION_TOLERANCES`).
- no_host_sync: one match waits for nothing: on CUDA under torch.cuda.set_sync_debug_mode("error"),
  on the CPU by counting reads of tensor values into Python (none may happen).
- bit_reproducible / resume_equals_uninterrupted: two distillations with one seed give bit-identical
  synthetic sets, and one interrupted after its checkpoint and resumed ends bit-identical too.
- deterministic_kernels: torch warned of no kernel without a deterministic version while the checks
  ran (CUDA runs are in deterministic mode, `device.configure_determinism`).

Timings: MTT and MCT per gradient mode (CUDA: the CIFAR-10 preset shapes at IPC 1/10/50 in fresh
processes, with the original loop at IPC 1 and 50, the fraction of the matmul rate and memory against
the engine's estimate, as `bench --sections gpu`; CPU: the digits shapes, small), evaluation of 5
networks together against one after another, and experts per minute on digits. On the CPU the whole
check is sized to take well under a minute: `tests/test_check.py` runs it, so it cannot rot.
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT = "mctlib-check-v1"
MODES = ("unrolled", "checkpointed", "constant_memory")

# A float32-family result against the CPU float64 one, same inputs: loss relative difference, image
# gradient cosine and relative error, alpha gradient relative error. fp32 allows float32 rounding
# through syn_steps steps of double backward; tf32 rounds convolution inputs to 10 mantissa bits and
# bf16 to 7, each with float32 accumulation.
TOLERANCES = {
    "fp32": {"loss_rel": 1e-4, "grad_cosine": 0.9999, "grad_rel": 1e-2, "alpha_rel": 1e-2},
    "tf32": {"loss_rel": 1e-2, "grad_cosine": 0.999, "grad_rel": 5e-2, "alpha_rel": 5e-2},
    "bf16": {"loss_rel": 5e-2, "grad_cosine": 0.99, "grad_rel": 0.2, "alpha_rel": 0.2},
}
# checkpointed vs unrolled on one device (the same steps, computed by reverse accumulation): image
# gradient relative error.
MODES_AGREE = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}
# vmap ensemble vs sequential training (grouped against single convolutions): parameters' relative
# difference after training, and test accuracy in percentage points.
ENSEMBLE = {"params_rel": 1e-3, "accuracy_points": 1.0}
# tf32 / bf16 against fp32 on one device: loss, image-gradient cosine, final digits test accuracy.
PRECISION_TOLERANCES = {"tf32": {"loss_rel": 1e-2, "grad_cosine": 0.999, "accuracy_points": 2.0},
                        "bf16": {"loss_rel": 5e-2, "grad_cosine": 0.99, "accuracy_points": 3.0}}


@dataclass(frozen=True)
class CheckSizes:
    """Digits shapes for the checks (both devices) and the CPU timings."""

    width: int = 16            # ConvNet width (depth 3, 16x16 digits)
    ipc: int = 2               # synthetic images per class in the matching checks
    syn_steps: int = 4
    batch_syn: int = 12        # < ipc * 10: several minibatches, as the presets have
    eval_nets: int = 3
    eval_epochs: int = 4
    eval_images: int = 100
    precision_nets: int = 2      # networks per precision for the final-accuracy comparison ...
    precision_epochs: int = 12   # ... trained long enough to be well above chance
    experts: int = 2
    expert_epochs: int = 4
    distill_iterations: int = 6
    timing_repeats: int = 2
    timing_ipc: int = 10       # CPU timings: the digits presets' IPC
    timing_syn_steps: int = 3  # ... at fewer steps than the presets' 20, to stay quick


SIZES = CheckSizes()


def _result(name: str, passed: bool, detail: str, **values) -> dict:
    return {"check": name, "passed": bool(passed), "detail": detail, **values}


def _net(sizes: CheckSizes):
    from ..networks import NetConfig

    return NetConfig(channels=1, num_classes=10, image_size=16, width=sizes.width, depth=3)


def _match_inputs(sizes: CheckSizes, seed: int = 0):
    """float32 CPU inputs of one match: (net, images, labels, theta_start, theta_target, plan)."""
    from ..matching import plan_student
    from ..networks import FlatModel, build_network

    net = _net(sizes)
    gen = torch.Generator().manual_seed(seed)
    n = sizes.ipc * net.num_classes
    images = torch.randn(n, 1, 16, 16, generator=gen)
    labels = torch.arange(10).repeat_interleave(sizes.ipc)
    theta_start = FlatModel(build_network(net, seed=seed)).flatten()
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=gen)
    plan = plan_student(n, sizes.syn_steps, sizes.batch_syn, gen)
    return net, images, labels, theta_start, theta_target, plan


def _run_match(net, images, labels, theta_start, theta_target, plan, mode: str, device, dtype, precision: str,
               dsa: bool, alpha: float = 0.01):
    """(loss, image gradient, alpha gradient) of one match, the inputs cast to dtype and moved to device."""
    from ..augment import make_augment
    from ..device import precision_context
    from ..matching import Student, match
    from ..networks import FlatModel, build_network

    model = FlatModel(build_network(net, seed=0).to(dtype)).to(device)
    x = images.detach().to(device, dtype).clone().requires_grad_(True)  # a fresh leaf: its own .grad
    a = torch.tensor(alpha, dtype=dtype, device=device, requires_grad=True)
    student = Student(model, make_augment(dsa))
    with precision_context(precision, device):
        result = match(student, x, labels.to(device), a, theta_start.to(device, dtype),
                       theta_target.to(device, dtype), plan.to(device), mode)
    return result.loss, x.grad.detach().cpu().double(), a.grad.detach().cpu().double()


def _compare(a, b) -> dict:
    """Differences of (loss, image grad, alpha grad) a against reference b."""
    return {"loss_rel": abs(a[0] - b[0]) / abs(b[0]),
            "grad_cosine": float(F.cosine_similarity(a[1].flatten(), b[1].flatten(), dim=0)),
            "grad_rel": float((a[1] - b[1]).norm() / b[1].norm()),
            "alpha_rel": float((a[2] - b[2]).abs() / b[2].abs())}


def _within(diff: dict, tol: dict) -> bool:
    return all(diff[k] >= v if k.endswith("cosine") else diff[k] <= v for k, v in tol.items() if k in diff)


def check_modes_vs_float64(device, precision: str, sizes: CheckSizes) -> list[dict]:
    net, images, labels, start, target, plan = _match_inputs(sizes)
    out = []
    for mode in MODES:
        ref = _run_match(net, images, labels, start, target, plan, mode, "cpu", torch.float64, "fp32", dsa=False)
        got = _run_match(net, images, labels, start, target, plan, mode, device, torch.float32, precision, dsa=False)
        diff = _compare(got, ref)
        out.append(_result(f"modes_vs_float64[{mode}]", _within(diff, TOLERANCES[precision]),
                           f"{device} {precision} vs CPU float64: loss rel {diff['loss_rel']:.1e}, image-grad cosine "
                           f"{diff['grad_cosine']:.6f}, rel {diff['grad_rel']:.1e}, alpha-grad rel {diff['alpha_rel']:.1e}",
                           **diff, tolerance=TOLERANCES[precision]))
    return out


def check_checkpointed_equals_unrolled(device, precision: str, sizes: CheckSizes) -> dict:
    net, images, labels, start, target, plan = _match_inputs(sizes, seed=1)
    u = _run_match(net, images, labels, start, target, plan, "unrolled", device, torch.float32, precision, dsa=True)
    c = _run_match(net, images, labels, start, target, plan, "checkpointed", device, torch.float32, precision,
                   dsa=True)
    diff = _compare(c, u)
    tol = MODES_AGREE[precision]
    return _result("checkpointed_equals_unrolled", diff["grad_rel"] <= tol and diff["alpha_rel"] <= tol,
                   f"with DSA on {device}: image-grad rel {diff['grad_rel']:.1e}, alpha-grad rel {diff['alpha_rel']:.1e} "
                   f"(<= {tol:g})", **diff, tolerance=tol)


def _digits(image_size: int = 16):
    from ..data import load_dataset

    return load_dataset("digits", image_size=image_size)


def _train_eval_nets(device, sizes: CheckSizes, data, together: bool, vmap: bool = True, precision: str = "fp32"):
    """(final parameters, test accuracies) of sizes.eval_nets networks trained on the first images of digits."""
    from .. import training
    from ..augment import make_augment
    from ..device import precision_context
    from ..networks import FlatModel, build_network
    from ..training import SGDRecipe, accuracy, derive_seed, train_networks

    net = _net(sizes)
    model = FlatModel(build_network(net)).to(device)
    m = sizes.eval_nets
    params = torch.stack([FlatModel(build_network(net, seed=derive_seed(0, i, 0))).flatten()
                          for i in range(m)]).to(device)
    seeds = [derive_seed(0, i, 1) for i in range(m)]
    images = data.train_images[:sizes.eval_images].to(device)
    labels = data.train_labels[:sizes.eval_images].to(device)
    recipe = SGDRecipe(lr=0.01, epochs=sizes.eval_epochs, batch_size=32, momentum=0.9, weight_decay=5e-4,
                       decay_epoch=sizes.eval_epochs // 2)
    augment = make_augment(True)
    before = training.VMAP_DEVICES
    if vmap:  # the ensemble path a GPU takes, on this device whatever it is
        training.VMAP_DEVICES = tuple({*before, torch.device(device).type})
    try:
        with precision_context(precision, device):
            if together:
                final = train_networks(model, params, images, labels, recipe, seeds, augment)
            else:
                final = torch.cat([train_networks(model, params[i:i + 1], images, labels, recipe, [seeds[i]], augment)
                                   for i in range(m)])
            acc = accuracy(model, final, data.test_images.to(device), data.test_labels.to(device))
    finally:
        training.VMAP_DEVICES = before
    return final.cpu(), acc.cpu()


def check_ensemble_equals_sequential(device, sizes: CheckSizes, data) -> dict:
    ens, acc_e = _train_eval_nets(device, sizes, data, together=True)
    seq, acc_s = _train_eval_nets(device, sizes, data, together=False)
    rel = float((ens - seq).norm() / seq.norm())
    points = float((acc_e - acc_s).abs().max()) * 100
    ok = rel <= ENSEMBLE["params_rel"] and points <= ENSEMBLE["accuracy_points"]
    return _result("ensemble_equals_sequential", ok,
                   f"{sizes.eval_nets} nets x {sizes.eval_epochs} epochs, vmap ensemble vs one by one: parameters rel "
                   f"{rel:.1e}, test accuracy differs by <= {points:.2f} points",
                   params_rel=rel, accuracy_points=points, tolerance=ENSEMBLE)


def check_precisions(device, sizes: CheckSizes, data) -> list[dict]:
    net, images, labels, start, target, plan = _match_inputs(sizes, seed=2)
    ref = _run_match(net, images, labels, start, target, plan, "unrolled", device, torch.float32, "fp32", dsa=True)
    trained = dataclasses.replace(sizes, eval_nets=sizes.precision_nets, eval_epochs=sizes.precision_epochs)
    _, acc_ref = _train_eval_nets(device, trained, data, together=True, vmap=False)
    out = []
    for precision, tol in PRECISION_TOLERANCES.items():
        got = _run_match(net, images, labels, start, target, plan, "unrolled", device, torch.float32, precision,
                         dsa=True)
        diff = _compare(got, ref)
        _, acc = _train_eval_nets(device, trained, data, together=True, vmap=False, precision=precision)
        diff["accuracy_points"] = abs(float(acc.mean()) - float(acc_ref.mean())) * 100
        note = " (TF32 does not exist on a CPU: the same arithmetic as fp32)" if (
            precision == "tf32" and torch.device(device).type == "cpu") else ""
        out.append(_result(f"precision_vs_fp32[{precision}]", _within(diff, tol),
                           f"loss rel {diff['loss_rel']:.1e}, image-grad cosine {diff['grad_cosine']:.5f}, mean test "
                           f"accuracy {100 * float(acc.mean()):.1f}% vs {100 * float(acc_ref.mean()):.1f}%{note}",
                           **diff, tolerance=tol))
    return out


def check_no_host_sync(device, precision: str, sizes: CheckSizes) -> dict:
    """One match that waits for nothing. CUDA: torch's sync debug mode raises at any synchronising
    call. Elsewhere, every read of a tensor's values into Python is counted while the match runs as
    it would on a GPU (matching.HOST_DEVICES emptied: no eager window check)."""
    from .. import matching
    from ..augment import DSA
    from ..device import precision_context
    from ..matching import Student, match
    from ..networks import FlatModel, build_network

    net, images, labels, start, target, plan = _match_inputs(sizes, seed=3)
    device = torch.device(device)
    model = FlatModel(build_network(net, seed=0)).to(device)
    dsa = DSA()
    for seed in plan.aug_seeds:  # the host's own draws (CPU generators), made before the match as on a GPU
        dsa.choose_group(seed)
    x = images.to(device).requires_grad_(True)
    a = torch.tensor(0.01, device=device, requires_grad=True)
    args = (Student(model, dsa), x, labels.to(device), a, start.to(device), target.to(device), plan.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        try:
            torch.cuda.set_sync_debug_mode("error")
            with precision_context(precision, device):
                result = match(*args, "unrolled")
            torch.cuda.set_sync_debug_mode(0)
        except RuntimeError as err:
            torch.cuda.set_sync_debug_mode(0)
            return _result("no_host_sync", False, f"a synchronising call inside match: {str(err).splitlines()[0]}")
        result.read()
        return _result("no_host_sync", True, "one match under torch.cuda.set_sync_debug_mode('error')")
    reads = []
    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def read(self, *a, **k):
            reads.append(name)
            return originals[name](self, *a, **k)
        return read

    hosts = matching.HOST_DEVICES
    try:
        matching.HOST_DEVICES = ()
        for n in names:
            setattr(torch.Tensor, n, counting(n))
        with precision_context(precision, device):
            match(*args, "unrolled")
    finally:
        matching.HOST_DEVICES = hosts
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
    return _result("no_host_sync", not reads, f"{len(reads)} reads of tensor values during one match"
                   + (f": {sorted(set(reads))}" if reads else " (run as on a GPU)"), reads=len(reads))


def _tiny_store(device, sizes: CheckSizes, data, root: Path):
    from ..config import ExpertConfig
    from ..experts import make_experts
    from ..networks import NetConfig

    net = NetConfig(channels=1, num_classes=10, image_size=16, width=sizes.width, depth=3)
    cfg = ExpertConfig(num_experts=sizes.experts, epochs=sizes.expert_epochs, record="convex", num_waypoints=3,
                       batch_size=128)
    start = time.perf_counter()
    store = make_experts(data, net, cfg, root / "store", device=device)
    return store, 60 * sizes.experts / (time.perf_counter() - start)


class _Interrupted(Exception):
    """Raised inside a distillation to stand for a kill: only what is on disk survives it."""


def check_reproducible(device, precision: str, sizes: CheckSizes, store, data, root: Path) -> list[dict]:
    from .. import distill as distill_module
    from ..config import DistillConfig

    cfg = DistillConfig(method="mct", ipc=1, syn_steps=sizes.syn_steps, expert_epochs=2.0,
                        max_start_epoch=float(sizes.expert_epochs - 2), lr_img=100.0, lr_lr=1e-7,
                        iterations=sizes.distill_iterations, eval_every=0, checkpoint_every=2)

    def run(out, **kw):
        return distill_module.distill(cfg, store, data, run_dir=out, device=device, progress=False,
                                      precision=precision, **kw)

    a, b = run(root / "a"), run(root / "b")
    same = torch.equal(a.images, b.images) and a.alpha == b.alpha
    out = [_result("bit_reproducible", same, f"two {cfg.iterations}-iteration runs, one seed: synthetic sets "
                   + ("bit-identical" if same else f"differ by up to {float((a.images - b.images).abs().max()):.1e}"))]
    match, calls = distill_module.match, []

    def dying(*args, **kwargs):  # killed during iteration checkpoint_every + 1, after a checkpoint
        calls.append(1)
        if len(calls) == cfg.checkpoint_every + 1:
            raise _Interrupted
        return match(*args, **kwargs)

    distill_module.match = dying
    try:
        run(root / "killed")
    except _Interrupted:
        pass
    finally:
        distill_module.match = match
    resumed = run(root / "killed", resume=True)
    same = torch.equal(resumed.images, a.images) and resumed.alpha == a.alpha
    out.append(_result("resume_equals_uninterrupted", same,
                       f"interrupted in iteration {cfg.checkpoint_every + 1}, resumed from its checkpoint: "
                       + ("bit-identical to the uninterrupted run" if same else "differs from the uninterrupted run")))
    return out


# ---------------------------------------------------------------------------------------------
# Timings


def _time(fn, repeats: int, device) -> dict:
    from .common import _sync, stats

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(torch.device(device))
        w = time.perf_counter()
        fn()
        _sync(torch.device(device))
        times.append(time.perf_counter() - w)
    return stats(times)


def timings(device, precision: str, sizes: CheckSizes, data, experts_per_minute: float, log) -> dict:
    """MTT/MCT per gradient mode with the original loop beside the engine, 5 networks together vs
    one after another, experts per minute (see the module docstring for the shapes per device)."""
    from ..config import get_preset
    from .child import _child_match, _child_reference

    device = torch.device(device)
    out: dict = {"experts_per_minute": {"value": experts_per_minute,
                                        "shape": f"digits 16x16, ConvNet width {sizes.width}, "
                                                 f"{sizes.expert_epochs} epochs"}}
    if device.type == "cuda":
        from .common import FULL
        from .gpu import section_gpu

        out["match"] = section_gpu(dataclasses.replace(FULL, gpu_iterations=5, reference_gpu_ipcs=(1, 50)), precision,
                                   False, log)
        eval_sizes = dataclasses.replace(sizes, eval_nets=5, eval_epochs=50, eval_images=1000)
    else:
        rows = []
        net = dataclasses.asdict(_net(sizes))
        shapes: dict = {}
        for method in ("mtt", "mct"):
            d = get_preset(f"{method}-digits-ipc{sizes.timing_ipc}").distill
            shapes.setdefault((min(d.syn_steps, sizes.timing_syn_steps), d.batch_syn), []).append(method)
        for (steps, batch_syn), methods in shapes.items():
            spec = {"net": net, "ipc": sizes.timing_ipc, "syn_steps": steps, "batch_syn": batch_syn, "warmup": 1,
                    "iterations": sizes.timing_repeats}
            for mode in MODES:
                r = _child_match({**spec, "mode": mode, "precision": precision}, device)
                rows.append({"method": "+".join(methods), "impl": "engine", "mode": mode, "syn_steps": steps,
                             "seconds": r["match_seconds"]})
            r = _child_reference({**spec, "mode": "unrolled"}, device)
            rows.append({"method": "+".join(methods), "impl": "original loop", "mode": "unrolled",
                         "syn_steps": steps, "seconds": r["match_seconds"]})
        out["match"] = {"device": "cpu", "shape": f"digits 16x16, ConvNet width {sizes.width}, IPC {sizes.timing_ipc}",
                        "rows": rows}
        eval_sizes = dataclasses.replace(sizes, eval_nets=5)
    seconds = {}
    for name, together in (("ensemble", True), ("sequential", False)):
        w = time.perf_counter()
        _train_eval_nets(device, eval_sizes, data, together=together, vmap=device.type == "cuda",
                         precision=precision)
        seconds[name] = time.perf_counter() - w
    out["eval"] = {"nets": eval_sizes.eval_nets, "epochs": eval_sizes.eval_epochs, "images": eval_sizes.eval_images,
                   "seconds": seconds, "speedup": seconds["sequential"] / seconds["ensemble"],
                   "target": 3.0 if device.type == "cuda" else None}
    return out


# ---------------------------------------------------------------------------------------------
# Entry point


def run_check(device: str = "cpu", precision: str = "fp32", sizes: CheckSizes = SIZES, log=print,
              timed: bool = True) -> dict:
    """Every check (and, if `timed`, the timings) on `device`; returns the JSON-ready result."""
    from ..device import configure_threads, determinism, device_name, resolve_device, versions

    device = resolve_device(device)
    if device.type == "cpu":
        configure_threads()
    started = time.perf_counter()
    data = _digits()
    checks: list[dict] = []

    def add(result):
        for r in result if isinstance(result, list) else [result]:
            checks.append(r)
            log(f"[{time.perf_counter() - started:5.1f} s] {'PASS' if r['passed'] else 'FAIL'}  {r['check']}: "
                f"{r['detail']}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add(check_modes_vs_float64(device, precision, sizes))
        add(check_checkpointed_equals_unrolled(device, precision, sizes))
        add(check_ensemble_equals_sequential(device, sizes, data))
        add(check_precisions(device, sizes, data))
        add(check_no_host_sync(device, precision, sizes))
        with tempfile.TemporaryDirectory(prefix="mctlib-check-") as tmp:
            store, experts_per_minute = _tiny_store(device, sizes, data, Path(tmp))
            add(check_reproducible(device, precision, sizes, store, data, Path(tmp)))
    # torch warns (device.configure_determinism: warn_only) when a kernel has no deterministic version.
    kernels = sorted({str(w.message).splitlines()[0] for w in caught if "deterministic" in str(w.message)})
    add(_result("deterministic_kernels", not kernels, "every kernel the checks ran has a deterministic version"
                if not kernels else f"{len(kernels)} without one: {'; '.join(kernels)[:300]}", kernels=kernels))
    result = {"format": FORMAT, "device": str(device), "device_name": device_name(device), "precision": precision,
              "determinism": determinism(), "versions": versions(device), "sizes": dataclasses.asdict(sizes),
              "checks": checks, "passed": all(c["passed"] for c in checks)}
    if timed:
        result["timings"] = timings(device, precision, sizes, data, experts_per_minute, log)
        log(f"[{time.perf_counter() - started:5.1f} s] timings done")
    result["seconds"] = time.perf_counter() - started
    return result


def format_check(result: dict) -> str:
    lines = [f"mctlib check on {result['device_name']} at {result['precision']}: "
             f"{'all passed' if result['passed'] else 'FAILED'} ({result['seconds']:.0f} s)", ""]
    width = max(len(c["check"]) for c in result["checks"])
    lines += [f"{'PASS' if c['passed'] else 'FAIL'}  {c['check'].ljust(width)}  {c['detail']}" for c in result["checks"]]
    t = result.get("timings")
    if t:
        lines.append("")
        m = t["match"]
        if m.get("status") == "measured" or "matmul" in m:  # the CUDA rows, as the bench prints them
            from .report import format_table

            lines.append(format_table({"gpu": m}))
        elif "rows" in m and m.get("device") == "cpu":
            lines.append(f"Matching, {m['shape']}, seconds per match, median [q1, q3]")
            for r in m["rows"]:
                s = r["seconds"]
                lines.append(f"  {r['method']:8s} {r['impl']:13s} {r['mode']:15s} syn_steps {r['syn_steps']:3d}  "
                             f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]")
        e = t["eval"]
        lines.append(f"Evaluation, {e['nets']} networks x {e['epochs']} epochs on {e['images']} images: together "
                     f"{e['seconds']['ensemble']:.2f} s, one after another {e['seconds']['sequential']:.2f} s "
                     f"({e['speedup']:.2f}x" + (f"; target {e['target']:g}x)" if e["target"] else ")"))
        x = t["experts_per_minute"]
        lines.append(f"Experts per minute: {x['value']:.1f} ({x['shape']})")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    from ..device import PRECISIONS

    p = argparse.ArgumentParser(prog="mctlib check", description="Check the engine on a device against CPU float64 "
                                "and time it; exits 1 if any check fails.")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="precision of the checked runs")
    p.add_argument("--out", default=None, help="JSON file to write (default runs/check/check-<device>.json)")
    p.add_argument("--no-timings", action="store_true", help="run the checks only")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        result = run_check(args.device, args.precision, timed=not args.no_timings)
    except ValueError as err:  # e.g. --device cuda without a GPU
        print(f"mctlib check: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/check/check-{result['device'].replace(':', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..storage import atomic_write_json

    atomic_write_json(out, result)
    print()
    print(format_check(result))
    print(f"-> {out}")
    return 0 if result["passed"] else 1
