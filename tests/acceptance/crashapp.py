"""The app that the acceptance tests run in real worker processes.

Its steps write to a *side database* (a separate SQLite file named by
``$FLOWDESK_TEST_SIDE_DB``), the way a real step writes to another system:

- ``executions``: one plain row per execution of a step (every attempt, every replay
  that ran it again), so a test can tell "the step ran again" ...
- ``effects``: one row per *effect*, keyed by the step's idempotency key (UNIQUE, written
  with ``INSERT OR IGNORE``), so "the effect happened twice" is impossible as long as the
  key is stable, and a changed key shows up as an extra row;
- ``effect_writes``: one row per attempt to write an effect, with ``inserted`` 0 when the
  key was already there (an execution that the idempotency key made harmless);
- ``flags``: switches a test flips to make a step fail or pass;
- ``anomalies``: anything a step noticed that should never happen.

``python -m crashapp start WORKFLOW --count N --input JSON [--key-prefix P]`` starts runs
one by one through the Python API and prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import threading
import time
from typing import Any

import flowdesk

SIDE_DB_ENV = "FLOWDESK_TEST_SIDE_DB"
GATE_LIMIT_SECONDS = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    key    TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    step   TEXT NOT NULL,
    pid    INTEGER NOT NULL,
    at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS executions (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    key     TEXT NOT NULL,
    run_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    step    TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    pid     INTEGER NOT NULL,
    at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS effect_writes (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    key      TEXT NOT NULL,
    inserted INTEGER NOT NULL,
    pid      INTEGER NOT NULL,
    at       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flags (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS anomalies (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT,
    detail TEXT NOT NULL,
    pid    INTEGER NOT NULL,
    at     REAL NOT NULL
);
"""

app = flowdesk.App()


# -- the side database ---------------------------------------------------------------
def connect_side(path: str | None = None) -> sqlite3.Connection:
    """A connection to the side database that waits (up to 30 s) instead of failing when
    another process holds the write lock."""
    conn = sqlite3.connect(
        path or os.environ[SIDE_DB_ENV],
        timeout=30,
        isolation_level=None,
        check_same_thread=False,
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


def set_flag(path: str, name: str, value: str) -> None:
    conn = connect_side(path)
    try:
        conn.execute(
            "INSERT INTO flags (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )
    finally:
        conn.close()


_local = threading.local()


def _side() -> sqlite3.Connection:
    """One connection per thread (sync steps run in the worker's thread pool)."""
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = connect_side()
        _local.conn = conn
    return conn


def _write(sql: str, params: tuple[Any, ...]) -> None:
    _side().execute(sql, params)


def _step_info(expected_key: str | None) -> flowdesk.StepInfo:
    info = flowdesk.current_step()
    if info is None:
        _write(
            "INSERT INTO anomalies (run_id, detail, pid, at) VALUES (?,?,?,?)",
            (None, "current_step() is None inside a step", os.getpid(), time.time()),
        )
        raise flowdesk.Permanent("current_step() is None inside a step")
    if expected_key is not None and expected_key != info.idempotency_key:
        _write(
            "INSERT INTO anomalies (run_id, detail, pid, at) VALUES (?,?,?,?)",
            (
                info.run_id,
                f"ctx.idempotency_key() gave {expected_key!r} but the step runs as "
                f"{info.idempotency_key!r}",
                os.getpid(),
                time.time(),
            ),
        )
    return info


def _record_execution(info: flowdesk.StepInfo) -> None:
    _write(
        "INSERT INTO executions (key, run_id, seq, step, attempt, pid, at) VALUES (?,?,?,?,?,?,?)",
        (
            info.idempotency_key,
            info.run_id,
            info.seq,
            info.name,
            info.attempt,
            os.getpid(),
            time.time(),
        ),
    )


def _record_effect(info: flowdesk.StepInfo) -> None:
    conn = _side()
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute(
            "INSERT OR IGNORE INTO effects (key, run_id, seq, step, pid, at) VALUES (?,?,?,?,?,?)",
            (info.idempotency_key, info.run_id, info.seq, info.name, os.getpid(), time.time()),
        )
        conn.execute(
            "INSERT INTO effect_writes (key, inserted, pid, at) VALUES (?,?,?,?)",
            (info.idempotency_key, cur.rowcount, os.getpid(), time.time()),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _flag(name: str) -> str | None:
    row = _side().execute("SELECT value FROM flags WHERE name = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


def _wait_for_file(path: str) -> None:
    deadline = time.monotonic() + GATE_LIMIT_SECONDS
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} was not opened within {GATE_LIMIT_SECONDS} s")
        time.sleep(0.01)


# -- steps ---------------------------------------------------------------------------
@app.step(name="work")
def work(
    index: int, key: str, delay_ms: int, gate_path: str = "", gate_after_effect: bool = False
) -> str:
    """A step with one effect. Records its execution first, then (optionally) waits at a
    gate, sleeps, writes its effect, sleeps again: a kill in the second half leaves an
    effect whose step is not recorded."""
    info = _step_info(key)
    _record_execution(info)
    if gate_path and not gate_after_effect:
        _wait_for_file(gate_path)
    time.sleep(delay_ms / 2000)
    _record_effect(info)
    if gate_path and gate_after_effect:
        _wait_for_file(gate_path)
    time.sleep(delay_ms / 2000)
    return info.idempotency_key


@app.step(name="gatekeeper")
def gatekeeper(flag: str) -> str:
    """Fails for good while the side table's flag says ``fail``."""
    info = _step_info(None)
    _record_execution(info)
    if _flag(flag) == "fail":
        raise flowdesk.Permanent(f"flag {flag!r} says fail")
    _record_effect(info)
    return info.idempotency_key


@app.step(name="hold")
async def hold(gate_path: str) -> str:
    """Waits (without a thread) until the gate file exists."""
    info = _step_info(None)
    _record_execution(info)
    deadline = time.monotonic() + GATE_LIMIT_SECONDS
    while not os.path.exists(gate_path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate_path} was not opened in time")
        await asyncio.sleep(0.02)
    _record_effect(info)
    return info.idempotency_key


# -- workflows -----------------------------------------------------------------------
@app.workflow("chain")
async def chain(
    ctx: flowdesk.Context,
    steps: int = 6,
    delay_ms: int = 30,
    gate_seq: int = 0,
    gate_path: str = "",
    gate_after_effect: bool = False,
) -> list[str]:
    """``steps`` effectful steps in a row; step ``gate_seq`` waits at ``gate_path``."""
    keys: list[str] = []
    for index in range(1, steps + 1):
        gate = gate_path if index == gate_seq else ""
        keys.append(
            await ctx.step(work, index, ctx.idempotency_key(), delay_ms, gate, gate_after_effect)
        )
    return keys


@app.workflow("greet")
async def greet(ctx: flowdesk.Context, name: str, times: int = 1) -> dict[str, Any]:
    key = await ctx.step(work, 1, ctx.idempotency_key(), 10)
    return {"greeting": " ".join([f"hello {name}"] * times), "key": key}


@app.workflow("approval")
async def approval(ctx: flowdesk.Context, item: str) -> dict[str, Any]:
    decision = await ctx.wait_signal("approve")
    key = await ctx.step(work, 2, ctx.idempotency_key(), 10)
    return {"item": item, "decision": decision, "key": key}


@app.workflow("flaky")
async def flaky(ctx: flowdesk.Context, flag: str) -> list[str]:
    first = await ctx.step(work, 1, ctx.idempotency_key(), 10)
    second = await ctx.step(gatekeeper, flag)
    third = await ctx.step(work, 3, ctx.idempotency_key(), 10)
    return [first, second, third]


@app.workflow("holder")
async def holder(ctx: flowdesk.Context, gate_path: str) -> list[str]:
    first = await ctx.step(hold, gate_path)
    second = await ctx.step(work, 2, ctx.idempotency_key(), 10)
    return [first, second]


# -- starting runs from a script -----------------------------------------------------
async def start_many(workflow: str, count: int, payload: Any, key_prefix: str | None) -> None:
    async with app:
        for i in range(count):
            key = f"{key_prefix}-{i}" if key_prefix else None
            handle = await app.start(workflow, payload, idempotency_key=key)
            sys.stdout.write(json.dumps({"id": handle.id, "created": handle.created}) + "\n")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m crashapp")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start runs one by one")
    start.add_argument("workflow")
    start.add_argument("--count", type=int, default=1)
    start.add_argument("--input", default="{}")
    start.add_argument("--key-prefix", default=None)
    args = parser.parse_args(argv)
    asyncio.run(start_many(args.workflow, args.count, json.loads(args.input), args.key_prefix))


if __name__ == "__main__":
    main()
