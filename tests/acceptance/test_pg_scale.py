"""Flow control across processes on PostgreSQL: four worker processes share one database
(and open it, migrating a new schema, at the same moment), and still

- a queue with concurrency 3 and a start rate never runs more than 3 at once (and does
  reach 3, spread over processes) nor starts more than its rate in any window;
- a queue with one run per concurrency key never runs two of one key at once;
- an every-second cron schedule yields exactly one run per tick;
- the same idempotency key started at the same instant from several processes gives one
  run.

The steps record when each execution began and ended (`pgapp.span`), in the side database,
so overlaps are measured on what really ran, not on what the engine says it ran.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest

from . import pgapp
from .conftest import Proc
from .pg_fixtures import PgFlow, pg_flow  # noqa: F401

WORKERS = 4
PER_WORKER = 2  # so 3 at once needs two processes, and 4 x 2 would break a limit of 3
LEASE = 5.0


def _workers(flow: PgFlow, app: str, concurrency: int = PER_WORKER) -> list[Proc]:
    """Four workers started at once on a database without a schema: they migrate it
    concurrently, then register."""
    workers = [
        flow.worker(
            app=app, lease=LEASE, poll=0.1, concurrency=concurrency, name=f"w{n}", ready=False
        )
        for n in range(WORKERS)
    ]
    for w in workers:
        flow.wait_ready(w, timeout=30)
    return workers


def _start_runs(flow: PgFlow, app: str, workflow: str, inputs: list[dict[str, Any]]) -> list[str]:
    proc = flow.pgapp("start", app, workflow, "--inputs", json.dumps(inputs), name="starter")
    started = [json.loads(line) for line in flow.finish(proc).splitlines()]
    assert len(started) == len(inputs) and all(s["created"] for s in started), started
    return [s["id"] for s in started]


def _wait_succeeded(
    flow: PgFlow, run_ids: Sequence[str], watch: list[Proc], timeout: float
) -> None:
    def done() -> bool:
        rows = flow.rows("SELECT status FROM runs WHERE id = ANY(?)", (list(run_ids),))
        finished = [s for (s,) in rows if s in ("succeeded", "failed", "cancelled")]
        return len(finished) == len(run_ids)

    flow.wait_until(done, timeout=timeout, what=f"{len(run_ids)} runs to finish", watch=watch)
    statuses = flow.rows(
        "SELECT status, COUNT(*) FROM runs WHERE id = ANY(?) GROUP BY status", (list(run_ids),)
    )
    assert statuses == [("succeeded", len(run_ids))], statuses


def _stop_all(flow: PgFlow, workers: list[Proc]) -> None:
    for w in workers:
        assert flow.stop(w) == 0, w.describe()
    for w in workers:
        assert "Traceback" not in w.output(), w.describe()
    assert flow.side("SELECT detail FROM anomalies") == []


def _spans(flow: PgFlow, label_like: str) -> list[tuple[str, str, int, float, float]]:
    return flow.side(
        'SELECT run_id, label, pid, start, "end" FROM spans WHERE label LIKE ? ORDER BY start',
        (label_like,),
    )


def _peak(intervals: Sequence[tuple[float, float]]) -> tuple[int, float]:
    """The most intervals open at one instant, and the first instant it happened. An
    interval that ends when another begins does not overlap it."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    open_now, best, at = 0, 0, 0.0
    for t, delta in events:  # at equal times -1 sorts first: ends before starts
        open_now += delta
        if open_now > best:
            best, at = open_now, t
    return best, at


def _effects_once(flow: PgFlow, run_ids: Sequence[str]) -> None:
    marks = ",".join("?" * len(run_ids))
    keys = flow.side(f"SELECT key FROM effects WHERE run_id IN ({marks})", list(run_ids))
    assert sorted(k for (k,) in keys) == sorted(f"{r}:1" for r in run_ids)


@pytest.mark.timeout(90)
def test_queue_concurrency_and_rate_hold_across_four_workers(pg_flow: PgFlow) -> None:  # noqa: F811
    flow = pg_flow
    limit, rate, window_s = pgapp.LIMITED_CONCURRENCY, pgapp.LIMITED_RATE, pgapp.LIMITED_WINDOW_S
    runs = 3 * rate
    workers = _workers(flow, pgapp.LIMITS_APP)
    run_ids = _start_runs(
        flow, "limits_app", "limited_job", [{"n": i, "ms": 600} for i in range(runs)]
    )
    _wait_succeeded(flow, run_ids, workers, timeout=60)
    _stop_all(flow, workers)
    _effects_once(flow, run_ids)

    # -- concurrency: at most 3 at once across the processes, and 3 reached -----------
    spans = _spans(flow, "limited")
    assert sorted(r for r, *_ in spans) == sorted(run_ids), "a step ran other than once"
    peak, at = _peak([(s, e) for *_, s, e in spans])
    assert peak <= limit, f"{peak} runs of a queue limited to {limit} ran at once"
    assert peak == limit, f"the limit was never reached (peak {peak})"
    at_peak = {pid for _, _, pid, s, e in spans if s <= at < e}
    assert len(at_peak) >= 2, "the peak should need several processes (2 runs per worker)"

    # -- rate: no window of 2 s holds more than 5 starts, and some window holds 5 --------
    starts = sorted(
        s for (s,) in flow.rows("SELECT started_at FROM runs WHERE id = ANY(?)", (run_ids,))
    )
    window_ms = int(window_s * 1000)
    gaps = [starts[i] - starts[i - rate] for i in range(rate, len(starts))]
    assert min(gaps) >= window_ms, (
        f"more than {rate} starts within {window_s} s: starts (ms after the first) "
        f"{[s - starts[0] for s in starts]}"
    )
    full = [starts[i + rate - 1] - starts[i] for i in range(len(starts) - rate + 1)]
    assert min(full) < window_ms, "the rate limit was never reached"
    sys.stderr.write(
        f"peak {peak} at once over pids {sorted(at_peak)}; starts (ms) "
        f"{[s - starts[0] for s in starts]}\n"
    )


@pytest.mark.timeout(90)
def test_per_key_concurrency_holds_across_four_workers(pg_flow: PgFlow) -> None:  # noqa: F811
    flow = pg_flow
    accounts = ["a", "b", "c"]
    per_account = 4
    workers = _workers(flow, pgapp.LIMITS_APP)
    inputs = [{"account": acc, "n": i, "ms": 300} for i in range(per_account) for acc in accounts]
    run_ids = _start_runs(flow, "limits_app", "keyed_job", inputs)
    keys = dict(flow.rows("SELECT id, concurrency_key FROM runs WHERE id = ANY(?)", (run_ids,)))
    assert sorted(keys.values()) == sorted(i["account"] for i in inputs)
    _wait_succeeded(flow, run_ids, workers, timeout=60)
    _stop_all(flow, workers)
    _effects_once(flow, run_ids)

    spans = _spans(flow, "keyed:%")
    assert sorted(r for r, *_ in spans) == sorted(run_ids), "a step ran other than once"
    for acc in accounts:
        mine = [(s, e) for _, label, _, s, e in spans if label == f"keyed:{acc}"]
        assert len(mine) == per_account
        peak, _ = _peak(mine)
        assert peak == pgapp.KEYED_PER_KEY, f"account {acc}: {peak} runs of one key at once"
    peak, _ = _peak([(s, e) for *_, s, e in spans])
    assert peak >= 2, "runs of different keys should run at the same time"
    pids = {pid for _, _, pid, _, _ in spans}
    assert len(pids) >= 2, "the runs should have been shared by several processes"


@pytest.mark.timeout(90)
def test_every_second_cron_yields_one_run_per_tick_across_four_workers(
    pg_flow: PgFlow,  # noqa: F811
) -> None:
    flow = pg_flow
    workers = _workers(flow, pgapp.CRON_APP)
    time.sleep(6.5)  # four workers race for every tick
    paused = flow.cli("schedules", "pause", "tick", "--app", pgapp.CRON_APP)
    assert paused.returncode == 0, paused.stderr
    ticks_runs = flow.rows(
        "SELECT id, input, idempotency_key FROM runs WHERE workflow = 'tick' ORDER BY created_at"
    )
    run_ids = [r[0] for r in ticks_runs]
    _wait_succeeded(flow, run_ids, workers, timeout=30)
    _stop_all(flow, workers)
    assert flow.rows("SELECT COUNT(*) FROM runs") == [(len(run_ids),)]

    ticks = [
        int(
            datetime.fromisoformat(flow.payload(r, 0, "input", i)["scheduled_at"]).timestamp()
            * 1000
        )
        for r, i, _ in ticks_runs
    ]
    assert [k for *_, k in ticks_runs] == [f"schedule:tick:{t}" for t in ticks]
    assert len(set(ticks)) == len(ticks), f"a tick ran twice: {sorted(ticks)}"
    ticks.sort()
    assert len(ticks) >= 5, f"only {len(ticks)} ticks in 6.5 s"
    assert [b - a for a, b in zip(ticks, ticks[1:], strict=False)] == [1000] * (len(ticks) - 1), (
        f"a tick was missed: {[t - ticks[0] for t in ticks]}"
    )
    [(last_tick,)] = flow.rows("SELECT last_tick FROM schedules WHERE name = 'tick'")
    assert last_tick == ticks[-1]
    _effects_once(flow, run_ids)
    outputs = flow.rows("SELECT id, output FROM runs WHERE id = ANY(?)", (run_ids,))
    pids = {flow.payload(r, 0, "output", o)["pid"] for (r, o) in outputs}
    sys.stderr.write(f"{len(ticks)} ticks, one run each, executed by pids {sorted(pids)}\n")


@pytest.mark.timeout(90)
def test_same_idempotency_key_started_at_once_from_several_processes_makes_one_run(
    pg_flow: PgFlow,  # noqa: F811
) -> None:
    flow = pg_flow
    workers = _workers(flow, pgapp.LIMITS_APP)

    # -- four `flowdesk start --idempotency-key K` at once ------------------------------
    clis = [
        flow.spawn(
            "start",
            "idem",
            "--app",
            pgapp.LIMITS_APP,
            "--input",
            json.dumps({"value": 7}),
            "--idempotency-key",
            "K",
            "--json",
            name=f"cli-{n}",
        )
        for n in range(WORKERS)
    ]
    outs = [json.loads(flow.finish(c)) for c in clis]
    assert len({o["id"] for o in outs}) == 1, outs
    assert sorted(o["created"] for o in outs) == [False] * (WORKERS - 1) + [True], outs

    # -- four processes start the same 20 keys from the same instant --------------------
    keys = [f"race-{i}" for i in range(20)]
    at = time.time() + 4.0  # every racer has opened the store by then
    racers = [
        flow.pgapp(
            "race",
            "limits_app",
            "idem",
            "--keys",
            ",".join(keys),
            "--at",
            str(at),
            "--input",
            json.dumps({"value": 1}),
            name=f"racer-{n}",
        )
        for n in range(WORKERS)
    ]
    results = [[json.loads(line) for line in flow.finish(r).splitlines()] for r in racers]
    spread = max(r[0]["at"] for r in results) - min(r[0]["at"] for r in results)
    for i, key in enumerate(keys):
        per_key = [r[i] for r in results]
        assert {p["key"] for p in per_key} == {key}
        assert len({p["id"] for p in per_key}) == 1, per_key
        assert sorted(p["created"] for p in per_key) == [False] * (WORKERS - 1) + [True], per_key

    # -- a key reused for other input is refused ----------------------------------------
    clash = flow.cli(
        "start",
        "idem",
        "--app",
        pgapp.LIMITS_APP,
        "--input",
        json.dumps({"value": 8}),
        "--idempotency-key",
        "K",
    )
    assert clash.returncode != 0 and "Idempotency key 'K'" in clash.stderr, clash.stderr

    rows = flow.rows("SELECT idempotency_key, id FROM runs")
    assert sorted(k for k, _ in rows) == sorted(["K", *keys]), "one run per key, no more"
    run_ids = [r for _, r in rows]
    _wait_succeeded(flow, run_ids, workers, timeout=60)
    _stop_all(flow, workers)
    _effects_once(flow, run_ids)
    sys.stderr.write(
        f"the racers' first starts returned within {spread * 1000:.1f} ms of each other\n"
    )
