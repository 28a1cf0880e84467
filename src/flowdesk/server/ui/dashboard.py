"""The figures of the operators' dashboard, read from the store (so every API server
shows the same whole picture, whichever process did the work).

Over a recent window (15 minutes to a day): runs started and finished per minute; active,
waiting and failed runs; queue depth (runs due now) and the age of the oldest; step and
model latency percentiles; the human backlog and SLA breaches (open past due, completed
late); the distribution of model confidence; drift alerts; model cost per task and per
run. Percentiles are computed over the latest 5,000 samples of the window.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from markupsafe import Markup

from flowdesk.engine.app import App
from flowdesk.server.ui import charts
from flowdesk.store import base, sql_models, sql_ui

WINDOWS = {"15m": 15, "1h": 60, "6h": 360, "24h": 1440}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass(slots=True)
class Latency:
    name: str
    count: int
    p50: float
    p95: float
    p99: float
    retries: int = 0


@dataclass(slots=True)
class Dashboard:
    window: str
    counts: dict[str, int]
    queues: list[tuple[str, int, float | None]]  # queue, due now, oldest due age (s)
    tasks_open: int
    tasks_claimed: int
    tasks_overdue: int
    late_completions: int
    backlog: list[tuple[str, int, int]]  # kind, active, overdue
    steps: list[Latency]
    models: list[Latency]
    cost: list[tuple[str, int, float, float]]  # model task, calls, total usd, usd per call
    cost_per_run: list[tuple[str, int, float]]  # workflow, runs, usd per run
    drift: list[sql_models.DriftState]
    answers: int = 0  # model answers with a confidence, in the window
    charts: dict[str, Markup] = field(default_factory=dict)


def _latencies(samples: dict[str, list[float]], retries: dict[str, int]) -> list[Latency]:
    out = [
        Latency(
            name,
            len(values),
            percentile(values, 50),
            percentile(values, 95),
            percentile(values, 99),
            retries.get(name, 0),
        )
        for name, values in samples.items()
    ]
    return sorted(out, key=lambda x: -x.p95)[:12]


async def build(app: App, window: str) -> Dashboard:
    minutes = WINDOWS.get(window, 60)
    now = base.now_ms()
    since = now - minutes * 60_000
    await app.open()
    store = sql_ui.ui_store(app.store)
    counts = await store.run_counts(since)
    gauges = await app.store.run_gauges()
    queues: dict[str, tuple[int, int | None]] = {}
    for g in gauges:
        due, oldest = queues.get(g.queue, (0, None))
        if g.status == base.RunStatus.QUEUED or g.due:
            due += g.due
            if g.oldest_due_at is not None:
                oldest = g.oldest_due_at if oldest is None else min(oldest, g.oldest_due_at)
        queues[g.queue] = (due, oldest)
    task_gauges = await app.store.task_gauges()
    backlog: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in task_gauges:
        backlog[t.kind][0] += t.count
        backlog[t.kind][1] += t.overdue

    step_samples: dict[str, list[float]] = defaultdict(list)
    step_retries: dict[str, int] = defaultdict(int)
    for name, ms, attempts in await store.step_durations(since):
        step_samples[name].append(float(ms))
        step_retries[name] += max(0, attempts - 1)
    model_samples: dict[str, list[float]] = defaultdict(list)
    confidences: list[float] = []
    cost: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    per_run: dict[str, set[str]] = defaultdict(set)
    run_cost: dict[str, float] = defaultdict(float)
    for m in await store.model_samples(since):
        key = f"{m.task} · {m.model}"
        model_samples[key].append(m.latency_ms)
        if m.confidence is not None and m.status == "ok":
            confidences.append(m.confidence)
        cost[m.task][0] += 1
        cost[m.task][1] += m.cost_usd
        if m.run_id and m.workflow:
            per_run[m.workflow].add(m.run_id)
            run_cost[m.workflow] += m.cost_usd
    if not model_samples:  # no ledger (the gateway's accounting is off): the model steps
        for name, values in step_samples.items():
            if name.startswith("model:"):
                model_samples[name.removeprefix("model:") + " · (step)"] = values
    drift: list[sql_models.DriftState] = []
    if isinstance(app.store, sql_models.ModelsStore):
        drift = [d for d in await app.store.drift_states() if d.level != "none"]

    board = Dashboard(
        window=window if window in WINDOWS else "1h",
        counts=counts,
        queues=[
            (q, due, None if oldest is None else max(0.0, (now - oldest) / 1000))
            for q, (due, oldest) in sorted(queues.items())
        ],
        tasks_open=sum(t.count for t in task_gauges if t.status == "open"),
        tasks_claimed=sum(t.count for t in task_gauges if t.status == "claimed"),
        tasks_overdue=sum(t.overdue for t in task_gauges),
        late_completions=await store.late_completions(since),
        backlog=sorted(((k, v[0], v[1]) for k, v in backlog.items()), key=lambda x: -x[1]),
        steps=_latencies(step_samples, step_retries),
        models=_latencies(model_samples, {}),
        cost=sorted(
            ((t, int(c[0]), c[1], c[1] / max(1, c[0])) for t, c in cost.items()),
            key=lambda x: -x[2],
        ),
        cost_per_run=sorted(
            ((w, len(runs), run_cost[w] / max(1, len(runs))) for w, runs in per_run.items()),
            key=lambda x: -x[2],
        ),
        drift=drift,
        answers=len(confidences),
    )
    board.charts["throughput"] = await _throughput(store, since, now, minutes)
    board.charts["confidence"] = _confidence(confidences)
    return board


async def _throughput(store: sql_ui.UiStore, since: int, now: int, minutes: int) -> Markup:
    step = max(1, minutes // 30)  # at most ~30 bars: 1, 2, 12 or 48 minutes each
    first = (since // 60_000) * 60_000
    buckets = max(1, (now - first) // (step * 60_000) + 1)
    started = [0.0] * buckets
    finished = [0.0] * buckets
    failed = [0.0] * buckets
    for minute, kind, count in await store.runs_per_minute(first):
        i = min(buckets - 1, int((minute - first) // (step * 60_000)))
        if kind == "started":
            started[i] += count
        elif kind == "failed":
            failed[i] += count
        else:
            finished[i] += count
    per = 1 / step  # runs per minute
    labels = [
        datetime.fromtimestamp((first + i * step * 60_000) / 1000, UTC).strftime("%H:%M")
        for i in range(buckets)
    ]
    return charts.bars(
        f"Runs per minute over the last {minutes} minutes: started, finished, failed",
        labels,
        [
            ("started", [v * per for v in started]),
            ("finished", [v * per for v in finished]),
            ("failed", [v * per for v in failed]),
        ],
        every=max(1, buckets // 6),
    )


def _confidence(values: list[float]) -> Markup:
    edges = [i / 10 for i in range(11)]
    counts = [0.0] * 10
    for v in values:
        counts[min(9, max(0, int(v * 10)))] += 1
    labels = [f"{edges[i]:.1f}" for i in range(10)]
    return charts.bars(
        f"Model confidence of {len(values)} answers, in tenths from 0 to 1",
        labels,
        [("answers", counts)],
        height=160,
    )
