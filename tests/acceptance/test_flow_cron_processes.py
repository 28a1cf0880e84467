"""The every-second ``tick`` schedule watched by three worker processes on one SQLite
file: one run per tick, no duplicates, no gaps; `flowdesk schedules list|pause|resume`
against the live workers; and after every worker is SIGKILLed and the schedule misses
ticks, a restarted worker starts one run for all of them (``catchup="skip"``)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from datetime import datetime

import pytest

from . import flowapp
from .conftest import Flow, Proc

WORKERS = 3
LEASE = 1.5


def _tick_ms(scheduled_at: str) -> int:
    return round(datetime.fromisoformat(scheduled_at).timestamp() * 1000)


def _runs(flow: Flow) -> list[tuple[int, str, int, str]]:
    """(tick ms, run id, created_at ms, status) of every run the schedule started."""
    out = []
    for run_id, key, raw, created, status in flow.rows(
        "SELECT id, idempotency_key, input, created_at, status FROM runs WHERE workflow = 'tick'"
    ):
        prefix, name, tick = str(key).split(":")
        assert (prefix, name) == ("schedule", "tick"), key
        scheduled_at = flow.payload(str(run_id), 0, "input", raw)["scheduled_at"]
        assert _tick_ms(scheduled_at) == int(tick), (key, raw)
        out.append((int(tick), str(run_id), int(created), str(status)))
    return sorted(out)


def _runs_ticks(flow: Flow) -> list[int]:
    return [t for t, *_ in _runs(flow)]


def _assert_consecutive(ticks: list[int], what: str) -> None:
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert all(g == 1000 for g in gaps), f"{what}: ticks not one second apart: {gaps}"


def _assert_unique(flow: Flow) -> None:
    dupes = flow.rows(
        "SELECT idempotency_key, COUNT(*) FROM runs WHERE workflow = 'tick'"
        " GROUP BY idempotency_key HAVING COUNT(*) > 1"
    )
    assert dupes == [], f"a tick has several runs: {dupes}"
    ticks = _runs_ticks(flow)
    assert len(ticks) == len(set(ticks)), Counter(ticks).most_common(3)


def _schedule(flow: Flow) -> dict[str, object]:
    listed = flow.cli_json("schedules", "list", "--app", flowapp.APP)
    assert [s["name"] for s in listed] == ["tick"], listed
    entry: dict[str, object] = listed[0]
    return entry


def _all_done(flow: Flow, up_to: int | None = None) -> bool:
    return all(
        status == "succeeded"
        for tick, _, _, status in _runs(flow)
        if up_to is None or tick <= up_to
    )


@pytest.mark.timeout(90)
def test_every_second_schedule_with_three_worker_processes(flow: Flow) -> None:
    flowapp.init_side_db(str(flow.side_db))
    workers: list[Proc] = [
        flowapp.spawn_worker(flow, name=f"worker-{n}", lease=LEASE, ready=False)
        for n in range(WORKERS)
    ]
    for w in workers:
        flow.wait_ready(w)

    # -- three workers, about four seconds: one run per tick --------------------------
    flow.wait_until(lambda: len(_runs(flow)) >= 5, timeout=15, what="five tick runs", watch=workers)
    last = _runs_ticks(flow)[-1]
    flow.wait_until(
        lambda: _all_done(flow, last), timeout=10, what="the tick runs to finish", watch=workers
    )
    _assert_unique(flow)
    ticks = [t for t in _runs_ticks(flow) if t <= last]
    _assert_consecutive(ticks, "three workers")
    # Each run executed its step once, with the instant of its own tick.
    side = flow.side("SELECT run_id, scheduled_at FROM ticks")
    side_ticks = sorted(_tick_ms(s) for _, s in side)
    assert [t for t in side_ticks if t <= last] == ticks, "a tick's step ran twice or never"
    by_run = {run_id: tick for tick, run_id, _, _ in _runs(flow)}
    assert all(by_run[r] == _tick_ms(s) for r, s in side)
    firing = {int(pid) for (pid,) in flow.side("SELECT DISTINCT pid FROM ticks")}
    assert firing <= {w.pid for w in workers}

    # -- schedules list ------------------------------------------------------------------
    entry = _schedule(flow)
    assert entry["workflow"] == "tick" and entry["cron"] == flowapp.EVERY_SECOND
    assert entry["catchup"] == "skip" and entry["paused"] is False
    next_tick = datetime.fromisoformat(str(entry["next_tick"]))
    assert entry["last_tick"] is not None
    assert next_tick > datetime.fromisoformat(str(entry["last_tick"]))
    table = flow.cli("schedules", "list", "--app", flowapp.APP)
    assert table.returncode == 0, table.stderr
    assert "tick" in table.stdout and "active" in table.stdout, table.stdout

    # -- pause: no new run while paused --------------------------------------------------
    paused = flow.cli("schedules", "pause", "tick", "--app", flowapp.APP)
    assert paused.returncode == 0, paused.stderr
    assert "paused" in paused.stdout
    paused_at = time.time() * 1000
    assert _schedule(flow)["paused"] is True
    time.sleep(0.3)  # runs started before the pause committed finish
    before = len(_runs(flow))
    time.sleep(2.2)
    assert len(_runs(flow)) == before, "the paused schedule started runs"
    assert all(w.alive() for w in workers)

    # -- resume: runs start again, from the next tick ------------------------------------
    # Resume just after a second begins: the tick that began it was due while paused, and
    # must not run (resuming skips paused ticks rather than catching up the latest one).
    time.sleep((1.1 - time.time() % 1) % 1)
    resumed_at = time.time() * 1000
    resumed = flow.cli("schedules", "resume", "tick", "--app", flowapp.APP)
    returned_at = time.time() * 1000
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert _schedule(flow)["paused"] is False
    flow.wait_until(
        lambda: len(_runs(flow)) >= before + 2,
        timeout=10,
        what="two runs after resume",
        watch=workers,
    )
    _assert_unique(flow)
    skipped = [t for t in _runs_ticks(flow) if paused_at < t < resumed_at]
    assert skipped == [], f"ticks while paused got runs: {skipped}"
    after_resume = [t for t in _runs_ticks(flow) if t > resumed_at]
    assert len(after_resume) >= 2
    assert after_resume[0] <= returned_at + 1000, "the first tick after resume did not run"
    _assert_consecutive(after_resume, "after resume")

    # -- every worker SIGKILLed; the schedule misses ticks -------------------------------
    for w in workers:
        flow.kill(w)
    killed_at = time.time() * 1000
    last_before = _runs_ticks(flow)[-1]
    assert last_before <= killed_at
    time.sleep(3.0)
    assert _runs_ticks(flow)[-1] == last_before, "a run was started with no worker alive"

    restarted = flowapp.spawn_worker(flow, name="worker-restarted", lease=LEASE)
    ready_at = time.time() * 1000
    flow.wait_until(
        lambda: len([t for t in _runs_ticks(flow) if t > last_before]) >= 3,
        timeout=15,
        what="three runs after the restart",
        watch=[restarted],
    )
    _assert_unique(flow)
    runs = _runs(flow)
    new = [(t, created) for t, _, created, _ in runs if t > last_before]
    new_ticks = [t for t, _ in new]
    first = new_ticks[0]
    # The missed ticks got one run between them: the latest one, not the oldest.
    assert first - last_before >= 3000, (last_before, new_ticks)
    assert first >= ready_at - 1000, (
        f"the first run after the restart is for tick {first}, which is older than the "
        f"latest missed tick (worker ready at {ready_at:.0f})"
    )
    _assert_consecutive(new_ticks, "after the restart")
    first_created = new[0][1]
    assert sum(1 for _, created in new if created == first_created) == 1, new
    # Runs a killed worker held are recovered once their lease runs out.
    newest = new_ticks[-1]
    flow.wait_until(
        lambda: _all_done(flow, newest),
        timeout=15,
        what="every tick run (also those the killed workers held) to succeed",
        watch=[restarted],
    )
    assert flow.stop(restarted) == 0, restarted.describe()
    assert "Traceback" not in restarted.output(), restarted.output()[-3000:]
    sys.stderr.write(
        f"{len(runs)} tick runs; killed after tick {last_before}, restarted at "
        f"{ready_at:.0f}, first new tick {first} ({(first - last_before) // 1000 - 1} "
        f"missed ticks skipped)\n"
    )
