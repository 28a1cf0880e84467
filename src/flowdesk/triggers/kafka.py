"""Kafka: a consumer group (aiokafka) that starts one run per record.

Same contract as the other sources (`flowdesk.triggers.streams`): auto-commit is off, and a
partition's offset is committed only up to the first record whose run is not durably
started yet, so a consumer that dies re-reads from there and every record it re-reads maps
to the run its first delivery started (idempotency key
``kafka:<topic>:<partition>:<offset>:<workflow>``). Commits are serialized and never move
back. A record whose start failed for a store error is read again (``seek``) after
``retry_seconds``. A record that is not JSON, or not the workflow's input, is produced to
``dead_letter_topic`` (default ``<topic>.dead``) with headers ``flowdesk-dead-reason``,
``flowdesk-topic``, ``flowdesk-partition`` and ``flowdesk-offset`` before its offset may be
committed.

Tested without a broker: no Kafka runs on the development machines or in CI. The tests
cover configuration checks, the record-to-start mapping and dead-lettering, the order
"start, then commit" (with aiokafka's consumer interface faked minimally, ``client=``), the
commit position with records finishing out of order, and the clear error when the broker
cannot be reached. The group protocol, rebalances and real commits against a broker are
not exercised here.

Needs the ``kafka`` extra (``pip install 'flowdesk[kafka]'``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka import errors as kafka_errors
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.triggers import streams

log = logging.getLogger("flowdesk.triggers")


class ConsumerClient(Protocol):
    """What this module uses of ``aiokafka.AIOKafkaConsumer``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Any]]: ...

    async def commit(self, offsets: dict[Any, int] | None = None) -> None: ...

    def seek(self, partition: Any, offset: int) -> None: ...


class ProducerClient(Protocol):
    """What this module uses of ``aiokafka.AIOKafkaProducer`` (dead letters)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Any: ...


class Offsets:
    """The offset each partition may commit: every record before it has its run started."""

    def __init__(self) -> None:
        self._pending: dict[Any, set[int]] = {}
        self._high: dict[Any, int] = {}
        self._position: dict[Any, int] = {}

    def fetched(self, partition: Any, offset: int) -> None:
        self._pending.setdefault(partition, set()).add(offset)
        self._high[partition] = max(self._high.get(partition, -1), offset)
        self._position.setdefault(partition, offset)  # where the group stood: nothing to commit

    def done(self, partition: Any, offset: int) -> int | None:
        """Mark a record started; returns the new commit position if it moved forward."""
        pending = self._pending.setdefault(partition, set())
        pending.discard(offset)
        position = min(pending) if pending else self._high.get(partition, offset) + 1
        if position > self._position.get(partition, -1):
            self._position[partition] = position
            return position
        return None

    def position(self, partition: Any) -> int | None:
        return self._position.get(partition)


class KafkaConsumer(streams.StreamConsumer):
    source = "kafka"

    def __init__(
        self,
        app: App,
        *,
        workflow: str | Callable[..., Any],
        topic: str,
        group: str,
        bootstrap_servers: str | list[str] = "127.0.0.1:9092",
        dead_letter_topic: str | None = None,
        auto_offset_reset: str = "earliest",
        max_in_flight: int = 16,
        to_input: streams.ToInput | None = None,
        poll_seconds: float = 1.0,
        retry_seconds: float = 1.0,
        request_timeout: float = 10.0,
        client: ConsumerClient | None = None,
        producer: ProducerClient | None = None,
    ) -> None:
        super().__init__(
            app,
            workflow=workflow,
            max_in_flight=max_in_flight,
            to_input=to_input,
            poll_seconds=poll_seconds,
            retry_seconds=retry_seconds,
        )
        servers = (
            [s.strip() for s in bootstrap_servers.split(",")]
            if isinstance(bootstrap_servers, str)
            else [s.strip() for s in bootstrap_servers]
        )
        if not servers or not all(servers):
            raise errors.ConfigurationError("Kafka needs bootstrap servers, e.g. 'host:9092'.")
        for server in servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise errors.ConfigurationError(
                    f"Kafka bootstrap server {server!r}: write it as host:port."
                )
        if not topic or not group:
            raise errors.ConfigurationError("A Kafka consumer needs a topic and a group.")
        if auto_offset_reset not in ("earliest", "latest"):
            raise errors.ConfigurationError("auto_offset_reset must be 'earliest' or 'latest'.")
        if request_timeout <= 0:
            raise errors.ConfigurationError("request_timeout must be > 0 seconds")
        self.bootstrap_servers = servers
        self.topic = topic
        self.group = group
        self.dead_letter_topic = dead_letter_topic or f"{topic}.dead"
        self.auto_offset_reset = auto_offset_reset
        self.request_timeout = request_timeout
        self._given_client = client
        self._given_producer = producer
        self._client: ConsumerClient | None = None
        self._producer: ProducerClient | None = None
        self.offsets = Offsets()
        self._commit_lock = asyncio.Lock()
        self._committed: dict[Any, int] = {}

    async def connect(self) -> None:
        timeout_ms = int(self.request_timeout * 1000)
        client: ConsumerClient = self._given_client or AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            request_timeout_ms=timeout_ms,
        )
        producer: ProducerClient = self._given_producer or AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers, request_timeout_ms=timeout_ms, acks="all"
        )
        try:
            await client.start()
            await producer.start()
        except (kafka_errors.KafkaError, OSError) as exc:
            await client.stop()
            await producer.stop()
            raise errors.SourceUnavailable(
                f"Kafka at {','.join(self.bootstrap_servers)} cannot be reached: {exc}. "
                "Check the bootstrap servers and that the brokers run."
            ) from exc
        self._client, self._producer = client, producer

    async def close(self) -> None:
        if self._client is not None:
            await self._client.stop()
            self._client = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def client(self) -> ConsumerClient:
        if self._client is None:
            raise errors.ConfigurationError("The Kafka consumer is not connected.")
        return self._client

    async def fetch(self, room: int) -> list[streams.Message]:
        batches = await self.client.getmany(
            timeout_ms=int(self.poll_seconds * 1000), max_records=room
        )
        out: list[streams.Message] = []
        for partition, records in batches.items():
            for record in records:
                self.offsets.fetched(partition, record.offset)
                out.append(
                    streams.Message(
                        source=self.source,
                        stream=record.topic,
                        id=f"{record.partition}:{record.offset}",
                        body=record.value or b"",
                        raw=record,
                    )
                )
        return out

    @staticmethod
    def _where(message: streams.Message) -> tuple[Any, int]:
        record = message.raw
        return TopicPartition(record.topic, record.partition), int(record.offset)

    async def ack(self, message: streams.Message) -> None:
        partition, offset = self._where(message)
        if self.offsets.done(partition, offset) is None:
            return  # an earlier record of the partition is still in flight
        async with self._commit_lock:
            position = self.offsets.position(partition)
            if position is None or position <= self._committed.get(partition, -1):
                return
            try:
                await self.client.commit({partition: position})
            except kafka_errors.KafkaError as exc:
                # A rebalance took the partition: its new owner reads from the last commit,
                # and the records it reads again find their runs.
                log.warning("Kafka commit of %s at %d failed: %s", partition, position, exc)
                return
            self._committed[partition] = position

    async def retry_later(self, message: streams.Message) -> None:
        partition, offset = self._where(message)
        await asyncio.sleep(self.retry_seconds)
        self.client.seek(partition, offset)

    async def dead_letter(self, message: streams.Message, reason: str) -> None:
        if self._producer is None:
            raise errors.ConfigurationError("The Kafka consumer is not connected.")
        record = message.raw
        await self._producer.send_and_wait(
            self.dead_letter_topic,
            value=message.body,
            key=record.key,
            headers=[
                ("flowdesk-dead-reason", reason.encode()[:4000]),
                ("flowdesk-topic", str(record.topic).encode()),
                ("flowdesk-partition", str(record.partition).encode()),
                ("flowdesk-offset", str(record.offset).encode()),
            ],
        )
        await self.ack(message)
