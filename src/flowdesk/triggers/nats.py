"""NATS JetStream: a durable pull consumer that starts one run per message.

The consumer (``durable``) is created on the stream when it does not exist yet, with
explicit acks and ``ack_wait`` seconds before an unacknowledged message is delivered again;
consumers sharing the durable name share its messages (a consumer group). Each message is
acknowledged (``ack_sync``: the server confirmed it) only after its run is durably started
(`flowdesk.triggers.streams` has the contract); the idempotency key of its run is
``nats:<stream>:<stream sequence>:<workflow>``. When a start fails for a store error, the
message is ``nak``-ed to come again after ``retry_seconds``.

A message that is not JSON, or not the workflow's input, is published to the dead-letter
subject (``dead_letter_subject``, default ``flowdesk.dead.<stream>``) with headers
``Flowdesk-Dead-Reason``, ``Flowdesk-Stream``, ``Flowdesk-Sequence`` and
``Flowdesk-Subject``, then terminated (``term``: never delivered again). The publish goes
through JetStream, so some stream must capture that subject: with ``ensure_dead_stream``
(the default) the consumer creates stream ``<stream>_DEAD`` for it when none does.

Needs the ``nats`` extra (``pip install 'flowdesk[nats]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import nats
import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.triggers import streams

log = logging.getLogger("flowdesk.triggers")


def _header(value: str, limit: int = 1000) -> str:
    """A header value: one line, bounded."""
    return " ".join(value.split())[:limit]


class NatsConsumer(streams.StreamConsumer):
    source = "nats"

    def __init__(
        self,
        app: App,
        *,
        workflow: str | Callable[..., Any],
        stream: str,
        subject: str,
        durable: str,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        dead_letter_subject: str | None = None,
        ensure_dead_stream: bool = True,
        ack_wait: float = 30.0,
        max_in_flight: int = 16,
        to_input: streams.ToInput | None = None,
        poll_seconds: float = 1.0,
        retry_seconds: float = 1.0,
        connect_attempts: int = 2,
    ) -> None:
        super().__init__(
            app,
            workflow=workflow,
            max_in_flight=max_in_flight,
            to_input=to_input,
            poll_seconds=poll_seconds,
            retry_seconds=retry_seconds,
        )
        if not stream or not subject or not durable:
            raise errors.ConfigurationError(
                "A NATS consumer needs a stream, a subject and a durable name."
            )
        for label, value in (("stream", stream), ("durable", durable)):
            if any(c in value for c in ".*> \t"):
                raise errors.ConfigurationError(
                    f"NATS {label} name {value!r} must not contain '.', '*', '>' or spaces."
                )
        if ack_wait <= 0:
            raise errors.ConfigurationError("ack_wait must be > 0 seconds")
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.dead_letter_subject = dead_letter_subject or f"flowdesk.dead.{stream}"
        if any(c in self.dead_letter_subject for c in "*> \t"):
            raise errors.ConfigurationError(
                f"Dead-letter subject {self.dead_letter_subject!r}: no wildcards or spaces."
            )
        self.ensure_dead_stream = ensure_dead_stream
        self.ack_wait = ack_wait
        self.connect_attempts = connect_attempts
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc)

    async def connect(self) -> None:
        try:
            nc = await nats.connect(
                servers=self.servers,
                connect_timeout=2,
                reconnect_time_wait=1,
                max_reconnect_attempts=self.connect_attempts,
                error_cb=self._on_error,
            )
        except (OSError, nats_errors.Error, TimeoutError) as exc:
            raise errors.SourceUnavailable(
                f"NATS at {', '.join(self.servers)} cannot be reached: {exc or type(exc).__name__}."
                " Check the address and that nats-server runs with JetStream (-js)."
            ) from exc
        # Connected: from now on keep reconnecting however long the server is away (the
        # durable consumer keeps the messages meanwhile).
        nc.options["max_reconnect_attempts"] = -1
        try:
            js = nc.jetstream()
            try:
                await js.stream_info(self.stream)
            except js_errors.NotFoundError:
                raise errors.ConfigurationError(
                    f"NATS has no stream {self.stream!r}: create it (nats stream add) with "
                    f"subjects that cover {self.subject!r}."
                ) from None
            if self.ensure_dead_stream:
                try:
                    await js.find_stream_name_by_subject(self.dead_letter_subject)
                except js_errors.NotFoundError:
                    await js.add_stream(
                        name=f"{self.stream}_DEAD", subjects=[self.dead_letter_subject]
                    )
            config = ConsumerConfig(
                durable_name=self.durable,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
            )
            self._sub = await js.pull_subscribe(
                self.subject, durable=self.durable, stream=self.stream, config=config
            )
        except js_errors.Error as exc:
            await nc.close()
            raise errors.SourceUnavailable(f"NATS JetStream refused: {exc}") from exc
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js = nc, js

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = self._js = self._sub = None

    async def fetch(self, room: int) -> list[streams.Message]:
        if self._sub is None:
            raise errors.ConfigurationError("The NATS consumer is not connected.")
        try:
            msgs = await self._sub.fetch(batch=room, timeout=self.poll_seconds)
        except TimeoutError:  # nats.errors.TimeoutError, or asyncio's from a lingering pull
            return []
        out = []
        for msg in msgs:
            meta = msg.metadata
            out.append(
                streams.Message(
                    source=self.source,
                    stream=meta.stream,
                    id=str(meta.sequence.stream),
                    body=msg.data,
                    deliveries=meta.num_delivered,
                    raw=msg,
                )
            )
        return out

    @staticmethod
    def _msg(message: streams.Message) -> Msg:
        msg = message.raw
        assert isinstance(msg, Msg)
        return msg

    async def ack(self, message: streams.Message) -> None:
        await self._msg(message).ack_sync(timeout=5)

    async def retry_later(self, message: streams.Message) -> None:
        await self._msg(message).nak(delay=self.retry_seconds or None)

    async def dead_letter(self, message: streams.Message, reason: str) -> None:
        assert self._js is not None
        msg = self._msg(message)
        await self._js.publish(
            self.dead_letter_subject,
            message.body,
            headers={
                "Flowdesk-Dead-Reason": _header(reason),
                "Flowdesk-Stream": message.stream,
                "Flowdesk-Sequence": message.id,
                "Flowdesk-Subject": _header(msg.subject),
            },
        )
        await msg.term()
