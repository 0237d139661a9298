"""The acceptance checks of `mctlib check`, each passed or failed against a stated tolerance.

- modes_vs_float64: each gradient mode on DEVICE at the chosen precision (DSA off, so that both sides
  see the same images) against the same mode in float64 on the CPU, on the same inputs: the loss, the
  image gradient (cosine and relative error) and the alpha gradient (`TOLERANCES`).
- checkpointed_equals_unrolled: the two exact modes on DEVICE, with DSA, agree (METHOD.md, gradient modes).
- ensemble_equals_sequential: M evaluation networks trained together as a vmap ensemble equal the
  same networks trained one after another (parameters and test accuracy).
- precision_vs_fp32: tf32 and bf16 against fp32 on DEVICE: one match's loss and image-gradient
  cosine, and the final test accuracy of networks trained on digits (`PRECISION_TOLERANCES`).
- no_host_sync: one match waits for nothing: on CUDA under torch.cuda.set_sync_debug_mode("error");
  elsewhere every read of a tensor's value into Python is counted while the match runs (a host
  device reads one, the window's length, by design: `matching.HOST_DEVICES`).
- bit_reproducible / resume_equals_uninterrupted: two distillations with one seed give bit-identical
  synthetic sets, and a run stopped at its checkpoint and resumed ends bit-identical too.
- deterministic_kernels: torch warned of no kernel without a deterministic version while the checks
  ran (CUDA runs are in deterministic mode, `device.configure_determinism`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..augment import DSA, make_augment
from ..config import DistillConfig, ExpertConfig
from ..data import load_dataset
from ..device import precision_context
from ..distill import distill
from ..experts import make_experts
from ..matching import HOST_DEVICES, Student, match, plan_student
from ..networks import FlatModel, NetConfig, build_network
from ..training import SGDRecipe, accuracy, derive_seed, train_networks

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


def result(name: str, passed: bool, detail: str, **values) -> dict:
    """One check's outcome as the JSON holds it."""
    return {"check": name, "passed": bool(passed), "detail": detail, **values}


def check_net(sizes: CheckSizes) -> NetConfig:
    """The digits ConvNet the checks use (depth 3, 16x16, `sizes.width` channels)."""
    return NetConfig(channels=1, num_classes=10, image_size=16, width=sizes.width, depth=3)


def digits():
    """The digits dataset at the checks' 16x16."""
    return load_dataset("digits", image_size=16)


def _match_inputs(sizes: CheckSizes, seed: int = 0):
    """float32 CPU inputs of one match: (net, images, labels, theta_start, theta_target, plan)."""
    net = check_net(sizes)
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
    model = FlatModel(build_network(net, seed=0).to(dtype)).to(device)
    x = images.detach().to(device, dtype).clone().requires_grad_(True)  # a fresh leaf: its own .grad
    a = torch.tensor(alpha, dtype=dtype, device=device, requires_grad=True)
    student = Student(model, make_augment(dsa))
    with precision_context(precision, device):
        out = match(student, x, labels.to(device), a, theta_start.to(device, dtype),
                    theta_target.to(device, dtype), plan.to(device), mode)
    return out.loss, x.grad.detach().cpu().double(), a.grad.detach().cpu().double()


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
        out.append(result(f"modes_vs_float64[{mode}]", _within(diff, TOLERANCES[precision]),
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
    return result("checkpointed_equals_unrolled", diff["grad_rel"] <= tol and diff["alpha_rel"] <= tol,
                  f"with DSA on {device}: image-grad rel {diff['grad_rel']:.1e}, alpha-grad rel {diff['alpha_rel']:.1e} "
                  f"(<= {tol:g})", **diff, tolerance=tol)


def train_eval_nets(device, sizes: CheckSizes, data, together: bool, use_vmap: bool = True,
                    precision: str = "fp32"):
    """(final parameters, test accuracies) of sizes.eval_nets networks trained on the first images of
    digits; `use_vmap`: the ensemble path a GPU takes, on this device whatever it is."""
    net = check_net(sizes)
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
    with precision_context(precision, device):
        if together:
            final = train_networks(model, params, images, labels, recipe, seeds, augment, use_vmap=use_vmap)
        else:
            final = torch.cat([train_networks(model, params[i:i + 1], images, labels, recipe, [seeds[i]], augment)
                               for i in range(m)])
        acc = accuracy(model, final, data.test_images.to(device), data.test_labels.to(device), use_vmap=use_vmap)
    return final.cpu(), acc.cpu()


def check_ensemble_equals_sequential(device, sizes: CheckSizes, data) -> dict:
    ens, acc_e = train_eval_nets(device, sizes, data, together=True)
    seq, acc_s = train_eval_nets(device, sizes, data, together=False)
    rel = float((ens - seq).norm() / seq.norm())
    points = float((acc_e - acc_s).abs().max()) * 100
    ok = rel <= ENSEMBLE["params_rel"] and points <= ENSEMBLE["accuracy_points"]
    return result("ensemble_equals_sequential", ok,
                  f"{sizes.eval_nets} nets x {sizes.eval_epochs} epochs, vmap ensemble vs one by one: parameters rel "
                  f"{rel:.1e}, test accuracy differs by <= {points:.2f} points",
                  params_rel=rel, accuracy_points=points, tolerance=ENSEMBLE)


def check_precisions(device, sizes: CheckSizes, data) -> list[dict]:
    net, images, labels, start, target, plan = _match_inputs(sizes, seed=2)
    ref = _run_match(net, images, labels, start, target, plan, "unrolled", device, torch.float32, "fp32", dsa=True)
    trained = dataclasses.replace(sizes, eval_nets=sizes.precision_nets, eval_epochs=sizes.precision_epochs)
    _, acc_ref = train_eval_nets(device, trained, data, together=True, use_vmap=False)
    out = []
    for precision, tol in PRECISION_TOLERANCES.items():
        got = _run_match(net, images, labels, start, target, plan, "unrolled", device, torch.float32, precision,
                         dsa=True)
        diff = _compare(got, ref)
        _, acc = train_eval_nets(device, trained, data, together=True, use_vmap=False, precision=precision)
        diff["accuracy_points"] = abs(float(acc.mean()) - float(acc_ref.mean())) * 100
        note = " (TF32 does not exist on a CPU: the same arithmetic as fp32)" if (
            precision == "tf32" and torch.device(device).type == "cpu") else ""
        out.append(result(f"precision_vs_fp32[{precision}]", _within(diff, tol),
                          f"loss rel {diff['loss_rel']:.1e}, image-grad cosine {diff['grad_cosine']:.5f}, mean test "
                          f"accuracy {100 * float(acc.mean()):.1f}% vs {100 * float(acc_ref.mean()):.1f}%{note}",
                          **diff, tolerance=tol))
    return out


class ValueReads(TorchDispatchMode):
    """Records every read of a tensor's value into Python (`item`, `float`, `int`, `bool` of a tensor:
    torch's `_local_scalar_dense`) made while it is active, with the value read."""

    def __init__(self):
        super().__init__()
        self.values: list[float] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.values.append(float(out))
        return out


def check_no_host_sync(device, precision: str, sizes: CheckSizes) -> dict:
    """One match that waits for nothing. CUDA: torch's sync debug mode raises at any synchronising
    call. Elsewhere every read of a tensor's value into Python is recorded while the match runs; on a
    host device the one allowed is the window's length ||theta_start - theta_target||^2, which
    `match` checks at once there (`matching.HOST_DEVICES`) and a GPU checks at the caller's read-back."""
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
                out = match(*args, "unrolled")
        except RuntimeError as err:
            return result("no_host_sync", False, f"a synchronising call inside match: {str(err).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out.read()
        return result("no_host_sync", True, "one match under torch.cuda.set_sync_debug_mode('error')")
    window = float((start - target).pow(2).sum())
    with precision_context(precision, device), ValueReads() as reads:
        match(*args, "unrolled")
    expected = [window] if device.type in HOST_DEVICES else []
    ok = len(reads.values) == len(expected) and all(abs(v - w) <= 1e-6 * w for v, w in zip(reads.values, expected))
    return result("no_host_sync", ok, f"{len(reads.values)} read(s) of tensor values during one match: "
                  + (f"{reads.values[:5]}" if not ok else "the window's length, checked at once on a host device"
                     if expected else "none"), reads=len(reads.values))


def tiny_store(device, sizes: CheckSizes, data, root: Path):
    """(a store of sizes.experts convexified digits experts, experts per minute)."""
    cfg = ExpertConfig(num_experts=sizes.experts, epochs=sizes.expert_epochs, record="convex", num_waypoints=3,
                       batch_size=128)
    start = time.perf_counter()
    store = make_experts(data, check_net(sizes), cfg, root / "store", device=device)
    return store, 60 * sizes.experts / (time.perf_counter() - start)


def check_reproducible(device, precision: str, sizes: CheckSizes, store, data, root: Path) -> list[dict]:
    cfg = DistillConfig(method="mct", ipc=1, syn_steps=sizes.syn_steps, expert_epochs=2.0,
                        max_start_epoch=float(sizes.expert_epochs - 2), lr_img=100.0, lr_lr=1e-7,
                        iterations=sizes.distill_iterations, eval_every=0, checkpoint_every=2)

    def run(out, cfg=cfg, **kw):
        return distill(cfg, store, data, run_dir=out, device=device, progress=False, precision=precision, **kw)

    a, b = run(root / "a"), run(root / "b")
    same = torch.equal(a.images, b.images) and a.alpha == b.alpha
    out = [result("bit_reproducible", same, f"two {cfg.iterations}-iteration runs, one seed: synthetic sets "
                  + ("bit-identical" if same else f"differ by up to {float((a.images - b.images).abs().max()):.1e}"))]
    # Stopped at its first checkpoint: all a kill in the next iteration leaves to resume from
    # (`iterations` may change on resume, distill.RESUMABLE_CHANGES).
    stop = cfg.checkpoint_every
    run(root / "stopped", cfg=cfg.replace(iterations=stop))
    resumed = run(root / "stopped", resume=True)
    same = torch.equal(resumed.images, a.images) and resumed.alpha == a.alpha
    out.append(result("resume_equals_uninterrupted", same,
                      f"stopped at its checkpoint after iteration {stop}, resumed to {cfg.iterations}: "
                      + ("bit-identical to the uninterrupted run" if same else "differs from the uninterrupted run")))
    return out
