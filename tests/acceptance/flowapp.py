"""The app that the flow-control acceptance tests run in real worker processes, and the
helpers those tests share.

Queues (their limits hold across every worker process on the database):

- ``ocr``: at most 3 runs at once, at most 20 run starts in any 2 s;
- ``per_customer``: at most 1 run at once per customer (the run's ``customer`` input);
- ``serial``: at most 1 run at once, so the order runs start in is visible.

Every step writes to a *side database* (a separate SQLite file named by
``$FLOWDESK_TEST_SIDE_DB``, WAL mode, busy timeout), the way a real step writes to
another system:

- ``spans``: one row per execution of the sleeping step ``busy`` (pid, run, workflow,
  label, start, end), so a test can compute how many executions overlapped;
- ``stages``: one row per execution of a ``pipeline`` step (run, seq), so a test can tell
  which steps a forked run executed again;
- ``ticks``: one row per execution of the scheduled ``tick`` workflow's step, with the
  ``scheduled_at`` it was given.

The workers load this module as ``flowapp:app``; the tests import it for `init_side_db`,
`start_runs`, `spawn_worker` and the measuring functions, and run ``python -m flowapp
start ...`` (see `main`) as a client process.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import flowdesk

SIDE_DB_ENV = "FLOWDESK_TEST_SIDE_DB"
APP = "flowapp:app"
EVERY_SECOND = "* * * * * */1"  # croniter's sixth field is seconds

OCR_CONCURRENCY = 3
OCR_RATE = 20
OCR_WINDOW = timedelta(seconds=2)

SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    pid      INTEGER NOT NULL,
    run_id   TEXT NOT NULL,
    workflow TEXT NOT NULL,
    label    TEXT NOT NULL,
    started  REAL NOT NULL,
    ended    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stages (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    pid    INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    stage  INTEGER NOT NULL,
    at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ticks (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    pid          INTEGER NOT NULL,
    run_id       TEXT NOT NULL,
    scheduled_at TEXT NOT NULL,
    at           REAL NOT NULL
);
"""


def build(database_url: str | None = None) -> flowdesk.App:
    """A new App with every queue, step and workflow of this module."""
    app = flowdesk.App(database_url)
    app.queue("ocr", concurrency=OCR_CONCURRENCY, rate=(OCR_RATE, OCR_WINDOW))
    app.queue("per_customer", per_key_concurrency=1)
    app.queue("serial", concurrency=1)

    @app.step(name="busy")
    def busy(workflow: str, label: str) -> dict[str, Any]:
        """Sleeps 100-150 ms and records the span it was executing in."""
        info = _info()
        started = time.time()
        time.sleep(random.uniform(0.10, 0.15))
        ended = time.time()
        _write(
            "INSERT INTO spans (pid, run_id, workflow, label, started, ended) VALUES (?,?,?,?,?,?)",
            (os.getpid(), info.run_id, workflow, label, started, ended),
        )
        return {"pid": os.getpid(), "started": started, "ended": ended}

    @app.step(name="stage")
    def stage(number: int, previous: list[str]) -> list[str]:
        info = _info()
        _write(
            "INSERT INTO stages (pid, run_id, seq, stage, at) VALUES (?,?,?,?,?)",
            (os.getpid(), info.run_id, info.seq, number, time.time()),
        )
        return [*previous, f"stage-{number}"]

    @app.step(name="record_tick")
    def record_tick(scheduled_at: str) -> str:
        info = _info()
        _write(
            "INSERT INTO ticks (pid, run_id, scheduled_at, at) VALUES (?,?,?,?)",
            (os.getpid(), info.run_id, scheduled_at, time.time()),
        )
        return scheduled_at

    @app.workflow("ocr_page", queue="ocr")
    async def ocr_page(ctx: flowdesk.Context, page: int) -> dict[str, Any]:
        return await ctx.step(busy, "ocr_page", str(page))

    @app.workflow("customer_job", queue="per_customer", key="customer")
    async def customer_job(ctx: flowdesk.Context, customer: str, n: int) -> dict[str, Any]:
        return await ctx.step(busy, "customer_job", f"{customer}-{n}")

    @app.workflow("ordered", queue="serial")
    async def ordered(ctx: flowdesk.Context, label: str) -> dict[str, Any]:
        return await ctx.step(busy, "ordered", label)

    @app.workflow("pipeline")
    async def pipeline(ctx: flowdesk.Context, label: str, stages: int = 3) -> list[str]:
        done: list[str] = [label]
        for number in range(1, stages + 1):
            done = await ctx.step(stage, number, done)
        return done

    @app.workflow("approval")
    async def approval(ctx: flowdesk.Context, item: str) -> dict[str, Any]:
        decision = await ctx.wait_signal("approve")
        return {"item": item, "decision": decision}

    @app.workflow("tick", schedule=EVERY_SECOND)
    async def tick(ctx: flowdesk.Context, scheduled_at: str = "") -> str:
        return await ctx.step(record_tick, scheduled_at)

    return app


app = build()


# -- the side database ---------------------------------------------------------------
def connect_side(path: str | None = None) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path or os.environ[SIDE_DB_ENV], timeout=30, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def init_side_db(path: str) -> None:
    conn = connect_side(path)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"side database {path} did not switch to WAL (got {mode})")
        conn.executescript(SCHEMA)
    finally:
        conn.close()


_local = threading.local()


def _write(sql: str, params: tuple[Any, ...]) -> None:
    """One connection per thread: sync steps run in the worker's thread pool."""
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = connect_side()
        _local.conn = conn
    conn.execute(sql, params)


def _info() -> flowdesk.StepInfo:
    info = flowdesk.current_step()
    if info is None:
        raise flowdesk.Permanent("current_step() is None inside a step")
    return info


# -- helpers for the tests -----------------------------------------------------------
def spawn_worker(
    flow: Any,
    *,
    name: str,
    concurrency: int = 10,
    poll: float = 0.05,
    lease: float | None = None,
    ready: bool = True,
) -> Any:
    """``flowdesk worker --app flowapp:app`` as a tracked process of ``flow`` (a
    `conftest.Flow`); with ``ready``, returns once its first heartbeat is stored."""
    args = ["worker", "--app", APP, "--concurrency", str(concurrency)]
    args += ["--poll-interval", str(poll)]
    if lease is not None:
        args += ["--lease-seconds", str(lease)]
    proc = flow.spawn(*args, name=name)
    if ready:
        flow.wait_ready(proc)
    return proc


def start_runs(
    database_url: str,
    workflow: str,
    inputs: Sequence[dict[str, Any]],
    *,
    priorities: Sequence[int] | None = None,
    gap: float = 0.0,
) -> list[str]:
    """Start one run per input through the Python API (much faster than one `flowdesk
    start` process each); ``gap`` seconds apart, so their queue order is unambiguous."""

    async def go() -> list[str]:
        client = build(database_url)
        ids: list[str] = []
        async with client:
            for i, payload in enumerate(inputs):
                priority = priorities[i] if priorities is not None else 0
                handle = await client.start(workflow, payload, priority=priority)
                assert handle.created
                ids.append(handle.id)
                if gap:
                    await asyncio.sleep(gap)
        return ids

    return asyncio.run(go())


def max_overlap(spans: Iterable[tuple[float, float]]) -> int:
    """The largest number of intervals [start, end) open at one instant."""
    events: list[tuple[float, int]] = []
    for start, end in spans:
        assert end >= start, (start, end)
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # at the same instant, an end comes first
    best = open_now = 0
    for _, delta in events:
        open_now += delta
        best = max(best, open_now)
    return best


def max_in_window(times: Iterable[float], window: float) -> int:
    """The largest number of ``times`` inside any half-open window [t, t + window)."""
    ordered = sorted(times)
    best = 0
    for i, t in enumerate(ordered):
        best = max(best, bisect.bisect_left(ordered, t + window) - i)
    return best


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


# -- starting runs from another process ------------------------------------------------
async def _start_after_go(workflow: str, count: int, payload: Any, go_file: str) -> None:
    async with app:
        sys.stdout.write(json.dumps({"open": True}) + "\n")
        sys.stdout.flush()
        deadline = time.monotonic() + 30
        while not os.path.exists(go_file):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{go_file} did not appear")
            await asyncio.sleep(0.01)
        for _ in range(count):
            handle = await app.start(workflow, payload)
            sys.stdout.write(json.dumps({"id": handle.id, "created": handle.created}) + "\n")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """``python -m flowapp start WORKFLOW --count N --input JSON --go-file PATH``: open the
    app (print ``{"open": true}``), wait for PATH to exist, then start N runs one after the
    other, printing one JSON line per run."""
    parser = argparse.ArgumentParser(prog="python -m flowapp")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start runs one after the other")
    start.add_argument("workflow")
    start.add_argument("--count", type=int, default=1)
    start.add_argument("--input", default="{}")
    start.add_argument("--go-file", required=True)
    args = parser.parse_args(argv)
    asyncio.run(_start_after_go(args.workflow, args.count, json.loads(args.input), args.go_file))


if __name__ == "__main__":
    main()
