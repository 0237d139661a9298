"""One rank of the multi-process checks in test_distributed.py (launched by torchrun from the test).

`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py STORE OUT [MODES]`
runs, on every rank, K distillation iterations in each gradient mode, an evaluation, and a run that
is checkpointed, stopped and resumed next to an uninterrupted one; every rank saves what it ended
with to OUT/rank{r}.pt, which the test compares with one process.
"""

import sys
from pathlib import Path

import torch

from mctlib.config import DistillConfig, EvalConfig
from mctlib.data import load_dataset
from mctlib.distill import distill
from mctlib.distributed import setup, teardown
from mctlib.evaluate import evaluate_synthetic
from mctlib.storage import load_store

# batch_syn 7 of 20 images: minibatches straddle the two shards unevenly and change every step.
SMALL = dict(method="mtt", ipc=2, syn_steps=4, expert_epochs=2.0, max_start_epoch=3.0, lr_img=100.0, lr_lr=1e-5,
             batch_syn=7, iterations=3, eval_every=0, checkpoint_every=2)
MODES = ("unrolled", "checkpointed", "constant_memory")
EVAL = EvalConfig(num_eval=3, epochs=4, batch_size=64)


def main(store_path: str, out: str, only: str | None = None) -> None:
    """`only`: just these comma-separated gradient modes (the uneven-shard check on 3 ranks)."""
    torch.set_num_threads(1)
    group = setup("cpu", "gloo", 60)
    data = load_dataset("digits", image_size=8)
    store = load_store(store_path)
    saved = {}
    for mode in only.split(",") if only else MODES:
        r = distill(DistillConfig(gradient_mode=mode, **SMALL), store, data, progress=False, group=group)
        saved[mode] = {"images": r.images, "alpha": r.alpha, "losses": [e["loss"] for e in r.log]}
    if only:
        torch.save(saved, Path(out) / f"rank{group.rank}.pt")
        teardown()
        return
    r = saved["checkpointed"]
    saved["eval"] = [e.to_dict() for e in evaluate_synthetic(r["images"], store_labels(r), 0.01, data, store.net,
                                                              EVAL, share=group)]
    out = Path(out)
    cfg = DistillConfig(gradient_mode="checkpointed", **{**SMALL, "iterations": 8})
    distill(cfg.replace(iterations=4), store, data, run_dir=out / "resumed", progress=False, group=group)
    resumed = distill(cfg, store, data, run_dir=out / "resumed", resume=True, progress=False, group=group)
    whole = distill(cfg, store, data, run_dir=out / "whole", progress=False, group=group)
    saved["resumed"] = {"images": resumed.images, "alpha": resumed.alpha, "log": resumed.log}
    saved["whole"] = {"images": whole.images, "alpha": whole.alpha, "log": whole.log}
    torch.save(saved, out / f"rank{group.rank}.pt")
    teardown()


def store_labels(result: dict) -> torch.Tensor:
    """Class-sorted labels of an IPC-2 set of ten classes (distill's initial_synthetic order)."""
    return torch.arange(10).repeat_interleave(result["images"].shape[0] // 10)


if __name__ == "__main__":
    main(*sys.argv[1:])
