"""Chaos: 50 runs of a 5-step workflow while the worker is SIGKILLed at random moments and
replaced each time. Every run must succeed with each step's effect made exactly once."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass

import pytest

from .conftest import Flow

SEED = int(os.environ.get("FLOWDESK_CHAOS_SEED", "20240611"))
RUNS = 50
STEPS = 5
KILLS = 5
STEP_MS = 150


@dataclass(frozen=True)
class Kill:
    n: int
    pid: int
    after: float
    held: int
    succeeded_before: int


@pytest.mark.timeout(100)
def test_random_sigkills_lose_nothing_and_duplicate_nothing(flow: Flow) -> None:
    rng = random.Random(SEED)
    flow.init_db()
    starter = flow.spawn_starter(
        "chain", RUNS, {"steps": STEPS, "delay_ms": STEP_MS}, key_prefix="chaos"
    )
    flow.wait_until(lambda: not starter.alive(), timeout=30, what="the starter to finish")
    assert flow.stop(starter) == 0, starter.describe()
    started = [json.loads(line) for line in starter.stdout().splitlines()]
    assert len(started) == RUNS and all(s["created"] for s in started), starter.describe()
    run_ids = sorted(s["id"] for s in started)

    kills: list[Kill] = []
    t0 = time.monotonic()
    for n in range(KILLS):
        worker = flow.worker(lease=1, poll=0.05, concurrency=20, name=f"chaos-{n}")
        after = rng.uniform(0.2, 0.8)
        time.sleep(after)  # the chaos itself: a random moment, not a wait for readiness
        assert worker.alive(), worker.describe()
        held = flow.rows(
            "SELECT COUNT(*) FROM runs WHERE status = 'running' AND lease_owner IN"
            " (SELECT id FROM workers WHERE pid = ?)",
            (worker.pid,),
        )[0][0]
        succeeded = flow.status_counts().get("succeeded", 0)
        flow.kill(worker)
        assert worker.popen.returncode == -9
        kills.append(Kill(n, worker.pid, round(after, 3), held, succeeded))

    final = flow.worker(lease=1, poll=0.05, concurrency=20, name="chaos-final")
    flow.wait_until(
        lambda: (
            flow.status_counts().get("succeeded", 0) + flow.status_counts().get("failed", 0) == RUNS
        ),
        timeout=45,
        what="every run to finish on the final worker",
        watch=[final],
    )
    elapsed = time.monotonic() - t0
    assert flow.stop(final) == 0, final.describe()

    # -- every run succeeded, with the right output --------------------------------------
    runs = flow.rows("SELECT id, status, output, attempts FROM runs ORDER BY id")
    assert [r[0] for r in runs] == run_ids
    bad = [(r[0], r[1]) for r in runs if r[1] != "succeeded"]
    assert not bad, f"runs that did not succeed: {bad}; statuses {flow.status_counts()}"
    for run_id, _, output, _ in runs:
        assert flow.payload(run_id, 0, "output", output) == [
            f"{run_id}:{i}" for i in range(1, STEPS + 1)
        ]
    steps = flow.rows(
        "SELECT run_id, COUNT(*) FROM steps WHERE status = 'ok' AND kind = 'step' GROUP BY run_id"
    )
    assert sorted(steps) == [(r, STEPS) for r in run_ids]

    # -- every (run, step) effect happened exactly once ---------------------------------
    expected = {f"{r}:{i}" for r in run_ids for i in range(1, STEPS + 1)}
    effect_keys = [k for (k,) in flow.side("SELECT key FROM effects")]
    assert len(effect_keys) == RUNS * STEPS == len(set(effect_keys))
    assert set(effect_keys) == expected
    assert flow.side("SELECT detail FROM anomalies") == []

    # -- and the kills really interrupted work ------------------------------------------
    executions = flow.side("SELECT COUNT(*) FROM executions")[0][0]
    per_key = dict(flow.side("SELECT key, COUNT(*) FROM executions GROUP BY key"))
    assert set(per_key) == expected
    reexecuted = executions - RUNS * STEPS
    deduplicated = flow.side("SELECT COUNT(*) FROM effect_writes WHERE inserted = 0")[0][0]
    reclaimed = sum(1 for r in runs if r[3] > 1)
    summary = (
        f"seed {SEED}: {len(kills)} kills {[(k.after, k.held, k.succeeded_before) for k in kills]}"
        f" (delay s, runs held, runs done before); {executions} executions for "
        f"{RUNS * STEPS} effects = {reexecuted} re-executions, {deduplicated} effect writes "
        f"absorbed by the idempotency key, {reclaimed} runs claimed more than once, "
        f"{elapsed:.1f} s"
    )
    sys.stderr.write(summary + "\n")
    assert sum(k.held for k in kills) > 0, f"no kill landed while runs were held: {summary}"
    assert reexecuted >= 1, f"no step ran twice, so no kill interrupted a step: {summary}"
    assert reclaimed >= 1, summary
