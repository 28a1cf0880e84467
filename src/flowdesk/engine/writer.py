"""Group commit: every write that is ready in the same event-loop turn commits together.

A workflow awaiting its step's record submits one operation and waits for its future. The
first submission in a turn schedules a flush; writes submitted before the flush runs (by
other runs, other steps, `App.start` calls) join the same transaction. While a flush is
in flight (a PostgreSQL round trip), new writes gather for the next one. A lone
sequential workflow pays exactly one commit per step; a thousand concurrent ones share
commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from flowdesk.store import base

Op = Callable[[base.Tx], Awaitable[Any]]


class Writer:
    def __init__(self, store: base.Store) -> None:
        self._store = store
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, op: Op) -> Any:
        """Apply ``op`` in the next group commit; returns its result or raises its error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((op, fut))
        if self._task is None:
            self._task = loop.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._store.transact([op for op, _ in batch])
                except BaseException as exc:  # the whole transaction failed
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            self._task = None
