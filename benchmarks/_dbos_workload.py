"""DBOS Transact side of the step/workflow overhead benchmark.

Run with the interpreter of a virtual environment that has ``dbos`` installed (see
``_peers.run_dbos``); flowdesk itself is not importable here. Prints one JSON object on
stdout; everything else (DBOS logs, diagnostics) goes to stderr.

    python _dbos_workload.py --db PATH [--synchronous full|normal|default]
        [--steps N] [--workflows N] [--concurrency N]

SQLite settings. DBOS 3.4's SQLite system database (``dbos/_sys_db_sqlite.py``) only
sets, on each new connection, ``isolation_level = "IMMEDIATE"``,
``PRAGMA busy_timeout=30000`` and ``PRAGMA foreign_keys=ON``. It sets neither
``journal_mode`` nor ``synchronous``, so out of the box it runs in SQLite's default
rollback-journal mode (``journal_mode=delete``) with ``synchronous=FULL``. To compare
engines at the same durability this script switches DBOS's database to WAL and applies
the requested ``synchronous`` level to every connection DBOS opens, through a
pool-level SQLAlchemy ``connect`` listener registered before DBOS creates its engine.
DBOS's own listener (IMMEDIATE transactions, busy timeout) still runs unchanged.
``--synchronous default`` leaves DBOS's settings untouched, to see what it does alone.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import statistics
import sys
import time
from typing import Any

import sqlalchemy as sa
from dbos import DBOS, DBOSConfig
from sqlalchemy import event
from sqlalchemy.pool import Pool

_SYNC_NAMES = {0: "off", 1: "normal", 2: "full", 3: "extra"}
_LATENCY_WORKFLOWS = 200
_WARMUP_STEPS = 50
_WARMUP_WORKFLOWS = 20


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _install_pragmas(synchronous: str) -> None:
    """Make every SQLite connection opened from now on use WAL + ``synchronous``.

    Listening on the ``Pool`` class reaches the engine DBOS creates internally at
    launch without patching DBOS. The only SQLAlchemy engine in this process is DBOS's
    system database engine.
    """

    @event.listens_for(Pool, "connect")
    def _set_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # journal_mode is persistent in the database file; synchronous is per connection.
        # Neither may be changed inside a transaction. pysqlite only opens one implicitly
        # before DML, so a fresh connection is still in autocommit here.
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        finally:
            cur.close()


def _pct(values: list[float], q: float) -> float:
    """Percentile ``q`` (0-100) with linear interpolation between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms_summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in seconds]
    return {"p50": round(_pct(ms, 50), 4), "p99": round(_pct(ms, 99), 4)}


# --- workload ---------------------------------------------------------------------------
# Registered at import time: DBOS requires workflows and steps to be decorated before
# launch. All steps are no-ops so the numbers measure the engine's own overhead.


@DBOS.step()
async def noop_step() -> None:
    return None


@DBOS.workflow()
async def timed_steps_workflow(n: int) -> tuple[list[float], float]:
    """Run ``n`` sequential steps, returning each step's duration and the loop total."""
    durations: list[float] = []
    loop_start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        await noop_step()
        durations.append(time.perf_counter() - t0)
    return durations, time.perf_counter() - loop_start


@DBOS.workflow()
async def steps_workflow(n: int) -> None:
    for _ in range(n):
        await noop_step()


@DBOS.workflow()
async def three_step_workflow() -> None:
    await noop_step()
    await noop_step()
    await noop_step()


async def _run_all(workflows: int, n_steps: int | None) -> float:
    """Start ``workflows`` workflows at once and await them all; returns wall seconds."""
    t0 = time.perf_counter()
    if n_steps is None:
        handles = await asyncio.gather(
            *(DBOS.start_workflow_async(three_step_workflow) for _ in range(workflows))
        )
    else:
        handles = await asyncio.gather(
            *(DBOS.start_workflow_async(steps_workflow, n_steps) for _ in range(workflows))
        )
    await asyncio.gather(*(h.get_result() for h in handles))
    return time.perf_counter() - t0


async def _sequential_latency(count: int) -> list[float]:
    latencies: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        handle = await DBOS.start_workflow_async(three_step_workflow)
        await handle.get_result()
        latencies.append(time.perf_counter() - t0)
    return latencies


def _sqlite_settings() -> dict[str, Any]:
    """Read the PRAGMAs in force on a connection from DBOS's own engine pool."""
    from dbos._dbos import _get_dbos_instance  # private, but the only handle on the engine

    engine: sa.Engine = _get_dbos_instance()._sys_db.engine
    with engine.connect() as conn:
        journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
        busy = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
    return {
        "journal_mode": str(journal).lower(),
        "synchronous": _SYNC_NAMES.get(int(sync or 0), str(sync)),
        "busy_timeout_ms": int(busy or 0),
    }


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    # Warm-up: first-call costs (imports, statement compilation, pool connections).
    await DBOS.start_workflow_async(timed_steps_workflow, _WARMUP_STEPS)
    await _run_all(_WARMUP_WORKFLOWS, None)
    await _sequential_latency(5)

    _log(f"dbos: step_overhead ({args.steps} sequential steps)")
    handle = await DBOS.start_workflow_async(timed_steps_workflow, args.steps)
    durations, loop_total = await handle.get_result()

    per_wf = max(1, args.steps // args.concurrency)
    _log(f"dbos: concurrent steps ({args.concurrency} workflows x {per_wf} steps)")
    conc_wall = await _run_all(args.concurrency, per_wf)

    _log(f"dbos: workflow_throughput ({args.workflows} workflows x 3 steps)")
    wf_wall = await _run_all(args.workflows, None)

    _log(f"dbos: workflow_latency ({_LATENCY_WORKFLOWS} sequential workflows)")
    latencies = await _sequential_latency(_LATENCY_WORKFLOWS)

    return {
        "step_overhead_ms": _ms_summary(durations),
        "sequential_steps_per_s": round(args.steps / loop_total, 2),
        "concurrent_steps_per_s": round(args.concurrency * per_wf / conc_wall, 2),
        "workflows_per_s": round(args.workflows / wf_wall, 2),
        "workflow_latency_ms": _ms_summary(latencies),
        "mean_step_ms": round(statistics.fmean(durations) * 1000.0, 4),
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    if args.synchronous != "default":
        _install_pragmas(args.synchronous)
    config: DBOSConfig = {
        "name": "flowdesk-bench-dbos",
        "system_database_url": f"sqlite:///{args.db}",
        # No application database is configured. DBOS 3.4 has no admin HTTP server, and
        # Conductor is only contacted when a conductor_key is given, so nothing here
        # opens a socket.
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        sqlite = _sqlite_settings()
        _log(f"dbos: sqlite settings in force: {sqlite}")
        results = await _measure(args)
    finally:
        DBOS.destroy()
    return {
        "engine": "dbos",
        "version": importlib.metadata.version("dbos"),
        "sqlite": sqlite,
        **results,
        "params": {
            "steps": args.steps,
            "workflows": args.workflows,
            "concurrency": args.concurrency,
            "latency_workflows": _LATENCY_WORKFLOWS,
        },
    }


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="path of the SQLite system database file")
    p.add_argument(
        "--synchronous",
        choices=["full", "normal", "default"],
        default="full",
        help="PRAGMA synchronous (in WAL mode); 'default' keeps DBOS's own settings",
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--workflows", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=20)
    args = p.parse_args(argv)
    for name in ("steps", "workflows", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def main() -> None:
    args = _parse_args()
    # DBOS logs through the "dbos" logger; keep its output on stderr.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    result = asyncio.run(_main(args))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
