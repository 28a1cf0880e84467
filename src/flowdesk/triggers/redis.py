"""Redis Streams: a consumer group that starts one run per stream entry.

Each entry carries its JSON in one field (``field``, default ``data``; ``field=None`` takes
the whole entry, its values as strings). The consumer reads with ``XREADGROUP`` and
acknowledges with ``XACK`` only after the run is durably started (`flowdesk.triggers.streams`
has the contract). Entries that another consumer of the group read but never acknowledged
(it died) are taken over with ``XAUTOCLAIM`` once they have been idle ``claim_idle``
seconds; a consumer that restarts under the same name first reads its own unacknowledged
entries at once (so give each replica a stable ``consumer`` name; the default, host and pid,
changes on every restart and leaves the takeover to ``XAUTOCLAIM``). The idempotency key of
an entry's run is ``redis:<stream>:<entry id>:<workflow>``.

A message that is not JSON, or not the workflow's input, is added to ``<stream>:dead``
(``dead_stream``) with fields ``stream``, ``group``, ``id``, ``reason``, ``data`` and
``dead_at`` (epoch ms), and acknowledged in the same ``MULTI``/``EXEC``.

Needs the ``redis`` extra (``pip install 'flowdesk[redis]'``) and Redis 6.2 or newer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.triggers import streams


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisStreamConsumer(streams.StreamConsumer):
    source = "redis"

    def __init__(
        self,
        app: App,
        *,
        workflow: str | Callable[..., Any],
        stream: str,
        group: str,
        url: str = "redis://127.0.0.1:6379/0",
        consumer: str | None = None,
        field: str | None = "data",
        dead_stream: str | None = None,
        claim_idle: float = 30.0,
        start_id: str = "0",
        max_in_flight: int = 16,
        to_input: streams.ToInput | None = None,
        poll_seconds: float = 1.0,
    ) -> None:
        super().__init__(
            app,
            workflow=workflow,
            max_in_flight=max_in_flight,
            to_input=to_input,
            poll_seconds=poll_seconds,
        )
        if not stream or not group:
            raise errors.ConfigurationError("A Redis stream consumer needs a stream and a group.")
        if claim_idle <= 0:
            raise errors.ConfigurationError("claim_idle must be > 0 seconds")
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.field = field
        self.dead_stream = dead_stream or f"{stream}:dead"
        self.claim_idle = claim_idle
        self.start_id = start_id
        self._client: aioredis.Redis | None = None
        self._own_cursor: str | None = "0"  # first, what this name left unacknowledged
        self._claim_cursor = "0-0"
        self._next_claim = 0.0

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise errors.ConfigurationError("The Redis consumer is not connected.")
        return self._client

    async def connect(self) -> None:
        client = aioredis.from_url(self.url, socket_connect_timeout=5)
        try:
            await client.ping()
            try:
                await client.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            await client.aclose()
            raise errors.SourceUnavailable(
                f"Redis at {self.url} cannot be reached: {exc}. Check the URL and that Redis runs."
            ) from exc
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _message(self, entry_id: Any, fields: Any) -> streams.Message:
        ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        body: bytes
        values = fields or {}
        if self.field is None:
            body = json.dumps(
                {_text(k): _text(v) for k, v in values.items()}, ensure_ascii=False
            ).encode()
        else:
            raw = values.get(self.field.encode(), values.get(self.field))
            body = b"" if raw is None else raw if isinstance(raw, bytes) else str(raw).encode()
        return streams.Message(
            source=self.source, stream=self.stream, id=ident, body=body, raw=values
        )

    def decode(self, message: streams.Message) -> Any:
        if self.field is not None and self.to_input is None:
            fields = message.raw or {}
            if self.field.encode() not in fields and self.field not in fields:
                raise ValueError(f"the entry has no {self.field!r} field")
        return super().decode(message)

    async def fetch(self, room: int) -> list[streams.Message]:
        client = self.client
        if self._own_cursor is not None:
            # What this consumer name read in an earlier life and never acknowledged.
            reply: Any = await client.xreadgroup(
                self.group, self.consumer, {self.stream: self._own_cursor}, count=room
            )
            entries = _entries(reply)
            if not entries:
                self._own_cursor = None
            else:
                self._own_cursor = _text(entries[-1][0])
                found = await self._messages(entries)
                if found:
                    return found
        if time.monotonic() >= self._next_claim:
            claimed: Any = await client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=int(self.claim_idle * 1000),
                start_id=self._claim_cursor,
                count=room,
            )
            self._claim_cursor = _text(claimed[0])
            if self._claim_cursor == "0-0":  # a full pass: look again in a while
                self._next_claim = time.monotonic() + min(self.claim_idle / 2, 5.0)
            found = await self._messages([tuple(e) for e in claimed[1]])
            if found:
                return found
        reply = await client.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=room,
            block=max(1, int(self.poll_seconds * 1000)),
        )
        return await self._messages(_entries(reply))

    async def _messages(self, entries: list[tuple[Any, Any]]) -> list[streams.Message]:
        """Messages of the entries; entries deleted from the stream meanwhile (no fields)
        are acknowledged, so that they leave the group's pending list."""
        gone = [entry_id for entry_id, fields in entries if fields is None]
        if gone:
            await self.client.xack(self.stream, self.group, *gone)
        return [self._message(i, f) for i, f in entries if f is not None]

    async def ack(self, message: streams.Message) -> None:
        await self.client.xack(self.stream, self.group, message.id)

    async def dead_letter(self, message: streams.Message, reason: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.dead_stream,
                {
                    "stream": self.stream,
                    "group": self.group,
                    "id": message.id,
                    "reason": reason,
                    "data": message.body,
                    "dead_at": str(int(time.time() * 1000)),
                },
            )
            pipe.xack(self.stream, self.group, message.id)
            await pipe.execute()


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """The (id, fields) entries of an XREADGROUP reply for one stream."""
    if not reply:
        return []
    return [tuple(entry) for entry in reply[0][1]]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
