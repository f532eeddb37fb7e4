"""One way to run per-image work on N worker processes: :func:`map_jobs`.

Every per-image loop of the pipeline (decoding the field cache, segmentation, cell crops,
CAM overlays, the synthetic generator) goes through it, so they share one behaviour:

- ``workers <= 1`` (or a single job): the jobs run in this process, in order, with no pool;
- otherwise a pool of ``workers`` processes started with ``spawn`` (a worker never inherits
  the parent's torch / OpenMP thread state or open memory maps), an optional ``initializer``
  per worker (heavy set-up once per process, e.g. loading a segmentation model);
- results come back in job order (``ordered=True``) or as they finish;
- a progress bar (tqdm) counts the jobs;
- cancel on error: an exception in a job (or KeyboardInterrupt, or the caller stopping early)
  cancels the jobs not yet started and shuts the pool down; the job's own exception reaches
  the caller unchanged.

Resumability is the caller's part, by design: a stage leaves out the jobs whose outputs exist
before it calls :func:`map_jobs` (each stage knows what "finished" means for its files).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

J = TypeVar("J")
R = TypeVar("R")


def map_jobs(fn: Callable[[J], R], jobs: Iterable[J], workers: int = 0, *, desc: str | None = None,
             unit: str = "img", initializer: Callable | None = None, initargs: tuple = (), ordered: bool = True,
             progress: bool = True, max_pending: int | None = None) -> Iterator[R]:
    """Yield ``fn(job)`` for every job (see the module docstring).

    Args:
        fn: a module-level function (picklable) of one job.
        jobs: the jobs (materialised into a list).
        workers: processes; ``<= 1`` runs in this process.
        desc, unit, progress: the progress bar.
        initializer, initargs: called once in each worker (and once here when ``workers <= 1``).
        ordered: yield in job order (else in completion order).
        max_pending: at most this many jobs submitted ahead of the results (default ``4 x workers``),
            so that a large list of jobs does not hold all results in memory at once.
    """
    jobs = list(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit=unit, mininterval=2.0, disable=not (progress and jobs) or None)
    try:
        if workers <= 1 or len(jobs) <= 1:
            if initializer is not None and jobs:
                initializer(*initargs)
            for job in jobs:
                yield fn(job)
                bar.update(1)
            return
        yield from _pooled(fn, jobs, min(workers, len(jobs)), bar, initializer, initargs, ordered,
                           max_pending or 4 * workers)
    finally:
        bar.close()


def _pooled(fn, jobs, workers, bar, initializer, initargs, ordered, max_pending) -> Iterator:
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs)
    try:
        pending: dict = {}  # future -> job index
        done: dict = {}  # job index -> result, waiting for its turn (ordered)
        nxt = submitted = 0
        while nxt < len(jobs):
            while submitted < len(jobs) and len(pending) + len(done) < max_pending:
                pending[pool.submit(fn, jobs[submitted])] = submitted
                submitted += 1
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                k = pending.pop(fut)
                res = fut.result()  # a job's exception propagates here
                bar.update(1)
                if ordered:
                    done[k] = res
                else:
                    nxt += 1
                    yield res
            while ordered and nxt in done:
                yield done.pop(nxt)
                nxt += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
