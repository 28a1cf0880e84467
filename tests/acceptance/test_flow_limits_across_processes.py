"""Queue limits hold across worker processes: three `flowdesk worker` processes on one
SQLite file never run more than ``concurrency`` runs of a queue at once, never start more
than ``rate`` runs in its window, never run two runs with the same concurrency key at
once, and start queued runs by priority."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict

import pytest

from . import flowapp
from .conftest import Flow, Proc

WORKERS = 3
OCR_RUNS = 40
CUSTOMERS = ("acme", "globex", "initech")
RUNS_PER_CUSTOMER = 4
WINDOW_MS = int(flowapp.OCR_WINDOW.total_seconds() * 1000)
# A step starts a little after its run is claimed (thread hand-off, process scheduling):
# the rate check on step start times allows this much of that delay.
START_SLACK_S = 0.25
# The first ocr runs arrive one every 55 ms, the rest all at once. A run that arrives while
# a slot is free goes to whichever worker polls first, so the paced runs spread over the
# processes (a backlog is drained by the worker whose run just finished: it wakes at once,
# before any other worker polls). The burst then keeps more runs due than the queue
# allows, until the rate limit holds back the second half.
PACED = 10
ARRIVAL_GAP = 0.055


def _workers(flow: Flow) -> list[Proc]:
    flowapp.init_side_db(str(flow.side_db))
    workers = [
        flowapp.spawn_worker(flow, name=f"worker-{n}", concurrency=10, ready=False)
        for n in range(WORKERS)
    ]
    for w in workers:
        flow.wait_ready(w)
    return workers


def _all_succeeded(flow: Flow, workflow: str, count: int) -> bool:
    counts = dict(
        flow.rows(
            "SELECT status, COUNT(*) FROM runs WHERE workflow = ? GROUP BY status", (workflow,)
        )
    )
    if counts.get("failed") or counts.get("cancelled"):
        pytest.fail(f"{workflow} runs ended badly: {counts}")
    return counts == {"succeeded": count}


def _spans(flow: Flow, workflow: str) -> list[tuple[int, str, str, float, float]]:
    return [
        (int(pid), str(run_id), str(label), float(started), float(ended))
        for pid, run_id, label, started, ended in flow.side(
            "SELECT pid, run_id, label, started, ended FROM spans WHERE workflow = ?"
            " ORDER BY started",
            (workflow,),
        )
    ]


def _assert_clean_stop(flow: Flow, workers: list[Proc]) -> None:
    for w in workers:
        assert flow.stop(w) == 0, w.describe()
        text = w.output()
        assert "Traceback" not in text, f"{w.name} printed a traceback:\n{text[-3000:]}"
        assert "database is locked" not in text, text[-3000:]


@pytest.mark.timeout(90)
def test_concurrency_rate_and_per_key_limits_hold_across_three_workers(flow: Flow) -> None:
    workers = _workers(flow)
    worker_pids = {w.pid for w in workers}

    t0 = time.monotonic()
    pages = [{"page": i} for i in range(OCR_RUNS)]
    ocr_ids = flowapp.start_runs(flow.url, "ocr_page", pages[:PACED], gap=ARRIVAL_GAP)
    ocr_ids += flowapp.start_runs(flow.url, "ocr_page", pages[PACED:])
    customer_inputs = [{"customer": c, "n": n} for n in range(RUNS_PER_CUSTOMER) for c in CUSTOMERS]
    customer_ids = flowapp.start_runs(flow.url, "customer_job", customer_inputs)
    assert len(set(ocr_ids)) == OCR_RUNS and len(set(customer_ids)) == len(customer_inputs)

    flow.wait_until(
        lambda: (
            _all_succeeded(flow, "ocr_page", OCR_RUNS)
            and _all_succeeded(flow, "customer_job", len(customer_inputs))
        ),
        timeout=60,
        what="every ocr_page and customer_job run to succeed",
        watch=workers,
    )
    elapsed = time.monotonic() - t0

    # -- ocr: at most 3 at once, and 3 were reached -------------------------------------
    ocr = _spans(flow, "ocr_page")
    assert sorted(run_id for _, run_id, *_ in ocr) == sorted(ocr_ids), (
        "every ocr run should have executed its step exactly once"
    )
    ocr_overlap = flowapp.max_overlap((s, e) for *_, s, e in ocr)
    assert ocr_overlap <= flowapp.OCR_CONCURRENCY, (
        f"{ocr_overlap} ocr steps ran at once; the queue allows {flowapp.OCR_CONCURRENCY}"
    )
    assert ocr_overlap == flowapp.OCR_CONCURRENCY, (
        f"at most {ocr_overlap} ocr steps ever overlapped: the limit was never reached"
    )
    ocr_pids = {pid for pid, *_ in ocr}
    assert ocr_pids <= worker_pids
    assert len(ocr_pids) > 1, "the ocr runs should have been shared by several workers"
    # The limit is global, not per process: steps of different processes overlapped.
    cross = any(
        a[0] != b[0] and flowapp.overlaps((a[3], a[4]), (b[3], b[4]))
        for i, a in enumerate(ocr)
        for b in ocr[i + 1 :]
    )
    assert cross, "no two ocr steps of different processes ever overlapped"

    # -- ocr: at most 20 starts in any 2 s, and 20 were reached --------------------------
    rows = flow.rows(
        "SELECT started_at, attempts FROM runs WHERE workflow = 'ocr_page' ORDER BY started_at"
    )
    assert all(attempts == 1 for _, attempts in rows), rows
    started_ms = [int(s) for s, _ in rows]
    rate_peak = flowapp.max_in_window(started_ms, WINDOW_MS)
    assert rate_peak <= flowapp.OCR_RATE, (
        f"{rate_peak} ocr runs started within {WINDOW_MS} ms; the queue allows {flowapp.OCR_RATE}"
    )
    assert rate_peak == flowapp.OCR_RATE, (
        f"at most {rate_peak} ocr runs started in any {WINDOW_MS} ms: the rate never bound"
    )
    # Forty runs at 20 per 2 s: the 21st start is at least 2 s after the first.
    assert started_ms[flowapp.OCR_RATE] - started_ms[0] >= WINDOW_MS
    step_peak = flowapp.max_in_window([s for *_, s, _ in ocr], WINDOW_MS / 1000 - START_SLACK_S)
    assert step_peak <= flowapp.OCR_RATE, (
        f"{step_peak} ocr steps started within {WINDOW_MS / 1000 - START_SLACK_S} s"
    )

    # -- per_customer: one run per customer at a time, customers in parallel -------------
    jobs = _spans(flow, "customer_job")
    assert sorted(run_id for _, run_id, *_ in jobs) == sorted(customer_ids)
    by_customer: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for _, _, label, s, e in jobs:
        by_customer[label.rsplit("-", 1)[0]].append((s, e))
    assert sorted(by_customer) == sorted(CUSTOMERS)
    for customer, spans in by_customer.items():
        assert len(spans) == RUNS_PER_CUSTOMER
        assert flowapp.max_overlap(spans) == 1, (
            f"two runs of customer {customer!r} ran at the same time: {sorted(spans)}"
        )
    across = [
        (a, b)
        for a in CUSTOMERS
        for b in CUSTOMERS
        if a < b and any(flowapp.overlaps(x, y) for x in by_customer[a] for y in by_customer[b])
    ]
    assert across, "runs of different customers never overlapped: the key limit is too strict"
    keys = dict(flow.rows("SELECT id, concurrency_key FROM runs WHERE workflow = 'customer_job'"))
    for run_id, payload in zip(customer_ids, customer_inputs, strict=True):
        assert keys[run_id] == payload["customer"]

    _assert_clean_stop(flow, workers)
    sys.stderr.write(
        f"ocr: {OCR_RUNS} runs on workers {sorted(Counter(p for p, *_ in ocr).values())}, "
        f"peak overlap {ocr_overlap}, "
        f"peak starts per {WINDOW_MS} ms {rate_peak} (steps: {step_peak}); "
        f"customers overlapping: {across}; all done in {elapsed:.1f} s\n"
    )


@pytest.mark.timeout(60)
def test_queued_runs_start_by_priority_across_workers(flow: Flow) -> None:
    # Queue everything before any worker runs, then let three workers drain the
    # concurrency-1 queue: each claim must take the best run left.
    flowapp.init_side_db(str(flow.side_db))
    priorities = [0, 5, 10, 5, 0, 10, 10, 0, 5]
    labels = [f"p{p}-{i}" for i, p in enumerate(priorities)]
    ids = flowapp.start_runs(
        flow.url,
        "ordered",
        [{"label": label} for label in labels],
        priorities=priorities,
        gap=0.005,
    )
    stored = dict(flow.rows("SELECT id, priority FROM runs"))
    assert [stored[i] for i in ids] == priorities
    assert flow.rows("SELECT COUNT(*) FROM runs WHERE status != 'queued'") == [(0,)]

    workers = _workers(flow)
    flow.wait_until(
        lambda: _all_succeeded(flow, "ordered", len(ids)),
        timeout=30,
        what="every ordered run to succeed",
        watch=workers,
    )
    spans = _spans(flow, "ordered")
    executed = [label for _, _, label, _, _ in spans]
    expected = [
        label
        for _, _, label in sorted(
            zip(priorities, range(len(labels)), labels, strict=True),
            key=lambda t: (-t[0], t[1]),
        )
    ]
    assert executed == expected, f"execution order {executed}, expected {expected}"
    assert flowapp.max_overlap((s, e) for *_, s, e in spans) == 1
    claimed = [
        run_id
        for (run_id,) in flow.rows(
            "SELECT id FROM runs WHERE workflow = 'ordered' ORDER BY started_at, id"
        )
    ]
    assert [labels[ids.index(r)] for r in claimed] == expected
    _assert_clean_stop(flow, workers)
    sys.stderr.write(
        f"priority order {json.dumps(executed)} on pids {sorted({p for p, *_ in spans})}\n"
    )
