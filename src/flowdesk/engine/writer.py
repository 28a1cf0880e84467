"""Group commit: every write that is ready in the same event-loop turn commits together.

A workflow awaiting its step's record submits one operation and waits for its future. The
first submission in a turn schedules a flush for the end of the turn; writes submitted
before it runs (by other runs, other steps, `App.start` calls) join the same transaction.
A store that can commit without suspending (SQLite, when its write lock is free) commits
right in that callback; otherwise a flush task runs `Store.transact`, and while it is in
flight (a PostgreSQL round trip, a lock held by another process) new writes gather for the
next one. A store with ``parallel_writes > 1`` (PostgreSQL) keeps that many flushes in
flight, each on its own connection. A lone sequential workflow pays one commit per step;
concurrent ones share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from flowdesk.store import base

Op = Callable[[base.Tx], Awaitable[Any]]
Batch = list[tuple[Op, "asyncio.Future[Any]"]]


class Writer:
    def __init__(self, store: base.Store) -> None:
        self._store = store
        self._now: Callable[[list[Op]], list[Any] | None] | None = getattr(
            store, "transact_now", None
        )
        self._parallel: int = getattr(store, "parallel_writes", 1)
        self._pending: Batch = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, op: Op) -> Any:
        """Apply ``op`` in the next group commit; returns its result or raises its error."""
        return await self.enqueue(op)

    def enqueue(self, op: Op) -> asyncio.Future[Any]:
        """`submit` without waiting: ``op`` is queued now, so a write submitted later in
        this turn commits with it; the future holds its result or error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((op, fut))
        if not self._scheduled and len(self._tasks) < self._parallel:
            self._scheduled = True
            loop.call_soon(self._kick)
        return fut

    def _kick(self) -> None:
        self._scheduled = False
        if len(self._tasks) >= self._parallel or not self._pending:
            return
        if self._now is not None:
            batch, self._pending = self._pending, []
            try:
                results = self._now([op for op, _ in batch])
            except Exception as exc:
                _fail(batch, exc)
                return
            if results is not None:
                _deliver(batch, results)
                return
            self._pending = batch + self._pending
        task = asyncio.get_running_loop().create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._store.transact([op for op, _ in batch])
                except Exception as exc:  # the whole transaction failed
                    _fail(batch, exc)
                    continue
                except BaseException as exc:
                    _fail(batch, exc)
                    raise
                _deliver(batch, results)
        finally:
            # Leave the set now, not in the done callback: a caller woken by the last
            # batch may submit before that callback runs, and must see a free slot.
            current = asyncio.current_task()
            if current is not None:
                self._tasks.discard(current)
            if self._pending and len(self._tasks) < self._parallel:
                asyncio.get_running_loop().call_soon(self._kick)


def _fail(batch: Batch, exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)


def _deliver(batch: Batch, results: list[Any]) -> None:
    for (_, fut), result in zip(batch, results, strict=True):
        if fut.done():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
