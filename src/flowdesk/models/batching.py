"""Micro-batching: many concurrent callers, one vectorised call.

Much of what a local classifier spends on one text is per call: input checks, vectoriser
and sparse-matrix set-up, the calibrated model's prediction. Answered 64 at a time, a
TF-IDF classifier serves about 13 times as many texts per second (``benchmarks/
classifier.py``); with sentence embeddings, whose transformer costs the same per text in
any batch, about twice as many. `MicroBatcher` turns concurrent
``await batcher.submit(item)`` calls into one call of a batch function on a list of items:

* the first item opens a batch; the batch closes when it holds ``max_batch`` items or
  ``max_wait_ms`` milliseconds after it opened, whichever comes first;
* the batch function runs in a worker thread (it is CPU-bound and releases the GIL in
  numpy, scipy and onnxruntime), so the event loop keeps accepting requests meanwhile;
  the next batch collects while the current one runs;
* each caller gets its own result, or the batch's exception;
* a caller that is cancelled while waiting does not cancel the batch for the others.

A batcher belongs to the event loop that first used it; used from another loop (a new
``asyncio.run``), it starts afresh there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from flowdesk import errors

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What a batcher has done so far."""

    batches: int
    items: int
    largest: int

    @property
    def mean_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class MicroBatcher(Generic[T, R]):
    """Collects concurrent requests into batches for ``fn`` (see the module docstring).

    ``fn`` takes a list of items and returns one result per item, in order; it runs in
    ``executor`` (default: a private single thread, so batches of one model never
    compete for the cores with each other).
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        executor: concurrent.futures.Executor | None = None,
        name: str = "batch",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, not {max_wait_ms}")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.name = name
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"flowdesk-{name}"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._batches = 0
        self._items = 0
        self._largest = 0

    @property
    def stats(self) -> BatchStats:
        with self._lock:
            return BatchStats(self._batches, self._items, self._largest)

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and wait for its result."""
        if self._closed:
            raise errors.ModelError(f"the {self.name} batcher is closed")
        queue = self._ensure_running()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        queue.put_nowait((item, future))
        return await future

    def _ensure_running(self) -> asyncio.Queue[tuple[T, asyncio.Future[R]]]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._queue is None or self._task is None:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._collect(self._queue), name=f"{self.name}-batcher")
        elif self._task.done():  # it died: surface why, then start again
            self._task = loop.create_task(self._collect(self._queue), name=f"{self.name}-batcher")
        return self._queue

    async def _collect(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        running: asyncio.Future[None] | None = None
        while True:
            first = await queue.get()
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            if running is not None:
                # One batch at a time: while the previous one runs, this one keeps
                # filling from what arrives meanwhile.
                await asyncio.shield(running)
                while len(batch) < self.max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
            live = [(item, fut) for item, fut in batch if not fut.done()]
            running = loop.create_task(self._run(live)) if live else None

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for item, _ in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._call, items)
        except Exception as exc:  # every caller in the batch sees the failure
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    def _call(self, items: list[T]) -> Sequence[R]:
        results = self._fn(items)
        if len(results) != len(items):
            raise errors.ModelError(
                f"the {self.name} batch function returned {len(results)} results "
                f"for {len(items)} items"
            )
        with self._lock:
            self._batches += 1
            self._items += len(items)
            self._largest = max(self._largest, len(items))
        return results

    async def close(self) -> None:
        """Stop collecting; callers still waiting get `flowdesk.errors.ModelError`."""
        self._closed = True
        task, queue = self._task, self._queue
        self._task = None
        if task is not None and not task.done():
            if self._loop is asyncio.get_running_loop():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if queue is not None:
            while not queue.empty():
                _, fut = queue.get_nowait()
                if not fut.done() and not fut.get_loop().is_closed():
                    fut.set_exception(errors.ModelError(f"the {self.name} batcher closed"))
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
