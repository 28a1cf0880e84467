"""Chaos on PostgreSQL with real processes: four workers run N runs of a 5-step workflow
whose steps make their effects in a side database through the step's idempotency key;
every ~0.5 s a random worker is SIGKILLed and a replacement started; once, mid-run,
PostgreSQL itself is restarted. At the end every run succeeded, no effect happened twice,
no run was lost, and no worker crashed or stalled because the server went away.

Size: ``FLOWDESK_CHAOS_RUNS`` runs (default 150, which CI runs in well under a minute);
the benchmark runs the full size, ``FLOWDESK_CHAOS_RUNS=1000``. ``FLOWDESK_CHAOS_SEED``
picks the kill moments and victims.

The side database is a SQLite file, so the effects survive the PostgreSQL restart. The
restart (``pg_ctlcluster --skip-systemctl-redirect <version> main restart``) disturbs
every client of the server, other test suites included: run this test sparingly.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from . import pg_fixtures
from .conftest import APP as CRASHAPP
from .conftest import Proc
from .pg_fixtures import PgFlow, pg_flow  # noqa: F401

RUNS = int(os.environ.get("FLOWDESK_CHAOS_RUNS", "150"))  # the full benchmark size: 1000
SEED = int(os.environ.get("FLOWDESK_CHAOS_SEED", "20240611"))
WORKERS = 4
STEPS = 5
STEP_MS = 150
LEASE = 2.0
CONCURRENCY = 10
KILL_EVERY = (0.3, 0.7)  # seconds between kills: ~0.5 s
RESTART_AFTER = 0.3  # restart PostgreSQL once this share of the runs has succeeded
RECOVERY_SECONDS = 30.0  # a worker that lived through the restart must work again by then
PROBES = 3  # new runs for that worker when the chaos left it nothing to do after the restart
FINISH_SECONDS = 60 + RUNS * 0.1  # after the chaos: every run done by then


@dataclass
class Restart:
    at_succeeded: int
    alive: list[Proc]
    took: float = 0.0  # the pg_ctlcluster command
    down_at: float | None = None  # wall clock: pg_isready first failed
    up_at: float = 0.0  # wall clock: pg_isready answered again
    witness: Proc | None = None
    witness_worked_after: float | None = None
    probed: bool = False
    errors: dict[str, int] = field(default_factory=dict)


def _restart_postgres(restart: Restart) -> None:
    """Restart the server, watching with ``pg_isready`` when it goes down and comes back
    (the command itself returns a while after the server accepts connections again)."""
    failure: list[BaseException] = []

    def command() -> None:
        try:
            pg_fixtures.restart_postgres()
        except BaseException as exc:  # pytest.fail included: re-raised below
            failure.append(exc)

    thread = threading.Thread(target=command, name="pg-restart")
    t = time.monotonic()
    thread.start()
    samples: list[tuple[float, bool]] = []
    while thread.is_alive():
        samples.append((time.time(), pg_fixtures.pg_isready(timeout=3.0)))
        time.sleep(0.02)
    thread.join()
    restart.took = time.monotonic() - t
    if failure:
        raise failure[0]
    pg_fixtures.wait_pg_ready()
    down = [at for at, ready in samples if not ready]
    if down:
        restart.down_at = down[0]
        back = [at for at, ready in samples if ready and at > down[-1]]
        restart.up_at = back[0] if back else time.time()
    else:  # never seen down: count from the end of the command
        restart.up_at = time.time()


@dataclass(frozen=True)
class Kill:
    pid: int
    held: int
    succeeded_before: int


def _rows(flow: PgFlow, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """`PgFlow.rows`, waiting out a server that is not answering (restarting)."""
    for _ in range(3):
        try:
            return flow.rows(sql, params)
        except psycopg.OperationalError:
            pg_fixtures.wait_pg_ready()
    return flow.rows(sql, params)


def _counts(flow: PgFlow) -> dict[str, int]:
    return dict(_rows(flow, "SELECT status, COUNT(*) FROM runs GROUP BY status"))


def _held(flow: PgFlow, proc: Proc) -> int:
    return int(
        _rows(
            flow,
            "SELECT COUNT(*) FROM runs WHERE status = 'running' AND lease_owner IN"
            " (SELECT id FROM workers WHERE pid = ?)",
            (proc.pid,),
        )[0][0]
    )


def _failed_to_start(proc: Proc) -> bool:
    """The worker exited before it opened the store, because it could not connect."""
    text = proc.stderr()
    return (
        proc.popen.returncode == 1
        and "Cannot connect to PostgreSQL" in text
        and "flowdesk worker " not in text
    )


def _worked_since(flow: PgFlow, proc: Proc, since: float) -> bool:
    return bool(
        flow.side("SELECT 1 FROM executions WHERE pid = ? AND at > ? LIMIT 1", (proc.pid, since))
    )


@pytest.mark.timeout(120 + RUNS * 0.25)
def test_sigkills_and_a_postgres_restart_lose_nothing_and_duplicate_nothing(
    pg_flow: PgFlow,  # noqa: F811
) -> None:
    flow = pg_flow
    rng = random.Random(SEED)
    flow.init_db()
    starter = flow.spawn_starter(
        "chain", RUNS, {"steps": STEPS, "delay_ms": STEP_MS}, key_prefix="chaos"
    )
    started = [json.loads(line) for line in flow.finish(starter, timeout=60).splitlines()]
    assert len(started) == RUNS and all(s["created"] for s in started), starter.describe()
    run_ids = sorted(s["id"] for s in started)

    def new_worker(n: int, ready: bool) -> Proc:
        return flow.worker(
            app=CRASHAPP,
            lease=LEASE,
            poll=0.1,
            concurrency=CONCURRENCY,
            name=f"chaos-{n}",
            ready=ready,
        )

    everyone = [new_worker(n, ready=False) for n in range(WORKERS)]
    for w in everyone:
        flow.wait_ready(w)
    alive = list(everyone)
    killed: set[int] = set()
    failed_starts: list[Proc] = []
    kills: list[Kill] = []
    restart: Restart | None = None
    t0 = time.monotonic()

    def check_alive() -> None:
        """A worker that died on its own fails the test; one that could not even open the
        store (the server was unreachable as it started: it exits saying so, by design)
        is started again, as a supervisor would."""
        for w in list(alive):
            if w.alive():
                continue
            if _failed_to_start(w):
                failed_starts.append(w)
                alive.remove(w)
                replacement = new_worker(len(everyone), ready=False)
                everyone.append(replacement)
                alive.append(replacement)
                continue
            pytest.fail(f"a worker died on its own: {w.describe()}")

    # -- the chaos loop -----------------------------------------------------------------
    while True:
        counts = _counts(flow)
        succeeded = counts.get("succeeded", 0)
        if succeeded + counts.get("failed", 0) + counts.get("cancelled", 0) == RUNS:
            break
        time.sleep(rng.uniform(*KILL_EVERY))
        check_alive()
        if restart is None and succeeded >= RUNS * RESTART_AFTER:
            # Every worker is up and working when the server goes away (a worker that is
            # still starting cannot open the store, and exits saying so, by design).
            for w in alive:
                flow.wait_ready(w)
            restart = Restart(succeeded, list(alive))
            _restart_postgres(restart)
            # One worker that lived through the restart is spared by the kills until it
            # has executed a step again, to show the workers recover on their own.
            restart.witness = rng.choice(restart.alive)
            check_alive()
        witness = restart.witness if restart else None
        if witness is not None and restart is not None and restart.witness_worked_after is None:
            if _worked_since(flow, witness, restart.up_at):
                restart.witness_worked_after = time.time() - restart.up_at
            elif time.time() - restart.up_at > RECOVERY_SECONDS:
                pytest.fail(
                    f"worker {witness.name} lived through the PostgreSQL restart but executed "
                    f"nothing in the {RECOVERY_SECONDS} s after it: {witness.describe()}"
                )
        spared = witness if restart and restart.witness_worked_after is None else None
        victim = rng.choice([w for w in alive if w is not spared])
        held = _held(flow, victim)
        flow.kill(victim)
        assert victim.popen.returncode == -9
        killed.add(victim.pid)
        kills.append(Kill(victim.pid, held, succeeded))
        alive.remove(victim)
        replacement = new_worker(len(everyone), ready=False)
        everyone.append(replacement)
        alive.append(replacement)
    chaos = time.monotonic() - t0

    # -- no more kills: the workers alive now finish whatever is left -------------------
    def all_finished() -> bool:
        counts = _counts(flow)
        finished = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
        return finished == sum(counts.values()) == len(run_ids)

    flow.wait_until(all_finished, timeout=FINISH_SECONDS, what="every run to finish", watch=alive)
    elapsed = time.monotonic() - t0

    # -- the witness of the restart had no work left after it: give it some -------------
    if (
        restart is not None
        and restart.witness is not None
        and restart.witness_worked_after is None
        and not _worked_since(flow, restart.witness, restart.up_at)
    ):
        witness = restart.witness
        others = [w for w in alive if w is not witness]
        for w in others:  # the probes can only go to the witness
            flow.pause(w)
        probe = flow.spawn_starter(
            "chain", PROBES, {"steps": STEPS, "delay_ms": 10}, key_prefix="probe", name="probe"
        )
        probes = [json.loads(line)["id"] for line in flow.finish(probe).splitlines()]
        run_ids = sorted([*run_ids, *probes])
        flow.wait_until(
            all_finished,
            timeout=RECOVERY_SECONDS,
            what=f"{witness.name}, which lived through the restart, to run {PROBES} new runs",
            watch=[witness],
        )
        for w in others:
            flow.resume(w)
        restart.probed = True
        restart.witness_worked_after = time.time() - restart.up_at
    for w in alive:  # a replacement still starting up would die of SIGTERM, not stop
        flow.wait_ready(w)
        assert flow.stop(w) == 0, w.describe()
    for w in everyone:
        if w in failed_starts:
            continue
        expected = -9 if w.pid in killed else 0
        assert w.popen.returncode == expected, w.describe()

    # -- PostgreSQL was restarted mid-run, and the workers got over it ------------------
    assert restart is not None, (
        f"the runs finished before {RESTART_AFTER:.0%} of them had succeeded during the "
        "chaos loop: PostgreSQL was never restarted; raise FLOWDESK_CHAOS_RUNS"
    )
    assert restart.at_succeeded < RUNS, "the restart came after the last run"
    assert restart.witness is not None
    assert _worked_since(flow, restart.witness, restart.up_at), restart.witness.describe()
    assert "LISTEN connection lost" in restart.witness.output(), (
        f"the witness did not notice the restart: {restart.witness.describe()}"
    )
    for w in everyone:
        # psycopg counts a deadlock as an OperationalError; it is no lost server.
        assert "is unavailable: deadlock" not in w.output(), w.describe()
    for w in restart.alive:
        text = w.output()
        for mark in (
            "LISTEN connection lost",
            "claiming failed",
            "heartbeat failed",
            "could not record",
        ):
            restart.errors[mark] = restart.errors.get(mark, 0) + text.count(mark)

    # -- every run succeeded once, with the right output; none lost ---------------------
    runs = flow.rows("SELECT id, status, output, attempts FROM runs ORDER BY id")
    assert [r[0] for r in runs] == run_ids, "runs were lost or appeared"
    bad = [(r[0], r[1]) for r in runs if r[1] != "succeeded"]
    assert not bad, f"runs that did not succeed: {bad[:10]}; statuses {_counts(flow)}"
    for run_id, _, output, _ in runs:
        # outputs are sealed at rest: open them with the processes' master key
        assert flow.payload(run_id, 0, "output", output) == [
            f"{run_id}:{i}" for i in range(1, STEPS + 1)
        ]
    steps = flow.rows(
        "SELECT run_id, COUNT(*) FROM steps WHERE status = 'ok' AND kind = 'step'"
        " GROUP BY run_id ORDER BY run_id"
    )
    assert steps == [(r, STEPS) for r in run_ids]

    # -- every (run, step) effect happened exactly once ---------------------------------
    expected = {f"{r}:{i}" for r in run_ids for i in range(1, STEPS + 1)}
    effect_keys = [k for (k,) in flow.side("SELECT key FROM effects")]
    assert len(effect_keys) == len(set(effect_keys)) == len(run_ids) * STEPS
    assert set(effect_keys) == expected
    assert flow.side("SELECT detail FROM anomalies") == []

    # -- and the chaos really interrupted work ------------------------------------------
    executions = flow.side("SELECT COUNT(*) FROM executions")[0][0]
    assert {k for (k,) in flow.side("SELECT DISTINCT key FROM executions")} == expected
    reexecuted = executions - len(run_ids) * STEPS
    absorbed = flow.side("SELECT COUNT(*) FROM effect_writes WHERE inserted = 0")[0][0]
    reclaimed = sum(1 for r in runs if r[3] > 1)
    down = restart.up_at - restart.down_at if restart.down_at is not None else 0.0
    summary = (
        f"seed {SEED}, {RUNS} runs x {STEPS} steps: {len(kills)} kills "
        f"({sum(k.held for k in kills)} runs held by the victims); PostgreSQL restarted at "
        f"{restart.at_succeeded} succeeded (command {restart.took:.1f} s, server down "
        f"{down:.1f} s; worker {restart.witness.name} worked again "
        f"{restart.witness_worked_after or 0:.1f} s after it was back"
        f"{' on probe runs' if restart.probed else ''}; errors seen {restart.errors}); "
        f"{executions} step executions = {reexecuted} re-executions, {absorbed} effect "
        f"writes absorbed by the idempotency key, {reclaimed} runs claimed more than once; "
        f"{len(failed_starts)} workers could not start (server unreachable); "
        f"chaos {chaos:.1f} s, total {elapsed:.1f} s"
    )
    sys.stderr.write(summary + "\n")
    assert sum(k.held for k in kills) > 0, f"no kill landed while runs were held: {summary}"
    assert reexecuted >= 1, f"no step ran twice, so no kill interrupted a step: {summary}"
    assert reclaimed >= 1, summary
