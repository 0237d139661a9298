"""`python -m mctlib bench`: the engine's speed and memory, measured with their spread.

Sections (`--sections`, all by default):

- experts: experts per minute, and bytes per expert for each record kind (full; convex K = 4,
  K = 2, K = 2 with theta_0 regenerated from its seed).
- distill: seconds per distillation iteration and peak memory, for mtt (FullBuffer, integer
  start) and mct (ConvexRecord K = 4, continuous tau) x the three gradient modes, with the digits
  bench config (ConvNet width 64, depth 3, 16x16, IPC 10, syn_steps 20, batch_syn = all,
  5 experts x 15 epochs). Each configuration runs `distill()` in a fresh process.
- memory: peak memory against syn_steps (10, 20, 40, 80) for the three gradient modes.
- eval: num_eval = 5 fresh networks trained on one synthetic set together (`train_networks` with
  M = 5) against one after another (M = 1), the forms the library used before (vmap; torch's
  pooling), and the compute floor: the FLOPs at the measured matmul rate.
- pool: one MTT-unrolled match with `networks.AvgPool2x2` against torch's `F.avg_pool2d`.
- reference: the original MTT iteration, reimplemented in `mctlib.bench.reference`, against the
  engine's unrolled match, same shapes, same run (CPU: digits bench config; CUDA: CIFAR-10 IPC 1
  and 50), each in a fresh process.
- threads: one MTT-unrolled iteration with 1 or 2 torch threads, OpenMP busy-waiting or passive,
  and with or without the allocator tuning of `device.configure_threads`.
- precision: bf16 autocast and channels-last against fp32 (loss and image gradient).
- gpu: the CIFAR-10 shapes of the published presets (3x32x32, width 128, IPC 1/10/50 with their
  syn_steps) per gradient mode, achieved TFLOP/s of the student unroll against a measured matmul
  rate. Without a CUDA device its rows say "no CUDA device" and nothing is measured.

Timings are wall-clock medians with quartiles over repeats; on a shared machine also read the
CPU seconds, which other processes disturb far less. Memory: on CPU the rise of the process's
peak resident set (VmHWM, reset just before the run) over its resident set at the start, in a
fresh child process per configuration; on CUDA `torch.cuda.max_memory_allocated`. No speed
target lives in a unit test: tests/test_bench.py only runs `--quick` and checks the JSON.

Layout: one module per section (experts, distill, memory, evaluation, pool, versus_reference,
threads, precision, gpu), `common` for what they share, `child` for the one-configuration child
processes, `report` for the table and figures, `cli` for the entry point; `reference` is the
original MTT loop the engine is timed against, and `check` is the acceptance check
(`python -m mctlib check`), which verifies the engine on a device before timing it.
"""

from __future__ import annotations

from .child import _child_env, run_child
from .cli import SECTIONS, main, make_parser
from .common import (DEFAULT_OUT, FORMAT, FULL, METHODS, MODES, ORIGINAL_MTT_SECONDS, QUICK,
                     TARGET_MTT_UNROLLED_SECONDS, Sizes, machine, matmul_rate, stats)
from .evaluation import _compute_floor
from .memory import memory_checks
from .report import changes, format_table, write_figures

__all__ = ["DEFAULT_OUT", "FORMAT", "FULL", "METHODS", "MODES", "ORIGINAL_MTT_SECONDS", "QUICK", "SECTIONS",
           "TARGET_MTT_UNROLLED_SECONDS", "Sizes", "changes", "format_table", "machine", "main", "make_parser",
           "matmul_rate", "memory_checks", "run_child", "stats", "write_figures"]
