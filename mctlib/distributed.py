"""One run over several processes, GPUs or nodes: torch.distributed, launched by `torchrun`.

`torchrun` starts one process (rank) per GPU or CPU slot and gives each its RANK, WORLD_SIZE and
LOCAL_RANK; `setup` joins them into one process group (NCCL on GPUs, gloo on CPUs) with a
collective timeout, so a rank that dies or stalls makes the others stop with a message instead
of hanging. Without torchrun nothing here runs and every single-process code path is unchanged.

What is spread, and why the results do not change:
- Experts: the ensembles of `ensemble_size` consecutive experts (each expert seeded by its index)
  are dealt out to the ranks. An ensemble trains exactly as in one process, so every expert file
  is byte-identical; rank 0 writes the manifest once, after every expert is on disk. A restarted
  run keeps the ensembles whose files are complete and trains only the others.
- Distillation: rank r owns a contiguous shard of the synthetic set S. Every rank draws the same
  expert, window and student plan from the shared seed. At each student step a rank computes the
  gradient of its own images in the minibatch (CE summed over them / the minibatch size), and the
  sum over ranks, an all-reduce, is g_k: theta advances identically everywhere. The backward
  passes use two conjugate operators (`_ReplicatedInput`, `_SumOverRanks`), so `matching.match`
  runs unchanged in all three gradient modes: unrolled backpropagates through the all-reduce,
  checkpointed all-reduces the Hessian-vector products, constant_memory needs only the summed g_k.
  Only the owner of an image computes its gradient; the pixels' gradient is then summed over
  ranks (exact: the other ranks contribute zeros), so every rank applies the same update and holds
  all of S, which is what evaluation, checkpoints and the divergence check read. S is small next
  to the student's activations, which are what falls with the number of ranks.
- Evaluation: the (architecture, network) pairs are dealt out to the ranks and the accuracies
  gathered; each network is seeded by its indices, so the accuracies are those of one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .matching import Student

BACKENDS = ("auto", "nccl", "gloo")
# torch's own default for both backends: long enough for a rank to train one ensemble of experts or
# one share of the evaluation networks while the others wait at the next collective.
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "MCTLIB_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """A multi-process set-up that cannot work, or a rank that was lost during the run (one line)."""


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class Group:
    """This process's place in the run, and the collectives the library uses (errors made one line)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def writer(self) -> bool:
        """Rank 0 writes the run's files (config, metrics, checkpoints, synthetic sets, manifest)."""
        return self.rank == 0

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # DistBackendError and gloo's/NCCL's own errors are RuntimeErrors
            if isinstance(err, DistributedError):
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.world_size} lost contact with the other ranks during {what} ({_cause(err)}); "
                f"a rank died or stalled longer than the {self.timeout_s:g} s collective timeout (--dist-timeout). "
                "Finished experts and the last distillation checkpoint are on disk: run the same command again "
                "(distill: with --resume)") from err

    def barrier(self, what: str = "a barrier") -> None:
        # all_reduce rather than dist.barrier: gloo honours the group timeout on it, and NCCL needs no device hint.
        flag = torch.zeros(1, device=self.device)
        self._collective(what, dist.all_reduce, flag)

    def all_reduce_(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum `t` over ranks, in place; every rank ends with the same bits."""
        self._collective(what, dist.all_reduce, t)
        return t

    def all_gather_object(self, obj, what: str) -> list:
        out = [None] * self.world_size
        self._collective(what, dist.all_gather_object, out, obj)
        return out

    # -- distillation ------------------------------------------------------------------------
    def bounds(self, num_images: int) -> tuple[int, int]:
        """The rows [lo, hi) of S this rank owns: floor(r n / W) .. floor((r + 1) n / W).
        Shards differ by at most one image when W does not divide n."""
        return shard_bounds(num_images, self.rank, self.world_size)

    def student(self, model, augment=None) -> Student:
        """One rank is one process: the plain `Student`, so its results are those of `python -m mctlib`."""
        return Student(model, augment) if self.world_size == 1 else ShardedStudent(model, augment, self)

    def sum_image_grad(self, images: torch.Tensor) -> None:
        """images.grad holds this rank's rows only; after the all-reduce every rank holds all of dL/dS
        (exact: each row is summed with zeros)."""
        if images.grad is not None and self.world_size > 1:
            self.all_reduce_(images.grad, "the all-reduce of the image gradients")

    def check_world_size(self, num_images: int) -> None:
        if self.world_size > num_images:
            raise DistributedError(f"{self.world_size} ranks but the synthetic set has {num_images} images: a rank "
                                   f"would own none; use at most {num_images} ranks (torchrun --nproc_per_node)")

    # -- evaluation (the `share` protocol of evaluate.train_and_test) ------------------------
    def members(self, num_archs: int, num_eval: int) -> list[list[int]]:
        """Per architecture, the network indices this rank trains: pair j = a * num_eval + i goes to
        rank j mod W, so every architecture's networks are spread as evenly as they can be."""
        return [_members(a, num_eval, self.rank, self.world_size) for a in range(num_archs)]

    def gather(self, results: list, num_eval: int) -> list:
        """Every rank's per-architecture accuracies, put back in network order."""
        from .evaluate import EvalResult

        shares = self.all_gather_object([r.accuracies for r in results], "the gathering of evaluation accuracies")
        out = []
        for a, result in enumerate(results):
            accs: list[float | None] = [None] * num_eval
            for rank, share in enumerate(shares):
                idx = _members(a, num_eval, rank, self.world_size)
                for i, acc in zip(idx, share[a], strict=True):
                    accs[i] = acc
            out.append(EvalResult(result.arch, accs))
        return out


def _cause(err: Exception) -> str:
    """The first sentence of a backend error, without gloo's source-file prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0][:160]


def _members(a: int, num_eval: int, rank: int, world: int) -> list[int]:
    return [i for i in range(num_eval) if (a * num_eval + i) % world == rank]


def shard_bounds(num_images: int, rank: int, world_size: int) -> tuple[int, int]:
    return num_images * rank // world_size, num_images * (rank + 1) // world_size


def timeout_seconds(value: float | None = None) -> float:
    """--dist-timeout, else $MCTLIB_DIST_TIMEOUT, else DEFAULT_TIMEOUT_S."""
    if value is None:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT_S
        try:
            value = float(text)
        except ValueError:
            raise DistributedError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds; unset it or set e.g. "
                                   f"{TIMEOUT_ENV}=600") from None
    if not (value > 0 and value < float("inf")):
        raise DistributedError(f"the collective timeout must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def setup(device: str = "auto", backend: str = "auto", timeout_s: float | None = None) -> Group:
    """Join the process group torchrun prepared (env:// rendezvous). Every check that can fail runs
    before the rendezvous, so a bad set-up stops each rank with the same one-line message."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError) as err:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK are not set as torchrun sets them ({err}); "
                               "launch with `torchrun --nproc_per_node=N -m mctlib ...`") from None
    if backend not in BACKENDS:
        raise DistributedError(f"--dist-backend {backend!r} unknown; choose one of {list(BACKENDS)}")
    timeout_s = timeout_seconds(timeout_s)
    cuda = torch.cuda.is_available()
    device = device or "auto"
    if backend == "nccl" and not cuda:
        raise DistributedError("--dist-backend nccl needs a CUDA GPU per rank but torch sees none on this node; "
                               "use --dist-backend gloo (CPU ranks) or run on GPU nodes")
    if device == "auto":
        device = "cuda" if cuda and backend != "gloo" else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not cuda:
            raise DistributedError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu")
        if dev.index is not None and local_world > 1:
            raise DistributedError(f"--device {device} would put all {local_world} ranks of this node on one GPU; "
                                   "use --device cuda (each rank takes the GPU of its LOCAL_RANK)")
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise DistributedError(f"{local_world} ranks on this node but torch sees {torch.cuda.device_count()} "
                                       f"GPU(s); use torchrun --nproc_per_node={torch.cuda.device_count()}")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif backend == "nccl":
        raise DistributedError("--dist-backend nccl runs on GPUs but --device is cpu; use --dist-backend gloo")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    _share_cores(local_world)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"rank {rank} of {world} could not join the process group ({_cause(err)}); check that "
                               "every rank was started with the same --rdzv-endpoint / MASTER_ADDR:MASTER_PORT and "
                               f"that all arrived within the {timeout_s:g} s timeout") from err
    return Group(rank, world, local_rank, local_world, dev, backend, timeout_s)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _share_cores(local_world: int) -> None:
    """CPU ranks on one node split its cores (each would otherwise take them all), unless
    $MCTLIB_THREADS says otherwise. Called after `device.configure_threads`."""
    if local_world <= 1 or os.environ.get("MCTLIB_THREADS"):
        return
    from . import available_cores

    torch.set_num_threads(max(1, available_cores() // local_world))


# -- the sharded student ---------------------------------------------------------------------

class _ReplicatedInput(torch.autograd.Function):
    """theta as one rank's computation sees it: the identity forward; backward sums the gradients of all
    ranks (theta is shared, so dL/dtheta collects every rank's part: the HVPs of `checkpointed`)."""

    @staticmethod
    def forward(ctx, theta, group):
        ctx.group = group
        return theta.clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_reduce_(grad.contiguous().clone(), "the all-reduce of the Hessian-vector products"), None


class _SumOverRanks(torch.autograd.Function):
    """g = sum over ranks of the local gradients. The loss downstream is computed identically on every
    rank, so dL/dg arrives identical everywhere and each local part receives it unchanged."""

    @staticmethod
    def forward(ctx, local, group):
        return group.all_reduce_(local.contiguous().clone(), "the all-reduce of the student gradient")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ShardedStudent(Student):
    """`Student` whose g_k sums every rank's part of the minibatch; `matching.match` uses it as is."""

    def __init__(self, model, augment, group: Group) -> None:
        super().__init__(model, augment)
        self.group = group

    def grad(self, theta, images, labels, plan, k, create_graph=False):
        idx = plan.batches[k]
        lo, hi = self.group.bounds(images.shape[0])
        mine = ((idx >= lo) & (idx < hi)).nonzero().squeeze(1)
        x = images[idx]
        if self.augment is not None:
            # DSA draws its per-sample parameters for the whole minibatch in order, so the minibatch is
            # augmented whole (cheap next to the network) and this rank keeps its rows.
            x = self.augment(x, plan.aug_seeds[k])
        x, y = x[mine.to(x.device)], labels[idx[mine]]
        theta_in = _ReplicatedInput.apply(theta, self.group) if create_graph else theta
        # The minibatch mean, split: each rank sums its rows and divides by the whole minibatch's size.
        loss = F.cross_entropy(self.model(theta_in, x), y, reduction="sum") / idx.numel()
        g = torch.autograd.grad(loss, theta_in, create_graph=create_graph)[0]
        if create_graph:
            return _SumOverRanks.apply(g, self.group)
        return self.group.all_reduce_(g, "the all-reduce of the student gradient")


def check_resume_world_size(run_dir: Path, world_size: int) -> None:
    """A run resumes on as many ranks as it started with: the shards decide the summation order,
    so another count would not continue the same computation."""
    config = Path(run_dir) / "config.json"
    if not config.exists():
        return
    try:
        saved = int(json.loads(config.read_text()).get("world_size", 1))
    except (ValueError, TypeError, AttributeError):
        return  # an unreadable config.json is the checkpoint checks' business
    if saved != world_size:
        how = ("python -m mctlib distill ... --resume" if saved == 1 else
               f"torchrun --nproc_per_node={saved} -m mctlib distill ... --resume (on several nodes: {saved} ranks "
               "in all)")
        raise DistributedError(f"{run_dir} was written by a {saved}-process run and this is a {world_size}-process "
                               f"run; resume it with {saved} process(es): {how}")


# -- experts ---------------------------------------------------------------------------------

PROGRESS = ".experts-progress"


def make_experts(dataset, net, cfg, out, group: Group, ensemble_size: int = 8, progress: bool = False):
    """`experts.make_experts` over the ranks: the same files, then one manifest written by rank 0.

    Each finished expert's file (atomic) is followed by a small note in `out/.experts-progress/` with
    its test accuracy and checksum; a restart with the same settings keeps every ensemble whose files
    and notes are complete and intact, and trains only the others."""
    from safetensors.torch import save as st_save

    from .device import compute_identity
    from .experts import train_experts
    from .storage import MANIFEST, _record_tensors, atomic_write_bytes, atomic_write_json, load_store, save_store

    out = Path(out)
    notes = out / PROGRESS
    identity = {"expert": cfg.to_dict(), "net": net.to_dict(), "dataset": dataset.describe(),
                "ensemble_size": ensemble_size}
    identity = json.loads(json.dumps(identity))
    if (out / MANIFEST).exists():
        raise DistributedError(f"{out} already holds a trajectory store; choose another --out")
    saved = _read_json(notes / "identity.json")
    if saved is not None and saved != identity:
        diff = sorted(k for k in identity if saved.get(k) != identity[k])
        raise DistributedError(f"{out} holds unfinished experts of another run ({', '.join(diff)} differ); "
                               "run the command that made them, or choose another --out")
    chunks = [range(first, min(first + ensemble_size, cfg.num_experts))
              for first in range(0, cfg.num_experts, ensemble_size)]
    todo = [c for c in chunks if not all(_finished(out, notes, i) for i in c)]
    kept = cfg.num_experts - sum(len(c) for c in todo)
    if kept and group.writer:
        print(f"{out}: kept {kept} finished expert(s) of an interrupted run; training the other "
              f"{cfg.num_experts - kept}", file=sys.stderr)
    group.barrier("the start of expert training")   # every rank has read the folder before anyone writes
    if group.writer:
        atomic_write_json(notes / "identity.json", identity)
    start = time.perf_counter()
    # Round r trains todo[r * W + rank] on each rank; the barrier after each round bounds a rank's wait
    # (and so the timeout it needs) by one ensemble.
    for first in range(0, len(todo), group.world_size):
        rnd = todo[first:first + group.world_size]
        if group.rank < len(rnd):
            chunk = rnd[group.rank]
            records, seeds, stats = train_experts(dataset, net, cfg, group.device, ensemble_size, progress=progress,
                                                  indices=chunk)
            for i, record, seed, acc in zip(chunk, records, seeds, stats["test_accuracy"], strict=True):
                data = st_save(_record_tensors(record, cfg.store_theta0))
                atomic_write_bytes(out / f"expert_{i:03d}.safetensors", data)
                atomic_write_json(notes / f"expert_{i:03d}.json", {"init_seed": seed, "test_accuracy": acc,
                                                                   "sha256": hashlib.sha256(data).hexdigest()})
        group.barrier("expert training (a rank did not finish its ensemble)")
    seconds = time.perf_counter() - start
    if group.writer:
        records, seeds, accs = _read_back(out, notes, net, cfg)
        stats = {"test_accuracy": accs, "seconds": seconds, "ensemble_size": ensemble_size,
                 "experts_per_minute": 60 * sum(len(c) for c in todo) / seconds if todo else None}
        # The manifest comes from the same function as a one-process store (it rewrites identical files).
        save_store(out, records, net, dataset.describe(), cfg.to_dict(), seeds, store_theta0=cfg.store_theta0,
                   extra={"stats": stats, "compute": compute_identity(group.device, "fp32"),
                          "beta_schedule": cfg.beta_schedule if cfg.record == "convex" else None,
                          "smooth": cfg.smooth if cfg.record == "convex" else None}, overwrite=True)
        for file in notes.iterdir():
            file.unlink()
        notes.rmdir()
    group.barrier("the writing of the manifest")
    return load_store(out)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finished(out: Path, notes: Path, i: int) -> bool:
    note = _read_json(notes / f"expert_{i:03d}.json")
    file = out / f"expert_{i:03d}.safetensors"
    if not isinstance(note, dict) or not file.exists():
        return False
    return hashlib.sha256(file.read_bytes()).hexdigest() == note.get("sha256")


def _read_back(out: Path, notes: Path, net, cfg):
    """The records as `train_experts` returned them (theta_0 rebuilt from its seed when not stored)."""
    from safetensors.torch import load as st_load

    from .networks import FlatModel, build_network
    from .storage import theta0_from_seed
    from .trajectories import ConvexRecord, FullBuffer, waypoint_epochs

    model = FlatModel(build_network(net))
    records, seeds, accs = [], [], []
    for i in range(cfg.num_experts):
        note = _read_json(notes / f"expert_{i:03d}.json")
        tensors = st_load((out / f"expert_{i:03d}.safetensors").read_bytes())
        head = tensors["params" if cfg.record == "full" else "waypoints"]
        if not cfg.store_theta0:
            head = torch.cat([theta0_from_seed(net, note["init_seed"]).unsqueeze(0), head])
        if cfg.record == "full":
            records.append(FullBuffer(head))
        else:
            records.append(ConvexRecord(head, waypoint_epochs(cfg.epochs, cfg.num_waypoints), tensors["beta"],
                                        model.layer_slices))
        seeds.append(note["init_seed"])
        accs.append(note["test_accuracy"])
    return records, seeds, accs
