"""Trigger processes killed at the worst moment (SIGKILL from the crash hook
``$FLOWDESK_TRIGGER_CRASH_AT``, a real kill: no exception, no cleanup):

* a ``flowdesk consume redis`` / ``consume nats`` process after its run is durably started
  but before the message is acknowledged: the message is delivered again to the next
  consumer and still maps to exactly one run;
* a ``flowdesk watch`` process between starting a file's run and moving the file (and
  between taking the file and starting its run): the next watcher maps the file to the
  same run, nothing is started twice, the file ends in done/.

Needs Redis (127.0.0.1:6379) and NATS with JetStream (127.0.0.1:4222); the tests fail,
never skip, when they do not answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from typing import Any

import nats
import pytest
import redis
from nats.js.api import StreamConfig

from .conftest import FLOWDESK, Flow, Proc

APP = "triggerapp:app"
CRASH_ENV = "FLOWDESK_TRIGGER_CRASH_AT"


def spawn(flow: Flow, *args: str, name: str, crash_at: str | None = None) -> Proc:
    env = dict(flow.env)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return flow.procs.spawn((*FLOWDESK, *args), env=env, cwd=flow.root, name=name)


def killed_by_its_crash_hook(flow: Flow, proc: Proc) -> None:
    flow.wait_until(lambda: not proc.alive(), timeout=60, what=f"{proc.name} to crash")
    assert proc.popen.returncode == -9, proc.describe()
    assert "crash point" in proc.stderr(), proc.describe()
    proc.close_files()


def runs(flow: Flow) -> list[tuple[Any, ...]]:
    return flow.rows("SELECT id, idempotency_key, status FROM runs ORDER BY created_at")


def stopped_stats(flow: Flow, proc: Proc) -> dict[str, int]:
    assert flow.stop(proc) == 0, proc.describe()
    line = next(x for x in proc.stderr().splitlines() if x.startswith('{"stopped"'))
    stats: dict[str, int] = json.loads(line)["stopped"]
    return stats


@pytest.fixture
def rds() -> Any:
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.fail(f"Redis at 127.0.0.1:6379 does not answer ({exc}); start it.", pytrace=False)
    made: list[str] = []
    yield client, made
    if made:
        client.delete(*made, *(f"{m}:dead" for m in made))
    client.close()


@pytest.mark.timeout(90)
def test_redis_consumer_killed_before_its_ack(flow: Flow, rds: Any) -> None:
    client, made = rds
    stream, group = f"flowdesk-kill:{uuid.uuid4().hex[:10]}", "takers"
    made.append(stream)
    flow.init_db()
    entry = client.xadd(stream, {"data": json.dumps({"order_id": "k1", "amount": 5})}).decode()
    common = ["consume", "redis", "--app", APP, "--workflow", "take_order"]
    common += ["--stream", stream, "--group", group, "--claim-idle", "1"]

    first = spawn(
        flow, *common, "--consumer", "c1", "--no-worker", name="c1", crash_at="stream:after_start"
    )
    killed_by_its_crash_hook(flow, first)
    key = f"redis:{stream}:{entry}:take_order"
    started = runs(flow)
    assert [(k, s) for _, k, s in started] == [(key, "queued")]
    pending = client.xpending(stream, group)
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"c1"  # not acked

    # Another consumer of the group takes the entry over and finds the run.
    second = spawn(flow, *common, "--consumer", "c2", name="c2")
    flow.wait_until(
        lambda: client.xpending(stream, group)["pending"] == 0,
        timeout=30,
        what="the entry acknowledged by c2",
        watch=[second],
    )
    flow.wait_until(
        lambda: runs(flow)[0][2] == "succeeded", timeout=30, what="the run", watch=[second]
    )
    stats = stopped_stats(flow, second)
    assert stats["duplicates"] == 1 and stats["started"] == 0
    assert [(i, k) for i, k, _ in runs(flow)] == [(started[0][0], key)]


async def _nats(action: Any) -> Any:
    nc = await nats.connect("nats://127.0.0.1:4222", connect_timeout=2, max_reconnect_attempts=1)
    try:
        return await action(nc.jetstream())
    finally:
        await nc.close()


def nats_call(action: Any) -> Any:
    try:
        return asyncio.run(_nats(action))
    except (OSError, nats.errors.Error) as exc:
        pytest.fail(f"NATS at 127.0.0.1:4222 does not answer ({exc!r}); start it.", pytrace=False)


@pytest.mark.timeout(90)
def test_nats_consumer_killed_before_its_ack(flow: Flow) -> None:
    tag = uuid.uuid4().hex[:10]
    stream, subject = f"FDKILL_{tag}", f"fdkill.{tag}.orders"

    async def setup(js: Any) -> int:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"fdkill.{tag}.>"]))
        ack = await js.publish(subject, json.dumps({"order_id": "n1", "amount": 2}).encode())
        return int(ack.seq)

    async def consumer_state(js: Any) -> tuple[int, int, int]:
        info = await js.consumer_info(stream, "takers")  # deliveries made: consumer_seq
        return info.num_ack_pending, info.num_pending, info.delivered.consumer_seq

    async def cleanup(js: Any) -> None:
        for name in (stream, f"{stream}_DEAD"):
            try:
                await js.delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass

    flow.init_db()
    seq = nats_call(setup)
    common = ["consume", "nats", "--app", APP, "--workflow", "take_order"]
    common += ["--stream", stream, "--subject", subject, "--durable", "takers", "--ack-wait", "1"]
    try:
        first = spawn(flow, *common, "--no-worker", name="n1", crash_at="stream:after_start")
        killed_by_its_crash_hook(flow, first)
        key = f"nats:{stream}:{seq}:take_order"
        started = runs(flow)
        assert [(k, s) for _, k, s in started] == [(key, "queued")]
        assert nats_call(consumer_state)[0] == 1  # delivered, never acknowledged

        second = spawn(flow, *common, name="n2")
        flow.wait_until(
            lambda: nats_call(consumer_state)[:2] == (0, 0),
            timeout=30,
            what="the message redelivered and acknowledged",
            watch=[second],
        )
        flow.wait_until(
            lambda: runs(flow)[0][2] == "succeeded", timeout=30, what="the run", watch=[second]
        )
        stats = stopped_stats(flow, second)
        assert stats["duplicates"] == 1 and stats["started"] == 0
        assert nats_call(consumer_state)[2] == 2  # one message, delivered twice
        assert [(i, k) for i, k, _ in runs(flow)] == [(started[0][0], key)]
    finally:
        nats_call(cleanup)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("crash_at", ["filedrop:after_start", "filedrop:after_claim"])
def test_watcher_killed_before_moving_the_file(flow: Flow, crash_at: str) -> None:
    inbox = flow.root / "inbox"
    inbox.mkdir()
    content = b"one\ntwo\nthree\n"
    (inbox / "lines.txt").write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    os.utime(inbox / "lines.txt", (0, 0))  # long settled
    flow.init_db()
    common = ["watch", str(inbox), "--app", APP, "--workflow", "ingest"]
    common += ["--settle", "0", "--interval", "0.1"]

    first = spawn(flow, *common, "--no-worker", name="w1", crash_at=crash_at)
    killed_by_its_crash_hook(flow, first)
    claimed = inbox / "processing" / sha / "lines.txt"
    assert claimed.read_bytes() == content and not (inbox / "lines.txt").exists()
    before = runs(flow)
    assert len(before) == (1 if crash_at == "filedrop:after_start" else 0)

    second = spawn(flow, *common, name="w2")
    done = inbox / "done" / "lines.txt"
    flow.wait_until(done.exists, timeout=30, what="the file in done/", watch=[second])
    stats = stopped_stats(flow, second)
    after = runs(flow)
    assert [(k, s) for _, k, s in after] == [(f"filedrop:ingest:{sha}", "succeeded")]
    if before:
        assert after[0][0] == before[0][0] and stats["resumed"] == 1 and stats["started"] == 0
    else:
        assert stats["started"] == 1
    assert done.read_bytes() == content
    assert sorted(p.name for p in (inbox / "processing").iterdir()) == []
    run_id, output = flow.rows("SELECT id, output FROM runs")[0]
    assert flow.payload(run_id, 0, "output", output) == 3


def test_kafka_consumer_says_clearly_when_the_broker_cannot_be_reached(flow: Flow) -> None:
    flow.init_db()
    result = flow.cli(
        "consume", "kafka", "--app", APP, "--workflow", "take_order", "--topic", "orders",
        "--group", "g", "--bootstrap-servers", "127.0.0.1:9", "--no-worker",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "error: Kafka at 127.0.0.1:9 cannot be reached" in result.stderr
