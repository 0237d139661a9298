"""Independent jobs in parallel: one single-threaded process per CPU core (chapter 4's runs, baselines
and experts). Each job runs on one thread wherever it runs, so its result does not depend on the number
of workers."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed

from . import available_cores
from .device import configure_threads, resolve_device


def default_workers(device=None) -> int:
    """How many independent runs to compute at once: one per CPU core (each process single-threaded) on a
    CPU, one on a GPU. On this book's 2-core reference machine one MTT iteration takes 2.8 s on one thread
    and 2.05 s on two (book/performance.md), so two single-thread runs side by side do 1.4x the work of
    one run on both cores. Each run is computed on one thread either way, so its result does not depend
    on the number of workers."""
    return 1 if resolve_device(device).type != "cpu" else max(1, available_cores())


def _worker_init() -> None:
    configure_threads(1)


def parallel_jobs(fn, jobs: list[tuple], workers: int, progress: bool = False, desc: str = "runs") -> list:
    """fn(*job) for every job, in `workers` spawned single-threaded processes (in this process when there
    is one worker or one job). Results come back in job order; an exception in a job is raised here."""
    if not jobs:
        return []
    bar = None
    if progress:
        # tqdm.auto only when a bar is asked for: importing it in a notebook without ipywidgets prints a warning
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=desc, leave=False)
    if workers <= 1 or len(jobs) == 1:
        out = []
        for job in jobs:
            out.append(fn(*job))
            if bar is not None:
                bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_worker_init,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
            out = [None] * len(jobs)
            for future in as_completed(futures):
                out[futures[future]] = future.result()
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return out
