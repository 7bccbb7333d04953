"""Training batches made ahead in a background process: `BackgroundStream(stream)`.

A tiny base training step on the 2-core machines was ~0.5-0.65 s of model work on two threads and
~0.2 s of rendering and task building on one (llvmpipe, numpy), so one core idled for a quarter
of every step. A second process that renders the next batches while the model trains fills part of
that gap: `train.fit`'s loop went from 0.69 to 0.59 s a step (`python -m hpelib.bench base-step`;
docs/tiny_backend.md, "Faster base steps").

The stream is pickled into a `spawn`ed process (a fresh interpreter: the OpenGL context is
per-process and is created there on its first render), which serves `stream.batch(step, part)`
for the steps asked next. Batch `step` depends only on `(seed, step, part)`, so the batches are
exactly those of the stream itself (tested): prefetching changes the speed, never the result.

On a machine with many cores and a fast model step (a GPU), one process does not render fast enough:
`workers` processes then share the requests, each answering whichever step it takes next
(`train.prefetch_workers`).
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import traceback
from typing import Any

DEPTH = 2  # batches made ahead of the one asked for
POLL_SECONDS = 5.0  # how often a waiting `batch` checks that the worker is still alive


class DataWorkerError(RuntimeError):
    """The background process failed (its traceback is in the message) or exited."""


def _serve(stream_bytes: bytes, requests, results) -> None:
    """The worker's loop: `(step, part)` from `requests` -> `(step, part, "ok" | "error", payload)`."""
    try:
        stream = pickle.loads(stream_bytes)
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        results.put((None, None, "error", traceback.format_exc()))
        return
    while True:
        request = requests.get()
        if request is None:
            return
        step, part = request
        try:
            results.put((step, part, "ok", stream.batch(step, part=part)))
        except Exception:  # noqa: BLE001
            results.put((step, part, "error", traceback.format_exc()))


class BackgroundStream:
    """`stream`'s batches, made `depth` steps ahead in a spawned process.

    Same interface as `hpelib.data.tasks.SampleStream` (`batch(step, part=0)`, `batch_size`); asking
    for any step works (a resumed run starts anywhere), consecutive steps are the fast path. Use as a
    context manager or call `close()`; the worker is a daemon, so it also ends with its parent.

    Args:
        stream: a picklable stream (its renderer must not have rendered yet in another process
            that it would carry state from; `SceneRenderer` creates its context lazily).
        depth: batches made ahead per worker.
        workers: processes rendering side by side (each its own OpenGL context).
    """

    def __init__(self, stream: Any, depth: int = DEPTH, workers: int = 1):
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (batches made ahead), got {depth}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1 (rendering processes), got {workers!r}")
        try:
            payload = pickle.dumps(stream)
        except Exception as e:
            raise TypeError(f"BackgroundStream needs a picklable stream; {type(stream).__name__} is not: {e}") from e
        self.batch_size = stream.batch_size
        self.depth = depth * workers  # every worker has its next `depth` batches in hand
        ctx = multiprocessing.get_context("spawn")
        self._requests = ctx.Queue()
        self._results = ctx.Queue()
        self._asked: set[tuple[int, int]] = set()
        self._ready: dict[tuple[int, int], list] = {}
        self._processes = [ctx.Process(target=_serve, args=(payload, self._requests, self._results), daemon=True,
                                       name=f"hpelib-data-{i}") for i in range(workers)]
        for process in self._processes:
            process.start()

    def _ask(self, key: tuple[int, int]) -> None:
        if key not in self._asked and key not in self._ready:
            self._asked.add(key)
            self._requests.put(key)

    def batch(self, step: int, part: int = 0) -> list:
        """Batch `step` of the stream (the same samples `stream.batch(step, part)` gives)."""
        if not self._processes:
            raise DataWorkerError("this BackgroundStream is closed")
        key = (step, part)
        for ahead in range(self.depth + 1):
            self._ask((step + ahead, part))
        while key not in self._ready:
            try:
                got_step, got_part, status, payload = self._results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                dead = next((p for p in self._processes if not p.is_alive()), None)
                if dead is not None:  # its request may be lost: fail rather than wait for ever
                    raise DataWorkerError(f"the data process {dead.name} exited (code {dead.exitcode}) "
                                          f"before batch {step} was made") from None
                continue
            if status == "error":
                where = "starting" if got_step is None else f"making batch {got_step} (part {got_part})"
                raise DataWorkerError(f"the data process failed {where}:\n{payload}")
            self._asked.discard((got_step, got_part))
            self._ready[(got_step, got_part)] = payload
        for old in [k for k in self._ready if k[1] == part and k[0] < step]:  # a jump back or ahead leaves these
            del self._ready[old]
        return self._ready.pop(key)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        processes, self._processes = self._processes, []
        try:
            for _ in processes:
                self._requests.put(None)
            for process in processes:
                process.join(timeout=10)
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
                    process.join(timeout=5)
            for q in (self._requests, self._results):
                q.cancel_join_thread()
                q.close()

    def __enter__(self) -> "BackgroundStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
