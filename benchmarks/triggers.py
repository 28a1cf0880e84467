"""Trigger benchmark: how fast each trigger turns work into durably started runs.

    python benchmarks/triggers.py [--messages 2000] [--hooks 500] [--files 200]
                                  [--stores sqlite,postgres] [--in-flight 16,64]

For each store (a new SQLite file in WAL mode with synchronous=FULL; a new PostgreSQL
database on ``$FLOWDESK_BENCH_POSTGRES``, default ``postgresql://postgres@127.0.0.1:5432/postgres``)
it prints, without a worker (only the starts are measured):

* Redis Streams and NATS JetStream: messages/s from "all published" to "all started and
  acknowledged", for each ``--in-flight`` bound (needs Redis on 6379 and NATS on 4222);
* webhooks: signed deliveries/s through the ASGI app (16 senders at once), each verified,
  remembered and its run started in one transaction;
* file drop: files/s from "all dropped" to "all started" (hash, move, start).

Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
import redis.asyncio as aioredis
from nats.js.api import StreamConfig

import flowdesk
from flowdesk.governance import audit as audit_log
from flowdesk.server import app as server
from flowdesk.triggers import filedrop, streams, webhooks
from flowdesk.triggers import nats as nats_source
from flowdesk.triggers import redis as redis_source

PG = os.environ.get("FLOWDESK_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def make_app(url: str) -> flowdesk.App:
    app = flowdesk.App(url)

    @app.workflow("take")
    async def take(ctx: flowdesk.Context, n: int) -> int:
        return n

    @app.workflow("ingest")
    async def ingest(ctx: flowdesk.Context, file: filedrop.DroppedFile) -> str:
        return file.name

    return app


@asynccontextmanager
async def database(kind: str, folder: Path) -> AsyncIterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'bench-{secrets.token_hex(4)}.db'}"
        return
    name = f"flowdesk_bench_{secrets.token_hex(6)}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def until(predicate: Callable[[], Any], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark did not finish")
        await asyncio.sleep(0.01)


async def drain(consumer: streams.StreamConsumer, n: int) -> float:
    """Seconds until ``consumer`` has started ``n`` runs (everything already published)."""
    t0 = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    await until(lambda: consumer.stats.started >= n or task.done())
    elapsed = time.perf_counter() - t0
    consumer.stop()
    await task
    return elapsed


async def bench_redis(url: str, n: int, in_flight: int) -> float:
    app = make_app(url)
    stream = f"flowdesk-bench:{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    try:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(n):
                pipe.xadd(stream, {"data": json.dumps({"n": i})})
            await pipe.execute()
        async with app:
            consumer = redis_source.RedisStreamConsumer(
                app, workflow="take", stream=stream, group="g", max_in_flight=in_flight
            )
            return n / await drain(consumer, n)
    finally:
        await client.delete(stream, f"{stream}:dead")
        await client.aclose()


async def bench_nats(url: str, n: int, in_flight: int) -> float:
    app = make_app(url)
    tag = uuid.uuid4().hex[:8]
    stream = f"FDBENCH_{tag}"
    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"fdbench.{tag}"]))
        for i in range(n):
            await js.publish(f"fdbench.{tag}", json.dumps({"n": i}).encode())
        async with app:
            consumer = nats_source.NatsConsumer(
                app,
                workflow="take",
                stream=stream,
                subject=f"fdbench.{tag}",
                durable="bench",
                max_in_flight=in_flight,
            )
            return n / await drain(consumer, n)
    finally:
        for name in (stream, f"{stream}_DEAD"):
            try:
                await js.delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass
        await nc.close()


async def bench_hooks(url: str, n: int, folder: Path) -> float:
    app = make_app(url)
    secret_file = folder / f"hook-{secrets.token_hex(4)}.secret"
    secret_file.write_text("bench-secret")
    webhooks.webhook(app, "bench", workflow="take", secret_file=secret_file)
    async with app:
        api = server.create_app(app, audit=audit_log.AuditLog(app, folder / "audit.key"))
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(n):
                queue.put_nowait(i)

            async def sender() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    body = json.dumps({"n": i}).encode()
                    headers = webhooks.signed_headers("bench-secret", body, f"d{i}")
                    r = await client.post("/hooks/bench", content=body, headers=headers)
                    assert r.status_code == 201, r.text

            t0 = time.perf_counter()
            await asyncio.gather(*(sender() for _ in range(16)))
            return n / (time.perf_counter() - t0)


async def bench_files(url: str, n: int, folder: Path) -> float:
    app = make_app(url)
    inbox = folder / f"inbox-{secrets.token_hex(4)}"
    inbox.mkdir()
    for i in range(n):
        (inbox / f"f{i}.txt").write_text(f"file {i}\n" * 100)
    async with app:
        watcher = filedrop.FileDrop(app, inbox, workflow="ingest", settle=0)
        t0 = time.perf_counter()
        await watcher.scan()
        elapsed = time.perf_counter() - t0
        assert watcher.stats.started == n
        return n / elapsed


async def main(args: argparse.Namespace) -> None:
    in_flight = [int(x) for x in args.in_flight.split(",")]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for kind in args.stores.split(","):
            row: dict[str, float] = {}
            for bound in in_flight:
                async with database(kind, folder) as url:
                    row[f"redis msgs/s (in-flight {bound})"] = await bench_redis(
                        url, args.messages, bound
                    )
                async with database(kind, folder) as url:
                    row[f"nats msgs/s (in-flight {bound})"] = await bench_nats(
                        url, args.messages, bound
                    )
            async with database(kind, folder) as url:
                row["webhook deliveries/s (16 senders)"] = await bench_hooks(
                    url, args.hooks, folder
                )
            async with database(kind, folder) as url:
                row["file drop files/s"] = await bench_files(url, args.files, folder)
            results[kind] = row
            for label, value in row.items():
                print(f"{kind:<9} {label:<36} {value:>9.0f}")
    print(json.dumps(results, indent=2), file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--hooks", type=int, default=500)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--in-flight", default="16,64")
    asyncio.run(main(parser.parse_args()))
