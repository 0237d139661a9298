"""The engine's speed and memory, measured with their spread: `make bench`, or `python -m benchmarks` from the
repository's root (developer measurements, outside the installed package, as numpy and scipy keep theirs).

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
- pool: one MTT-unrolled match with `networks.AvgPool2x2` against torch's `nn.AvgPool2d`.
- reference: the original MTT iteration, reimplemented in `mctlib.check.reference`, against the
  engine's unrolled match, same shapes, same run (CPU: digits bench config; CUDA: CIFAR-10 IPC 1
  and 50), each in a fresh process.
- threads: one MTT-unrolled iteration with 1 or 2 torch threads, OpenMP busy-waiting or passive,
  and with or without the allocator tuning of `device.configure_threads`.
- precision: bf16 autocast and channels-last against fp32 (loss and image gradient).
- gpu: the CIFAR-10 shapes of the published presets (3x32x32, width 128, IPC 1/10/50 with their
  syn_steps) per gradient mode, achieved TFLOP/s of the student unroll against a measured matmul
  rate: the acceptance check's rows (`mctlib.check.timings.gpu_rows`). Without a CUDA device its rows
  say "no CUDA device" and nothing is measured.
- distributed (only when named): one process against two gloo ranks on the same cores.

Timings are wall-clock medians with quartiles over repeats; on a shared machine also read the
CPU seconds, which other processes disturb far less. Memory: on CPU the rise of the process's
peak resident set (VmHWM, reset just before the run) over its resident set at the start, in a
fresh child process per configuration; on CUDA `torch.cuda.max_memory_allocated`. No speed
target lives in a unit test: tests/test_bench.py only runs `--quick` and checks the JSON.

Layout: one module per section (experts, distill, memory, evaluation, pool, versus_reference,
threads, precision, gpu, distributed), `common` for what they share, `child` for the one-configuration
child processes, `report` for the table and figures, `cli` for the entry point. The timers, the
original MTT loop and the statistics are the installed package's (`mctlib.check.timings`,
`mctlib.check.reference`): a user's `python -m mctlib check` times the engine the same way.
"""
