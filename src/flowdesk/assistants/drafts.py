"""Replies being drafted, streamed to whoever watches the thread in this process.

The support assistant passes `Drafts.sink` as ``on_chunk`` when a language model drafts a
reply; the web chat's event stream (`flowdesk.server.ui.chat`) watches the thread and
forwards each piece to the page. Only the final answer is durable (the model step records
it); the pieces reach watchers in the process that runs the step (``flowdesk serve`` with
its embedded worker). A page served by another process still gets the whole reply from the
transcript.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from flowdesk.models import base as models

__all__ = ["Drafts"]

MAX_PENDING = 2000
"""Pieces kept for a watcher that does not read; later ones are dropped for it."""


class Drafts:
    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue[models.Chunk]]] = {}

    def sink(self, thread_id: str) -> models.ChunkSink:
        """An ``on_chunk`` that hands each piece to the thread's watchers."""

        async def push(chunk: models.Chunk) -> None:
            for queue in list(self._watchers.get(thread_id, ())):
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(chunk)

        return push

    def watch(self, thread_id: str) -> asyncio.Queue[models.Chunk]:
        """A queue that receives the thread's pieces until `unwatch`."""
        queue: asyncio.Queue[models.Chunk] = asyncio.Queue(MAX_PENDING)
        self._watchers.setdefault(thread_id, set()).add(queue)
        return queue

    def unwatch(self, thread_id: str, queue: asyncio.Queue[models.Chunk]) -> None:
        found = self._watchers.get(thread_id)
        if found is not None:
            found.discard(queue)
            if not found:
                del self._watchers[thread_id]

    @contextlib.contextmanager
    def watching(self, thread_id: str) -> Iterator[asyncio.Queue[models.Chunk]]:
        queue = self.watch(thread_id)
        try:
            yield queue
        finally:
            self.unwatch(thread_id, queue)
