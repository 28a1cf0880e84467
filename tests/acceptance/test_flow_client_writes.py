"""A client process starting runs one after the other while another process holds the
SQLite write lock: every start returns (the one that had to wait for the lock commits
from a flush task, and the next start must not be left waiting for a flush that never
comes)."""

from __future__ import annotations

import json
import sqlite3
import sys
import time

import pytest

from .conftest import Flow

STARTS = 3
HOLD_SECONDS = 0.3


@pytest.mark.timeout(60)
def test_sequential_starts_after_waiting_for_the_write_lock(flow: Flow) -> None:
    flow.init_db()
    go = flow.root / "go"
    client = flow.procs.spawn(
        [
            sys.executable,
            "-m",
            "flowapp",
            "start",
            "pipeline",
            "--count",
            str(STARTS),
            "--input",
            json.dumps({"label": "doc"}),
            "--go-file",
            str(go),
        ],
        env=flow.env,
        cwd=flow.root,
        name="client",
    )
    flow.wait_until(
        lambda: '"open"' in client.stdout(), timeout=20, what="the client to open", watch=[client]
    )
    # Another process (this one) holds the write lock when the first start comes.
    holder = sqlite3.connect(flow.db, isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN IMMEDIATE")
        go.touch()
        time.sleep(HOLD_SECONDS)
        holder.execute("COMMIT")
    finally:
        holder.close()
    flow.wait_until(
        lambda: not client.alive(), timeout=15, what=f"the client to start {STARTS} runs"
    )
    assert flow.stop(client) == 0, client.describe()
    lines = [json.loads(line) for line in client.stdout().splitlines()]
    started = [line for line in lines if "id" in line]
    assert len(started) == STARTS and all(s["created"] for s in started), lines
    stored = {r for (r,) in flow.rows("SELECT id FROM runs WHERE workflow = 'pipeline'")}
    assert stored == {s["id"] for s in started}
