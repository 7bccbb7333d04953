"""Independent jobs side by side in worker processes, each with its own share of the CPU threads.

A tiny model's matrices are too small to keep two threads busy: on the 2-core machines two jobs
with one torch thread each do ~1.6x the work of one job with two threads (docs/tiny_backend.md).
The adapters of `02_train_lora` and the variants of `05_evaluate` are independent, so they can run
this way (`lora.workers`, `eval.workers`).

Workers are started with `spawn` (a fresh interpreter: no OpenMP or OpenGL state inherited from the
notebook's kernel), so a job must be a module-level function of an importable module, and a
*script* that calls `run_jobs` must guard its entry point with `if __name__ == "__main__":` (spawn
re-imports the main script in every worker; notebooks and `python -m` modules need nothing). Large
inputs go through a file (`pickled`), not the start-up pipe. A failing job does not stop the
others: every job runs to its end (nothing finished is lost), then the first failure is raised,
naming its job.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

POLL_SECONDS = 1.0  # how often the progress callback is called while jobs run


class JobError(RuntimeError):
    """A job of `run_jobs` failed; the worker's exception (with its traceback) is the cause."""


def worker_threads(workers: int) -> int:
    """Torch threads per worker when `workers` share this machine's cores (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _init_worker(threads: int, initializer: Callable | None, initargs: tuple) -> None:
    import torch

    torch.set_num_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def run_jobs(fn: Callable, jobs: Mapping[str, Mapping[str, Any]], workers: int, *,
             initializer: Callable | None = None, initargs: tuple = (),
             on_poll: Callable[[dict[str, str]], None] | None = None,
             on_done: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """`fn(**jobs[name])` for every job, at most `workers` at a time, in spawned processes.

    Args:
        fn: a module-level function (it is pickled by name).
        jobs: job name -> keyword arguments (picklable).
        workers: processes; each gets `worker_threads(workers)` torch threads.
        initializer, initargs: run once in each worker after its threads are set (e.g. to load
            a model every job of that worker shares).
        on_poll: called about every `POLL_SECONDS` with each job's state (`pending`, `running`,
            `done`, `failed`), e.g. to refresh progress bars from files the jobs write.
        on_done: called in this process with `(name, result)` as each job finishes.

    Returns:
        job name -> `fn`'s return value, in the order of `jobs`.

    Raises:
        JobError: after every job has ended, for the first job that raised (its exception chained).
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}
    with ProcessPoolExecutor(max_workers=min(workers, max(1, len(jobs))), mp_context=ctx, initializer=_init_worker,
                             initargs=(worker_threads(workers), initializer, initargs)) as pool:
        futures: dict[Future, str] = {pool.submit(fn, **kwargs): name for name, kwargs in jobs.items()}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for f in done:
                name = futures[f]
                if f.exception() is not None:
                    errors[name] = f.exception()
                else:
                    results[name] = f.result()
                    if on_done is not None:
                        on_done(name, results[name])
            if on_poll is not None:
                on_poll({name: ("failed" if name in errors else "done" if name in results
                                else "running" if f.running() else "pending") for f, name in futures.items()})
    if errors:
        name, err = next((n, errors[n]) for n in jobs if n in errors)
        others = [n for n in jobs if n in errors and n != name]
        more = f" (also failed: {', '.join(others)})" if others else ""
        raise JobError(f"job {name!r} failed: {type(err).__name__}: {err}{more}") from err
    return {name: results[name] for name in jobs}


@contextlib.contextmanager
def pickled(obj: Any) -> Iterator[Path]:
    """`obj` pickled into a temporary file for the workers to `unpickle`; removed afterwards.

    Only for this process's own data handed to its own workers (never for files from elsewhere:
    unpickling runs code)."""
    fd, name = tempfile.mkstemp(prefix="hpelib-jobs-", suffix=".pkl")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        yield path
    finally:
        path.unlink(missing_ok=True)


def unpickle(path: str | os.PathLike) -> Any:
    """What `pickled` wrote."""
    with open(path, "rb") as f:
        return pickle.load(f)
