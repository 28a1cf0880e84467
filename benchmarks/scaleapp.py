"""The flowdesk app of the scale-out benchmark (`benchmarks/scale.py`).

Workers load it with ``flowdesk worker --app scaleapp:app --database-url ...`` (with
``benchmarks/`` on ``PYTHONPATH``); the benchmark's producer builds its own copy with
`make_app` so both sides register the same workflows.

* ``scale.five``: five no-op steps, the throughput workload;
* ``scale.probe``: its first step returns the wall-clock time at which it ran, so the
  producer (another process on the same machine) can measure how long a start takes to
  reach a step on an idle worker, at microsecond resolution.

With ``SCALE_COUNTS=path`` in the environment, the process counts what it sends to
PostgreSQL (statements, transactions, pool checkouts) and what the store does (group
commits and their sizes, claims and runs claimed, reads) and writes the counts as JSON
to ``path`` when it exits. Only the benchmark's profiled run sets it; the engine itself
is untouched (the counters wrap methods from outside).
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flowdesk

STEPS = 5


def make_app(database_url: str | None = None) -> flowdesk.App:
    app = flowdesk.App(database_url)

    @app.step(name="scale.noop")
    async def noop() -> None:
        return None

    @app.step(name="scale.clock")
    async def clock() -> float:
        return time.time()

    @app.workflow("scale.five")
    async def five(ctx: flowdesk.Context) -> None:
        for _ in range(STEPS):
            await ctx.step(noop)

    @app.workflow("scale.probe")
    async def probe(ctx: flowdesk.Context) -> float:
        first: float = await ctx.step(clock)
        for _ in range(STEPS - 1):
            await ctx.step(noop)
        return first

    return app


def _install_counters(path: str) -> None:
    import psycopg
    import psycopg_pool

    from flowdesk.store import postgres, sql

    counts: collections.Counter[str] = collections.Counter()

    def count(
        cls: type, name: str, key: str, sized: Callable[[tuple[Any, ...], Any], int] | None = None
    ) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            result = await original(self, *args, **kwargs)
            if sized is not None:
                counts[key + " (items)"] += sized(args, result)
            return result

        setattr(cls, name, wrapper)

    count(psycopg.AsyncCursor, "execute", "statements")
    count(psycopg.AsyncCursor, "executemany", "executemany")
    count(psycopg.AsyncTransaction, "__aenter__", "transactions")
    count(psycopg_pool.AsyncConnectionPool, "_check_connection", "pool checkout checks")
    count(postgres.PostgresStore, "transact", "group commits", lambda a, r: len(a[0]))
    count(postgres.PostgresStore, "_read", "reads")
    count(sql.SqlStore, "claim", "claims", lambda a, r: len(r))
    count(sql.SqlStore, "has_due", "has_due polls")
    count(sql.SqlStore, "heartbeat", "heartbeats")
    for name in ("create_run", "record", "finish", "_fence", "_notify_parent"):
        count(sql.SqlTx, name, f"tx.{name}")
    count(postgres._Tx, "notify", "tx.notify")

    def dump() -> None:
        with open(path, "w") as f:
            json.dump(dict(counts), f)

    atexit.register(dump)


if os.environ.get("SCALE_COUNTS"):
    _install_counters(os.environ["SCALE_COUNTS"])

app = make_app()
