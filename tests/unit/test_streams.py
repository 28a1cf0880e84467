"""Event-stream consumers against the real servers of this machine: Redis Streams
(127.0.0.1:6379) and NATS JetStream (127.0.0.1:4222), on both stores; Kafka without a
broker (none runs here). Each test uses stream, subject and group names of its own. When
Redis or NATS does not answer, these tests fail: they are never skipped.

The consumers killed before their ack (real processes, SIGKILL) are in
tests/acceptance/test_triggers_kill.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from aiokafka.structs import ConsumerRecord, TopicPartition
from nats.js.api import StreamConfig
from pydantic import BaseModel, Field

import flowdesk
from flowdesk import errors
from flowdesk.triggers import kafka as kafka_source
from flowdesk.triggers import nats as nats_source
from flowdesk.triggers import redis as redis_source
from flowdesk.triggers import streams

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"


class Order(BaseModel):
    order_id: str
    amount: int = Field(ge=0)


def register(app: flowdesk.App) -> None:
    @app.workflow("take_order")
    async def take_order(ctx: flowdesk.Context, order: Order) -> int:
        return order.amount


def orders(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"order_id": f"o{i}", "amount": i}).encode() for i in range(start, n)]


async def run_keys(app: flowdesk.App) -> list[str]:
    return sorted(r.idempotency_key or "" for r in (await app.list_runs(limit=500)).items)


@contextlib.asynccontextmanager
async def consuming(consumer: streams.StreamConsumer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 30)


class SlowStarts(flowdesk.App):
    """A real App whose starts take a while, and that counts how many overlap: the probe
    of the consumers' bound on starts in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.active = 0
        self.most = 0
        self.samples: list[int] = []  # what the broker says is unacknowledged, per start
        self.sample: Any = None

    async def start(self, *args: Any, **kwargs: Any) -> flowdesk.RunHandle:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            if self.sample is not None:
                self.samples.append(await self.sample())
            await asyncio.sleep(0.05)
            return await super().start(*args, **kwargs)
        finally:
            self.active -= 1


# -- Redis ----------------------------------------------------------------------------------


@pytest.fixture
async def rds() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        pytest.fail(
            f"These tests need Redis at {REDIS_URL} and it does not answer ({exc}). Start it "
            "(.ci/run shows how).",
            pytrace=False,
        )
    made: list[str] = []
    client.made = made  # type: ignore[attr-defined]
    yield client
    if made:
        await client.delete(*made, *(f"{k}:dead" for k in made))
    await client.aclose()


def redis_names(rds: aioredis.Redis) -> tuple[str, str]:
    stream = f"flowdesk-test:{uuid.uuid4().hex[:12]}"
    rds.made.append(stream)  # type: ignore[attr-defined]
    return stream, f"g-{uuid.uuid4().hex[:8]}"


class AckProbe(redis_source.RedisStreamConsumer):
    """Checks, at each ack, that the message's run is already in the store."""

    acked_with_run: list[bool]

    async def ack(self, message: streams.Message) -> None:
        key = message.key(self.workflow)
        keys = await run_keys(self.app)
        self.acked_with_run.append(key in keys)
        await super().ack(message)


async def test_redis_each_entry_starts_one_run_acked_after_the_start(app, rds, wait_until):
    register(app)
    stream, group = redis_names(rds)
    ids = [(await rds.xadd(stream, {"data": body})).decode() for body in orders(5)]
    consumer = AckProbe(app, workflow="take_order", stream=stream, group=group, poll_seconds=0.1)
    consumer.acked_with_run = []
    async with app, consuming(consumer):
        await wait_until(lambda: consumer.stats.started == 5, what="5 runs started")

        async def acked() -> bool:
            return (await rds.xpending(stream, group))["pending"] == 0

        await wait_until(acked, what="every entry acknowledged")
        assert await run_keys(app) == sorted(f"redis:{stream}:{i}:take_order" for i in ids)
        runs = (await app.list_runs()).items
        assert sorted(r.input["order_id"] for r in runs) == [f"o{i}" for i in range(5)]
    assert consumer.acked_with_run == [True] * 5
    assert consumer.stats.dead_lettered == 0 and consumer.stats.duplicates == 0


async def test_redis_invalid_entries_are_dead_lettered_with_the_reason(app, rds, wait_until):
    register(app)
    stream, group = redis_names(rds)
    bad_input = json.dumps({"order_id": "x", "amount": -1}).encode()
    ids = [
        (await rds.xadd(stream, fields)).decode()
        for fields in ({"data": b"{not json"}, {"data": bad_input}, {"other": b"{}"})
    ]
    await rds.xadd(stream, {"data": orders(1)[0]})
    consumer = redis_source.RedisStreamConsumer(
        app, workflow="take_order", stream=stream, group=group, poll_seconds=0.1
    )
    async with app, consuming(consumer):
        await wait_until(lambda: consumer.stats.received == 4, what="4 entries handled")
        await wait_until(lambda: consumer.stats.dead_lettered == 3, what="3 dead letters")
        await wait_until(lambda: consumer.stats.started == 1, what="1 run started")
        assert len(await run_keys(app)) == 1
    dead = {f[b"id"].decode(): f for _, f in await rds.xrange(f"{stream}:dead")}
    assert sorted(dead) == sorted(ids)
    reasons = {i: dead[i][b"reason"].decode() for i in ids}
    assert "not JSON" in reasons[ids[0]]
    assert "amount" in reasons[ids[1]] and "greater than or equal to 0" in reasons[ids[1]]
    assert reasons[ids[2]] == "the entry has no 'data' field"
    assert {f[b"stream"].decode() for f in dead.values()} == {stream}
    assert dead[ids[1]][b"data"] == bad_input
    assert (await rds.xpending(stream, group))["pending"] == 0


async def test_redis_takes_over_the_entries_a_dead_consumer_left(app, rds, wait_until):
    register(app)
    stream, group = redis_names(rds)
    await rds.xgroup_create(stream, group, id="0", mkstream=True)
    for body in orders(3):
        await rds.xadd(stream, {"data": body})
    # A consumer that read everything and died before acknowledging anything.
    taken = await rds.xreadgroup(group, "ghost", {stream: ">"}, count=10)
    assert len(taken[0][1]) == 3
    consumer = redis_source.RedisStreamConsumer(
        app,
        workflow="take_order",
        stream=stream,
        group=group,
        consumer="heir",
        claim_idle=0.2,
        poll_seconds=0.1,
    )
    async with app, consuming(consumer):
        await wait_until(lambda: consumer.stats.started == 3, what="the ghost's entries started")

        async def acked() -> bool:
            return (await rds.xpending(stream, group))["pending"] == 0

        await wait_until(acked, what="the ghost's entries acknowledged")
    assert len(await run_keys(app)) == 3


async def test_a_redelivered_message_finds_the_run_it_started(app, rds):
    register(app)
    stream, group = redis_names(rds)
    consumer = redis_source.RedisStreamConsumer(
        app, workflow="take_order", stream=stream, group=group
    )
    body = orders(1)[0]
    message = streams.Message(
        source="redis", stream=stream, id="17-0", body=body, raw={b"data": body}
    )
    async with app:
        await consumer.connect()
        try:
            first = await consumer.handle(message)
            again = await consumer.handle(message)
        finally:
            await consumer.close()
    assert first is not None and first == again
    assert consumer.stats.started == 1 and consumer.stats.duplicates == 1
    assert await run_keys(app) == [f"redis:{stream}:17-0:take_order"]


async def test_redis_never_has_more_than_max_in_flight_unacknowledged(db_url, rds, wait_until):
    app = SlowStarts(db_url, poll_interval=0.05)
    register(app)
    stream, group = redis_names(rds)
    for body in orders(12):
        await rds.xadd(stream, {"data": body})

    async def pending() -> int:
        return int((await rds.xpending(stream, group))["pending"])

    app.sample = pending
    consumer = redis_source.RedisStreamConsumer(
        app, workflow="take_order", stream=stream, group=group, max_in_flight=3, poll_seconds=0.1
    )
    async with app, consuming(consumer):
        await wait_until(lambda: consumer.stats.started == 12, what="12 runs started")
    assert app.most == 3  # the bound was reached, and never passed
    assert max(app.samples) <= 3 and len(app.samples) == 12
    assert consumer.stats.max_in_flight_seen == 3


async def test_redis_unreachable_is_a_clear_error(app):
    register(app)
    consumer = redis_source.RedisStreamConsumer(
        app, workflow="take_order", stream="s", group="g", url="redis://127.0.0.1:9/0"
    )
    with pytest.raises(errors.SourceUnavailable, match="cannot be reached"):
        await consumer.connect()


# -- NATS JetStream ---------------------------------------------------------------------------


@pytest.fixture
async def js() -> AsyncIterator[Any]:
    async def quiet(exc: Exception) -> None:
        return None

    try:
        nc = await nats.connect(
            NATS_URL, connect_timeout=2, max_reconnect_attempts=1, error_cb=quiet
        )
    except Exception as exc:
        pytest.fail(
            f"These tests need NATS with JetStream at {NATS_URL} and it does not answer "
            f"({exc!r}). Start it (.ci/run shows how).",
            pytrace=False,
        )
    context = nc.jetstream()
    made: list[str] = []
    context.made = made
    yield context
    for name in made:
        for stream in (name, f"{name}_DEAD"):
            with contextlib.suppress(Exception):
                await context.delete_stream(stream)
    await nc.close()


async def nats_stream(js: Any) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    name = f"FDTEST_{tag}"
    js.made.append(name)
    await js.add_stream(StreamConfig(name=name, subjects=[f"fdtest.{tag}.>"]))
    return name, f"fdtest.{tag}"


async def test_nats_each_message_starts_one_run_acked_after_the_start(app, js, wait_until):
    register(app)
    stream, prefix = await nats_stream(js)
    seqs = [(await js.publish(f"{prefix}.orders", body)).seq for body in orders(5)]
    consumer = nats_source.NatsConsumer(
        app,
        workflow="take_order",
        stream=stream,
        subject=f"{prefix}.orders",
        durable="takers",
        poll_seconds=0.2,
    )
    async with app, consuming(consumer):
        await wait_until(lambda: consumer.stats.started == 5, what="5 runs started")

        async def acked() -> bool:
            info = await js.consumer_info(stream, "takers")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await wait_until(acked, what="every message acknowledged")
    assert await run_keys(app) == sorted(f"nats:{stream}:{s}:take_order" for s in seqs)


async def test_nats_invalid_messages_are_termed_and_dead_lettered(app, js, wait_until):
    register(app)
    stream, prefix = await nats_stream(js)
    await js.publish(f"{prefix}.orders", b"[1, 2")
    await js.publish(f"{prefix}.orders", json.dumps({"order_id": 7}).encode())
    await js.publish(f"{prefix}.orders", orders(1)[0])
    consumer = nats_source.NatsConsumer(
        app,
        workflow="take_order",
        stream=stream,
        subject=f"{prefix}.orders",
        durable="takers",
        ack_wait=1,
        poll_seconds=0.2,
    )
    async with app, consuming(consumer):
        await wait_until(lambda: consumer.stats.dead_lettered == 2, what="2 dead letters")
        await wait_until(lambda: consumer.stats.started == 1, what="1 run started")
        await asyncio.sleep(1.5)  # past ack_wait: a terminated message is not redelivered
        assert consumer.stats.received == 3
        info = await js.consumer_info(stream, "takers")
        assert info.num_ack_pending == 0 and info.num_redelivered == 0
    dead_subject = f"flowdesk.dead.{stream}"
    assert await js.find_stream_name_by_subject(dead_subject) == f"{stream}_DEAD"
    first = await js.get_msg(f"{stream}_DEAD", 1)
    second = await js.get_msg(f"{stream}_DEAD", 2)
    assert first.data == b"[1, 2" and "not JSON" in first.headers["Flowdesk-Dead-Reason"]
    assert "order_id" in second.headers["Flowdesk-Dead-Reason"]
    assert first.headers["Flowdesk-Stream"] == stream and first.headers["Flowdesk-Sequence"] == "1"
    assert len(await run_keys(app)) == 1


async def test_nats_never_has_more_than_max_in_flight_unacknowledged(db_url, js, wait_until):
    app = SlowStarts(db_url, poll_interval=0.05)
    register(app)
    stream, prefix = await nats_stream(js)
    for body in orders(12):
        await js.publish(f"{prefix}.orders", body)
    consumer = nats_source.NatsConsumer(
        app,
        workflow="take_order",
        stream=stream,
        subject=f"{prefix}.orders",
        durable="takers",
        max_in_flight=3,
        poll_seconds=0.2,
    )

    async def unacked() -> int:
        return int((await js.consumer_info(stream, "takers")).num_ack_pending)

    app.sample = unacked
    async with app, consuming(consumer):
        await wait_until(lambda: consumer.stats.started == 12, what="12 runs started")
    assert app.most == 3 and max(app.samples) <= 3 and len(app.samples) == 12


async def test_nats_configuration_and_missing_stream_are_clear_errors(app, js):
    register(app)
    with pytest.raises(errors.ConfigurationError):
        nats_source.NatsConsumer(app, workflow="take_order", stream="a.b", subject="x", durable="d")
    consumer = nats_source.NatsConsumer(
        app, workflow="take_order", stream="FDTEST_NO_SUCH_STREAM", subject="x.y", durable="d"
    )
    with pytest.raises(errors.ConfigurationError, match="no stream"):
        await consumer.connect()


# -- Kafka: no broker here ----------------------------------------------------------------------


class FakeKafka:
    """The four calls of aiokafka's consumer this module makes, over records given up front.
    ``commit`` checks that the run of every record before the committed offset exists."""

    def __init__(self, app: flowdesk.App, records: list[ConsumerRecord[Any, Any]]) -> None:
        self.app = app
        self.records = list(records)
        self.commits: list[tuple[int, int]] = []
        self.commit_after_start: list[bool] = []
        self.seeks: list[tuple[Any, int]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Any]]:
        if not self.records:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        batch, self.records = self.records[: max_records or 1], self.records[max_records or 1 :]
        out: dict[Any, list[Any]] = {}
        for r in batch:
            out.setdefault(TopicPartition(r.topic, r.partition), []).append(r)
        return out

    async def commit(self, offsets: dict[Any, int] | None = None) -> None:
        keys = await run_keys(self.app)
        for tp, position in (offsets or {}).items():
            self.commits.append((tp.partition, position))
            for offset in range(position):
                key = f"kafka:{tp.topic}:{tp.partition}:{offset}:take_order"
                self.commit_after_start.append(key in keys or (tp.partition, offset) in BAD)

    def seek(self, partition: Any, offset: int) -> None:
        self.seeks.append((partition, offset))


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, dict[str, bytes]]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send_and_wait(self, topic: str, value: bytes | None = None, **kw: Any) -> None:
        self.sent.append((topic, value, dict(kw.get("headers") or [])))


BAD = {(1, 1), (1, 2)}  # dead-lettered: no run, yet their offsets are committed


def record(partition: int, offset: int, value: bytes | None) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic="orders",
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value or b""),
        headers=(),
    )


async def test_kafka_commits_offsets_only_after_the_runs_are_started(app, wait_until):
    register(app)
    records = [record(0, i, body) for i, body in enumerate(orders(5))]
    records += [record(1, 0, orders(6, 5)[0]), record(1, 1, b"not json"), record(1, 2, None)]
    fake, producer = FakeKafka(app, records), FakeProducer()
    consumer = kafka_source.KafkaConsumer(
        app,
        workflow="take_order",
        topic="orders",
        group="g",
        max_in_flight=3,
        poll_seconds=0.05,
        client=fake,
        producer=producer,
    )
    async with app, consuming(consumer):
        await wait_until(lambda: consumer.stats.received == 8, what="8 records handled")
        await wait_until(
            lambda: consumer.offsets.position(TopicPartition("orders", 1)) == 3,
            what="partition 1 committed to its end",
        )
        await wait_until(lambda: (0, 5) in fake.commits, what="partition 0 committed")
    assert fake.commit_after_start and all(fake.commit_after_start)
    assert consumer.stats.started == 6 and consumer.stats.dead_lettered == 2
    keys = await run_keys(app)
    assert "kafka:orders:0:4:take_order" in keys and "kafka:orders:1:0:take_order" in keys
    assert [topic for topic, _, _ in producer.sent] == ["orders.dead", "orders.dead"]
    headers = producer.sent[0][2]
    assert b"not JSON" in headers["flowdesk-dead-reason"] and headers["flowdesk-offset"] == b"1"
    for partition in (0, 1):
        positions = [p for part, p in fake.commits if part == partition]
        assert positions == sorted(positions)  # commits never move back


def test_kafka_offsets_wait_for_the_first_record_still_in_flight():
    offsets = kafka_source.Offsets()
    tp = TopicPartition("t", 0)
    for offset in range(10, 15):
        offsets.fetched(tp, offset)
    assert offsets.done(tp, 12) is None  # 10 and 11 are not started yet
    assert offsets.done(tp, 11) is None
    assert offsets.done(tp, 10) == 13
    assert offsets.done(tp, 14) is None  # 13 still in flight
    assert offsets.done(tp, 13) == 15
    assert offsets.position(tp) == 15


async def test_kafka_configuration_is_checked(app):
    register(app)
    bad: list[dict[str, Any]] = [
        {"topic": "", "group": "g"},
        {"topic": "t", "group": ""},
        {"topic": "t", "group": "g", "bootstrap_servers": "nohost"},
        {"topic": "t", "group": "g", "bootstrap_servers": "h:99999"},
        {"topic": "t", "group": "g", "bootstrap_servers": ""},
        {"topic": "t", "group": "g", "auto_offset_reset": "middle"},
        {"topic": "t", "group": "g", "max_in_flight": 0},
    ]
    for kwargs in bad:
        with pytest.raises(errors.ConfigurationError):
            kafka_source.KafkaConsumer(app, workflow="take_order", **kwargs)
    with pytest.raises(errors.UnknownWorkflow):
        kafka_source.KafkaConsumer(app, workflow=len, topic="t", group="g")


async def test_kafka_unreachable_broker_is_a_clear_error(app):
    register(app)
    consumer = kafka_source.KafkaConsumer(
        app, workflow="take_order", topic="t", group="g", bootstrap_servers="127.0.0.1:9"
    )
    async with app:
        with pytest.raises(errors.SourceUnavailable, match="Kafka at 127.0.0.1:9 cannot be"):
            await consumer.run()
