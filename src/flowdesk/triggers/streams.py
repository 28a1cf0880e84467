"""Event streams: the consumer loop that NATS JetStream, Redis Streams and Kafka share.

The contract every source keeps:

1. **Acknowledge after the start is durable.** A message is acknowledged (NATS ack, Redis
   ``XACK``, Kafka offset commit) only after `App.start` returned, that is after the run's
   transaction committed. A consumer that dies before its ack leaves the message to be
   delivered again.
2. **One run per message, however often it is delivered.** The run's idempotency key is
   ``<source>:<stream>:<message id>:<workflow>`` (the Redis entry id, the JetStream stream
   sequence, the Kafka partition and offset), so a redelivered message finds the run its
   first delivery started. A stream deleted and created again under the same name restarts
   its ids: give it a new name.
3. **Backpressure.** At most ``max_in_flight`` messages are between fetch and ack at once:
   the loop fetches only as many as it has room for, so when the store is slow, messages
   wait in the broker, not in this process.
4. **Nothing is lost silently.** The body must be JSON that the workflow's input model
   accepts (or ``to_input`` maps it to such input). A message that does not fit is
   dead-lettered with the reason (each source says where), then acknowledged, and counted
   in `Stats.dead_lettered`. A store that fails (down, locked) leaves the message
   unacknowledged: it is delivered again later (`Stats.retried`).

Starts run concurrently, so runs may be created in another order than the messages came.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.triggers import crash

log = logging.getLogger("flowdesk.triggers")

AFTER_START = "stream:after_start"


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One delivery of a stream message."""

    source: str  # "nats", "redis", "kafka"
    stream: str  # the JetStream stream, the Redis stream key, the Kafka topic
    id: str  # the stream sequence, the entry id, "<partition>:<offset>"
    body: bytes
    deliveries: int | None = None  # how often it was delivered, when the source says
    raw: Any = field(default=None, compare=False, repr=False)  # the client's own object

    def key(self, workflow: str) -> str:
        """The idempotency key of the run this message starts."""
        return f"{self.source}:{self.stream}:{self.id}:{workflow}"


@dataclass(slots=True)
class Stats:
    """What a consumer did since it started."""

    received: int = 0
    started: int = 0  # runs this consumer created
    duplicates: int = 0  # messages whose run already existed (a redelivery)
    dead_lettered: int = 0
    retried: int = 0  # start failed; left unacknowledged for redelivery
    in_flight: int = 0
    max_in_flight_seen: int = 0


ToInput = Callable[[Message], Any]


class StreamConsumer(ABC):
    """Reads a stream with a consumer group and starts one run of ``workflow`` per message.

    Subclasses say how to connect, fetch, acknowledge and dead-letter; `run` does the rest.
    ``to_input(message)`` maps a message to the workflow's input (default: the JSON body);
    raising ``ValueError`` or ``TypeError`` dead-letters the message with that reason.
    """

    source: ClassVar[str] = "stream"

    def __init__(
        self,
        app: App,
        *,
        workflow: str | Callable[..., Any],
        max_in_flight: int = 16,
        to_input: ToInput | None = None,
        poll_seconds: float = 1.0,
        retry_seconds: float = 1.0,
    ) -> None:
        if max_in_flight < 1:
            raise errors.ConfigurationError("max_in_flight must be >= 1")
        if poll_seconds <= 0 or retry_seconds < 0:
            raise errors.ConfigurationError("poll_seconds must be > 0 and retry_seconds >= 0")
        self.app = app
        self.workflow = app.workflow_name(workflow)
        self.max_in_flight = max_in_flight
        self.to_input = to_input
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self.stats = Stats()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: set[str] = set()
        self._fatal: BaseException | None = None

    # -- what each source provides ------------------------------------------------------
    @abstractmethod
    async def connect(self) -> None:
        """Connect and make sure the consumer group exists (raises `SourceUnavailable`)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def fetch(self, room: int) -> list[Message]:
        """Up to ``room`` messages; waits at most about ``poll_seconds`` for some."""

    @abstractmethod
    async def ack(self, message: Message) -> None:
        """The run is started: the message is done."""

    @abstractmethod
    async def dead_letter(self, message: Message, reason: str) -> None:
        """Keep the message somewhere durable with ``reason``, then acknowledge it."""

    async def retry_later(self, message: Message) -> None:
        """The start failed (the store): have the message delivered again. By default it
        stays unacknowledged and the broker delivers it again after its timeout."""
        log.debug("%s message %s stays unacknowledged", self.source, message.id)

    # -- the loop --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop fetching; `run` returns once the messages in flight are done. Idempotent."""
        self._stopping.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        """Consume until `stop` (or a fatal error, which is raised)."""
        await self.app.open()
        await self.connect()
        try:
            while not self._stopping.is_set() and self._fatal is None:
                room = self.max_in_flight - len(self._tasks)
                if room <= 0:
                    await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                    continue
                messages = await self._fetch_unless_stopped(room)
                for message in messages:
                    if message.id in self._in_flight:
                        continue  # already being handled here (claimed again while slow)
                    self._in_flight.add(message.id)
                    task = asyncio.create_task(self._guarded(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            if self._tasks:
                await asyncio.wait(set(self._tasks))
            await self.close()
        if self._fatal is not None:
            raise self._fatal

    async def _fetch_unless_stopped(self, room: int) -> list[Message]:
        fetching = asyncio.ensure_future(self.fetch(room))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({fetching, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not fetching.done():
            fetching.cancel()
            try:
                await fetching
            except asyncio.CancelledError:
                pass
            return []  # anything it had fetched is delivered again after the ack timeout
        return fetching.result()

    async def _guarded(self, message: Message) -> None:
        self.stats.in_flight = len(self._in_flight)
        self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, self.stats.in_flight)
        try:
            await self.handle(message)
        except (errors.ConfigurationError, errors.UnknownWorkflow) as exc:
            log.error("stopping the %s consumer: %s", self.source, exc)
            self._fatal = exc
            self._stopping.set()
        except Exception:
            log.exception("%s message %s: unexpected error", self.source, message.id)
            self.stats.retried += 1
        finally:
            self._in_flight.discard(message.id)
            self.stats.in_flight = len(self._in_flight)

    def decode(self, message: Message) -> Any:
        """The workflow input a message carries (raises ValueError with the reason)."""
        if self.to_input is not None:
            try:
                return self.to_input(message)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"to_input refused it: {exc}") from None
        try:
            return json.loads(message.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"the body is not JSON: {exc}") from None

    async def handle(self, message: Message) -> str | None:
        """Start the message's run, then acknowledge it; returns the run id (None when the
        message was dead-lettered or left for redelivery)."""
        self.stats.received += 1
        try:
            value = self.decode(message)
        except ValueError as exc:
            await self._dead(message, str(exc))
            return None
        try:
            handle = await self.app.start(
                self.workflow, value, idempotency_key=message.key(self.workflow)
            )
        except errors.InvalidInput as exc:
            await self._dead(message, str(exc))
            return None
        except (errors.IdempotencyConflict, errors.SerializationError) as exc:
            await self._dead(message, str(exc))
            return None
        except (errors.ConfigurationError, errors.UnknownWorkflow):
            raise
        except Exception as exc:
            log.warning(
                "%s message %s: the run could not be started (%s); it stays unacknowledged "
                "and comes again",
                self.source,
                message.id,
                exc,
            )
            self.stats.retried += 1
            await self.retry_later(message)
            return None
        if handle.created:
            self.stats.started += 1
        else:
            self.stats.duplicates += 1
        crash.point(AFTER_START)
        await self.ack(message)
        return handle.id

    async def _dead(self, message: Message, reason: str) -> None:
        log.warning("%s message %s dead-lettered: %s", self.source, message.id, reason)
        await self.dead_letter(message, reason)
        self.stats.dead_lettered += 1
