"""The apps that the PostgreSQL acceptance tests run in real worker processes.

They share `crashapp`'s side database (``$FLOWDESK_TEST_SIDE_DB``, a SQLite file outside
PostgreSQL): every execution of a step is a row in ``executions``, every effect a row in
``effects`` keyed by the step's idempotency key (so an effect cannot happen twice), and
the steps here add ``spans``: when each execution of a step began and ended, in which
process, so a test can measure how many ran at the same time across processes.

- ``pgapp:app``: ``pidchain`` (steps whose outputs carry the process id and the claim
  that ran them; any step can wait at a gate file) and ``ping`` (one quick step).
- ``pgapp:limits_app``: the queue ``limited`` (concurrency 3 and a start rate), the queue
  ``keyed`` (one run per concurrency key at a time) and ``idem`` (one quick step).
- ``pgapp:cron_app``: ``tick``, scheduled every second.

``python -m pgapp start APP WORKFLOW --inputs JSON_LIST [--key-prefix P]`` starts one run
per input, one by one; ``python -m pgapp race APP WORKFLOW --keys K1,K2 --at EPOCH``
opens the store, waits until the wall clock reaches EPOCH, then starts one run per
idempotency key. Both print one JSON line per start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import flowdesk

try:  # imported as tests.acceptance.pgapp by the tests, as pgapp by the workers
    from . import crashapp
except ImportError:
    import crashapp  # type: ignore[no-redef]

APP = "pgapp:app"
LIMITS_APP = "pgapp:limits_app"
CRON_APP = "pgapp:cron_app"

LIMITED_CONCURRENCY = 3
LIMITED_RATE = 5
LIMITED_WINDOW_S = 2.0
KEYED_PER_KEY = 1
CRON = "* * * * * */1"  # croniter's sixth field is seconds: every second

SPANS = """
CREATE TABLE IF NOT EXISTS spans (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    key    TEXT NOT NULL,
    run_id TEXT NOT NULL,
    label  TEXT NOT NULL,
    pid    INTEGER NOT NULL,
    start  REAL NOT NULL,
    "end"  REAL NOT NULL
);
"""


def init_side_db(path: str) -> None:
    crashapp.init_side_db(path)
    conn = crashapp.connect_side(path)
    try:
        conn.executescript(SPANS)
    finally:
        conn.close()


app = flowdesk.App()
limits_app = flowdesk.App()
cron_app = flowdesk.App()


# -- steps ---------------------------------------------------------------------------
@app.step(name="pid_work")
def pid_work(index: int, claim: int, delay_ms: int, gate_path: str = "") -> dict[str, Any]:
    """One effect; its output says which process (and which claim of the run) made it.
    Records its execution first, then waits at the gate (if any), then sleeps, writes its
    effect and sleeps again."""
    info = crashapp._step_info(None)
    crashapp._record_execution(info)
    if gate_path:
        crashapp._wait_for_file(gate_path)
    time.sleep(delay_ms / 2000)
    crashapp._record_effect(info)
    time.sleep(delay_ms / 2000)
    return {"key": info.idempotency_key, "index": index, "pid": os.getpid(), "claim": claim}


@app.step(name="span")
def span(label: str, ms: int) -> dict[str, Any]:
    """Holds for ``ms`` and records when it began and ended; one effect."""
    info = crashapp._step_info(None)
    crashapp._record_execution(info)
    start = time.time()
    time.sleep(ms / 1000)
    crashapp._record_effect(info)
    end = time.time()
    crashapp._write(
        'INSERT INTO spans (key, run_id, label, pid, start, "end") VALUES (?,?,?,?,?,?)',
        (info.idempotency_key, info.run_id, label, os.getpid(), start, end),
    )
    return {"key": info.idempotency_key, "pid": os.getpid(), "start": start, "end": end}


# -- pgapp:app -----------------------------------------------------------------------
@app.workflow("pidchain")
async def pidchain(
    ctx: flowdesk.Context,
    steps: int = 3,
    delay_ms: int = 30,
    gate_dir: str = "",
    gated: tuple[int, ...] = (),
) -> dict[str, Any]:
    """``steps`` steps in a row; step ``i`` in ``gated`` waits for ``gate_dir/gate-i``."""
    outputs = []
    for index in range(1, steps + 1):
        gate = os.path.join(gate_dir, f"gate-{index}") if index in gated else ""
        outputs.append(await ctx.step(pid_work, index, ctx.attempt, delay_ms, gate))
    return {"steps": outputs, "pid": os.getpid(), "claim": ctx.attempt}


@app.workflow("ping")
async def ping(ctx: flowdesk.Context, n: int = 0) -> dict[str, Any]:
    done = await ctx.step(span, "ping", 1)
    return {"n": n, "pid": done["pid"]}


# -- pgapp:limits_app ----------------------------------------------------------------
limits_app.queue(
    "limited",
    concurrency=LIMITED_CONCURRENCY,
    rate=(LIMITED_RATE, LIMITED_WINDOW_S),
)
limits_app.queue("keyed", per_key_concurrency=KEYED_PER_KEY)


@limits_app.workflow("limited_job", queue="limited")
async def limited_job(ctx: flowdesk.Context, n: int, ms: int = 600) -> dict[str, Any]:
    return await ctx.step(span, "limited", ms)


@limits_app.workflow("keyed_job", queue="keyed", key="account")
async def keyed_job(ctx: flowdesk.Context, account: str, n: int, ms: int = 300) -> dict[str, Any]:
    return await ctx.step(span, f"keyed:{account}", ms)


@limits_app.workflow("idem")
async def idem(ctx: flowdesk.Context, value: int = 0) -> dict[str, Any]:
    done = await ctx.step(span, "idem", 5)
    return {"value": value, "pid": done["pid"]}


# -- pgapp:cron_app ------------------------------------------------------------------
@cron_app.workflow("tick", schedule=CRON, catchup="all")
async def tick(ctx: flowdesk.Context, scheduled_at: str = "") -> dict[str, Any]:
    done = await ctx.step(span, "tick", 5)
    return {"scheduled_at": scheduled_at, "pid": done["pid"]}


# -- starting runs from a script -----------------------------------------------------
APPS = {"app": app, "limits_app": limits_app, "cron_app": cron_app}


def _emit(item: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(item) + "\n")
    sys.stdout.flush()


async def start_each(
    the_app: flowdesk.App, workflow: str, inputs: list[Any], key_prefix: str | None
) -> None:
    async with the_app:
        for i, payload in enumerate(inputs):
            key = f"{key_prefix}-{i}" if key_prefix else None
            handle = await the_app.start(workflow, payload, idempotency_key=key)
            _emit({"id": handle.id, "created": handle.created, "key": key})


async def race(
    the_app: flowdesk.App, workflow: str, keys: list[str], at: float, payload: Any
) -> None:
    async with the_app:
        await the_app.open()
        await asyncio.sleep(max(0.0, at - time.time()))
        for key in keys:
            handle = await the_app.start(workflow, payload, idempotency_key=key)
            _emit({"id": handle.id, "created": handle.created, "key": key, "at": time.time()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pgapp")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start one run per input, one by one")
    start.add_argument("app", choices=sorted(APPS))
    start.add_argument("workflow")
    start.add_argument("--inputs", required=True, help="a JSON list of inputs")
    start.add_argument("--key-prefix", default=None)
    racer = sub.add_parser("race", help="start runs with these keys at a given instant")
    racer.add_argument("app", choices=sorted(APPS))
    racer.add_argument("workflow")
    racer.add_argument("--keys", required=True, help="comma-separated idempotency keys")
    racer.add_argument("--at", type=float, required=True, help="epoch seconds")
    racer.add_argument("--input", default="{}")
    args = parser.parse_args(argv)
    the_app = APPS[args.app]
    if args.command == "start":
        asyncio.run(start_each(the_app, args.workflow, json.loads(args.inputs), args.key_prefix))
    else:
        keys = [k for k in args.keys.split(",") if k]
        asyncio.run(race(the_app, args.workflow, keys, args.at, json.loads(args.input)))


if __name__ == "__main__":
    main()
