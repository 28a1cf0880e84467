"""Four worker processes, a process starting runs one by one and a few `flowdesk start`
commands, all on one SQLite file: nobody sees "database is locked", every start and every
run succeeds, each effect happens once. Then one worker is SIGKILLed while it holds runs,
and the others take them over when its lease expires, with no manual call."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest

from .conftest import APP, Flow, Proc

WORKERS = 4
RUNS = 300
CLI_STARTS = 4
STEPS = 3
SLOW_RUNS = 24
LEASE = 2.0
LOCKED = re.compile(r"database is locked|database table is locked|SQLITE_BUSY", re.I)


def _finished(flow: Flow, expected: int) -> bool:
    counts = flow.status_counts()
    done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
    return sum(counts.values()) == expected and done == expected


def _assert_effects_once(flow: Flow, run_ids: list[str], steps: int) -> None:
    expected = {f"{r}:{i}" for r in run_ids for i in range(1, steps + 1)}
    marks = ",".join("?" * len(run_ids))
    keys = [k for (k,) in flow.side(f"SELECT key FROM effects WHERE run_id IN ({marks})", run_ids)]
    assert len(keys) == len(expected), f"{len(keys)} effects for {len(expected)} steps"
    assert set(keys) == expected


@pytest.mark.timeout(110)
def test_four_workers_and_starters_share_one_sqlite_file(flow: Flow) -> None:
    # No schema yet: the four workers open (and migrate) the new file at the same moment.
    workers = [
        flow.worker(lease=LEASE, poll=0.05, concurrency=10, name=f"worker-{n}", ready=False)
        for n in range(WORKERS)
    ]
    for w in workers:
        flow.wait_ready(w)
    everyone: list[Proc] = list(workers)

    # -- phase 1: 300 runs started one by one, plus CLI starts, all at once -------------
    t0 = time.monotonic()
    payload = {"steps": STEPS, "delay_ms": 30}
    starter = flow.spawn_starter("chain", RUNS, payload, key_prefix="mp")
    clis = [
        flow.spawn(
            "start",
            "chain",
            "--app",
            APP,
            "--input",
            json.dumps(payload),
            "--json",
            name=f"cli-start-{n}",
        )
        for n in range(CLI_STARTS)
    ]
    everyone += [starter, *clis]
    for p in [starter, *clis]:
        flow.wait_until(
            lambda p=p: not p.alive(), timeout=60, what=f"{p.name} to exit", watch=workers
        )
        assert flow.stop(p) == 0, p.describe()
    started = [json.loads(line) for line in starter.stdout().splitlines()]
    started += [json.loads(c.stdout()) for c in clis]
    assert len(started) == RUNS + CLI_STARTS
    assert all(s["created"] for s in started)
    run_ids = sorted(s["id"] for s in started)
    assert len(set(run_ids)) == len(run_ids)

    flow.wait_until(
        lambda: _finished(flow, len(run_ids)),
        timeout=60,
        what="all phase-1 runs to finish",
        watch=workers,
    )
    phase1 = time.monotonic() - t0
    assert flow.status_counts() == {"succeeded": len(run_ids)}
    for run_id, output in flow.rows("SELECT id, output FROM runs"):
        assert flow.payload(run_id, 0, "output", output) == [
            f"{run_id}:{i}" for i in range(1, STEPS + 1)
        ]
    _assert_effects_once(flow, run_ids, STEPS)
    pids = ",".join(str(w.pid) for w in workers)
    [(busy_workers,)] = flow.side(
        f"SELECT COUNT(DISTINCT pid) FROM executions WHERE pid IN ({pids})"
    )
    assert busy_workers >= 2, "the runs should have been shared by several workers"

    # -- phase 2: kill a worker that holds runs -----------------------------------------
    gate = flow.root / "gate"
    slow = flow.spawn_starter(
        "chain",
        SLOW_RUNS,
        {"steps": STEPS, "delay_ms": 30, "gate_seq": 2, "gate_path": str(gate)},
        key_prefix="slow",
        name="slow-starter",
    )
    everyone.append(slow)
    flow.wait_until(lambda: not slow.alive(), timeout=30, what="the slow starter to exit")
    assert flow.stop(slow) == 0, slow.describe()
    slow_ids = sorted(json.loads(line)["id"] for line in slow.stdout().splitlines())
    assert len(slow_ids) == SLOW_RUNS
    marks = ",".join("?" * len(slow_ids))

    def all_at_gate() -> bool:
        waiting = flow.side(
            f"SELECT COUNT(DISTINCT run_id) FROM executions WHERE seq = 2 AND run_id IN ({marks})",
            slow_ids,
        )[0][0]
        return bool(waiting == SLOW_RUNS)

    flow.wait_until(all_at_gate, timeout=30, what="every slow run to reach the gate", watch=workers)
    holders = dict(
        flow.rows(
            f"SELECT w.pid, COUNT(*) FROM runs r JOIN workers w ON w.id = r.lease_owner"
            f" WHERE r.status = 'running' AND r.id IN ({marks}) GROUP BY w.pid",
            slow_ids,
        )
    )
    assert sum(holders.values()) == SLOW_RUNS, holders
    victim = max(workers, key=lambda w: holders.get(w.pid, 0))
    held = sorted(
        r
        for (r,) in flow.rows(
            f"SELECT r.id FROM runs r JOIN workers w ON w.id = r.lease_owner"
            f" WHERE w.pid = ? AND r.status = 'running' AND r.id IN ({marks})",
            [victim.pid, *slow_ids],
        )
    )
    assert held, f"no worker holds a slow run: {holders}"
    flow.kill(victim)
    killed_at = time.time()
    assert victim.popen.returncode == -9
    survivors = [w for w in workers if w is not victim]
    gate.touch()

    flow.wait_until(
        lambda: _finished(flow, len(run_ids) + SLOW_RUNS),
        timeout=40,
        what="the slow runs to finish on the surviving workers",
        watch=survivors,
    )
    taken_over = time.time() - killed_at
    assert flow.status_counts() == {"succeeded": len(run_ids) + SLOW_RUNS}
    _assert_effects_once(flow, slow_ids, STEPS)

    survivor_pids = {w.pid for w in survivors}
    held_marks = ",".join("?" * len(held))
    for run_id, attempts in flow.rows(
        f"SELECT id, attempts FROM runs WHERE id IN ({held_marks})", held
    ):
        assert attempts >= 2, f"run {run_id} held by the dead worker was never claimed again"
    # The steps after the kill ran (and made their effects) in the surviving workers.
    late = flow.side(
        f"SELECT run_id, seq, pid FROM effects WHERE seq >= 2 AND run_id IN ({held_marks})",
        held,
    )
    assert len(late) == 2 * len(held)
    assert {pid for _, _, pid in late} <= survivor_pids, (late, survivor_pids)
    interrupted = flow.side(
        f"SELECT COUNT(*) FROM executions WHERE seq = 2 AND pid = ? AND run_id IN ({held_marks})",
        [victim.pid, *held],
    )[0][0]
    assert interrupted == len(held)
    assert flow.side("SELECT detail FROM anomalies") == []

    # -- nobody saw a locked database; the survivors shut down cleanly -----------------
    for w in survivors:
        assert flow.stop(w) == 0, w.describe()
    for p in everyone:
        text = p.output()
        assert not LOCKED.search(text), f"{p.name} reported a locked database:\n{text[-3000:]}"
        assert "Traceback" not in text, f"{p.name} printed a traceback:\n{text[-3000:]}"
    sys.stderr.write(
        f"phase 1: {len(run_ids)} runs in {phase1:.1f} s on {busy_workers} workers; "
        f"phase 2: worker {victim.pid} killed holding {len(held)} of {SLOW_RUNS} slow runs "
        f"{holders}, all finished {taken_over:.1f} s after the kill\n"
    )
