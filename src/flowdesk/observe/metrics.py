"""Prometheus metrics of one `App`, in a registry of its own (never the global one).

What an app's ``/metrics`` shows (labels never carry payloads or personal data: only
workflow, step, queue, task-kind and model names, statuses and kinds):

=====================================================  =========  ============================
metric                                                 type       labels
=====================================================  =========  ============================
``flowdesk_runs_started_total``                        counter    workflow
``flowdesk_runs_finished_total``                       counter    workflow, status
``flowdesk_lease_recoveries_total``                    counter    workflow
``flowdesk_step_duration_seconds``                     histogram  workflow, step, status
``flowdesk_step_retries_total``                        counter    workflow, step
``flowdesk_runs``                                      gauge      queue, workflow, status
``flowdesk_queue_depth``                               gauge      queue
``flowdesk_queue_lag_seconds``                         gauge      queue
``flowdesk_tasks``                                     gauge      kind, status
``flowdesk_tasks_overdue``                             gauge      kind
``flowdesk_task_completion_seconds``                   histogram  kind, by
``flowdesk_task_escalations_total``                    counter    kind, action
``flowdesk_model_call_duration_seconds``               histogram  task, model
``flowdesk_model_confidence``                          histogram  task, model
``flowdesk_model_cost_usd_total``                      counter    task, model
``flowdesk_workflow_model_cost_usd_total``             counter    workflow
``flowdesk_metrics_store_up``                          gauge
=====================================================  =========  ============================

Counters and histograms count what *this process* did (its workers, its API); Prometheus
adds the processes up. The gauges are read from the store at scrape time (two grouped
counts over active rows), so every process shows the same, whole picture. Business
metrics declared on ``app.metrics`` appear under their own names.

The counting itself is a dictionary update under a lock: no work at all happens for a
scrape that never comes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from flowdesk.engine import observe_port
from flowdesk.store import base

if TYPE_CHECKING:
    from flowdesk.engine.app import App

__all__ = ["CONTENT_TYPE", "Metrics", "record_model_call", "serve"]

log = logging.getLogger("flowdesk.observe")

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The media type of the text exposition format."""

STEP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
MODEL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
HUMAN_BUCKETS = (
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    4 * 3600.0,
    8 * 3600.0,
    86400.0,
    2 * 86400.0,
    7 * 86400.0,
    30 * 86400.0,
)
BUSINESS_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 7 * 86400.0)

Key = tuple[str, ...]


class _Counter:
    __slots__ = ("doc", "labels", "lock", "name", "values")

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.values: dict[Key, float] = {}
        self.lock = threading.Lock()

    def inc(self, key: Key, amount: float = 1.0) -> None:
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def family(self) -> Metric:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        with self.lock:
            items = list(self.values.items())
        for key, value in items:
            fam.add_metric(list(key), value)
        return fam


class _Gauge(_Counter):
    __slots__ = ()

    def set(self, key: Key, value: float) -> None:
        with self.lock:
            self.values[key] = value

    def family(self) -> Metric:
        fam = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        with self.lock:
            items = list(self.values.items())
        for key, value in items:
            fam.add_metric(list(key), value)
        return fam


class _Histogram:
    """Bucket counts (not cumulative; the last one is +Inf) and the sum, per label set."""

    __slots__ = ("bounds", "doc", "labels", "lock", "name", "series")

    def __init__(self, name: str, doc: str, labels: Sequence[str], bounds: Sequence[float]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.bounds = tuple(bounds)
        self.series: dict[Key, list[float]] = {}
        self.lock = threading.Lock()

    def observe(self, key: Key, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)  # the first bound >= value
        with self.lock:
            counts = self.series.get(key)
            if counts is None:
                counts = self.series[key] = [0.0] * (len(self.bounds) + 2)
            counts[index] += 1
            counts[-1] += value

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        with self.lock:
            items = [(key, list(counts)) for key, counts in self.series.items()]
        for key, counts in items:
            running = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*self.bounds, float("inf")), counts[:-1], strict=True):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            fam.add_metric(list(key), buckets, sum_value=counts[-1])
        return fam


class Metrics(Collector):
    """The metrics of one app: what its workers and API did, what its store holds now,
    and its business metrics. Build it with ``flowdesk.observe.instrument(app)``."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.registry = CollectorRegistry()
        c, h = _Counter, _Histogram
        self.runs_started = c(
            "flowdesk_runs_started_total", "Runs that began executing (first claim).", ["workflow"]
        )
        self.runs_finished = c(
            "flowdesk_runs_finished_total",
            "Runs that ended, by final status.",
            ["workflow", "status"],
        )
        self.lease_recoveries = c(
            "flowdesk_lease_recoveries_total",
            "Runs claimed again after their lease expired (their worker died or stalled).",
            ["workflow"],
        )
        self.step_duration = h(
            "flowdesk_step_duration_seconds",
            "Steps executed (not replayed): every attempt until the outcome is recorded.",
            ["workflow", "step", "status"],
            STEP_BUCKETS,
        )
        self.step_retries = c(
            "flowdesk_step_retries_total",
            "Attempts of steps beyond their first.",
            ["workflow", "step"],
        )
        self.task_completion = h(
            "flowdesk_task_completion_seconds",
            "Time from a human task's creation to its completion, by a person or by an "
            "escalation's automatic decision.",
            ["kind", "by"],
            HUMAN_BUCKETS,
        )
        self.escalations = c(
            "flowdesk_task_escalations_total",
            "Escalations of human tasks applied, by action.",
            ["kind", "action"],
        )
        self.model_duration = h(
            "flowdesk_model_call_duration_seconds",
            "Model calls through the gateway.",
            ["task", "model"],
            MODEL_BUCKETS,
        )
        self.model_confidence = h(
            "flowdesk_model_confidence",
            "Confidence of model answers (calls that reported one).",
            ["task", "model"],
            CONFIDENCE_BUCKETS,
        )
        self.model_cost = c(
            "flowdesk_model_cost_usd_total", "Cost of model calls in US dollars.", ["task", "model"]
        )
        self.workflow_cost = c(
            "flowdesk_workflow_model_cost_usd_total",
            "Cost of the model calls made by runs of each workflow, in US dollars (per run: "
            "the model ledger, `flowdesk models usage`).",
            ["workflow"],
        )
        self._own: list[_Counter | _Histogram] = [
            self.runs_started,
            self.runs_finished,
            self.lease_recoveries,
            self.step_duration,
            self.step_retries,
            self.task_completion,
            self.escalations,
            self.model_duration,
            self.model_confidence,
            self.model_cost,
            self.workflow_cost,
        ]
        self._business: dict[str, _Counter | _Histogram] = {}
        self._business_lock = threading.Lock()
        self._runs: list[base.RunGauge] = []
        self._tasks: list[base.TaskGauge] = []
        self._store_up = 0.0
        self._read_at = 0.0
        self._refreshing: asyncio.Lock | None = None
        self.registry.register(self)
        _latest[0] = weakref.ref(self)

    # -- recording ---------------------------------------------------------------------
    def business(self, defn: observe_port.MetricDef, value: float, labels: dict[str, str]) -> None:
        """Record a business metric (``Context.metric`` gets here, first executions only)."""
        metric = self._business.get(defn.name) or self._declare(defn)
        key = tuple(labels[name] for name in defn.labels)
        if isinstance(metric, _Histogram):
            metric.observe(key, value)
        elif isinstance(metric, _Gauge):
            metric.set(key, value)
        else:
            metric.inc(key, value)

    def _declare(self, defn: observe_port.MetricDef) -> _Counter | _Histogram:
        with self._business_lock:
            metric = self._business.get(defn.name)
            if metric is None:
                metric = (
                    _Histogram(defn.name, defn.doc, defn.labels, defn.buckets or BUSINESS_BUCKETS)
                    if defn.kind == "histogram"
                    else (_Gauge if defn.kind == "gauge" else _Counter)(
                        defn.name, defn.doc, defn.labels
                    )
                )
                self._business[defn.name] = metric
            return metric

    def model_call(
        self,
        task: str,
        model: str,
        latency_s: float,
        confidence: float | None,
        cost_usd: float | None,
        workflow: str | None = None,
    ) -> None:
        key = (task, model)
        if workflow:
            self.workflow_cost.inc((workflow,), max(0.0, float(cost_usd or 0.0)))
        self.model_duration.observe(key, max(0.0, float(latency_s)))
        if confidence is not None:
            self.model_confidence.observe(key, float(confidence))
        if cost_usd:
            self.model_cost.inc(key, max(0.0, float(cost_usd)))
        elif key not in self.model_cost.values:
            self.model_cost.inc(key, 0.0)

    # -- exposition --------------------------------------------------------------------
    async def refresh(self, max_age: float = 1.0) -> None:
        """Read the store gauges again (at most once per ``max_age`` seconds, however
        many scrapers ask at once). A store that does not answer sets
        ``flowdesk_metrics_store_up`` to 0 and leaves the store gauges out."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if time.monotonic() - self._read_at < max_age:
                return
            try:
                await self.app.open()
                runs = await self.app.store.run_gauges()
                tasks = await self.app.store.task_gauges()
            except Exception as exc:
                log.warning("metrics: the store did not answer (%s)", exc)
                self._runs, self._tasks, self._store_up = [], [], 0.0
            else:
                self._runs, self._tasks, self._store_up = runs, tasks, 1.0
            self._read_at = time.monotonic()

    async def render(self) -> bytes:
        """The text exposition of every metric, store gauges read now."""
        await self.refresh()
        return generate_latest(self.registry)

    def describe(self) -> Iterable[Metric]:
        return []  # names vary as business metrics are declared: no clash checks

    def collect(self) -> Iterable[Metric]:
        for metric in self._own:
            yield metric.family()
        for defn in list(self.app.metrics.defs.values()):
            yield (self._business.get(defn.name) or self._declare(defn)).family()
        yield from self._store_families()

    def _store_families(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "flowdesk_metrics_store_up", "1 when the last read of the store gauges worked."
        )
        up.add_metric([], self._store_up)
        yield up
        runs = GaugeMetricFamily(
            "flowdesk_runs",
            "Active runs (queued, running, waiting) in the store.",
            labels=["queue", "workflow", "status"],
        )
        depth = GaugeMetricFamily(
            "flowdesk_queue_depth",
            "Runs a worker could claim now (queued and due, timers fired, leases expired).",
            labels=["queue"],
        )
        lag = GaugeMetricFamily(
            "flowdesk_queue_lag_seconds",
            "How long the oldest claimable run of the queue has been due.",
            labels=["queue"],
        )
        due: dict[str, int] = {}
        oldest: dict[str, int] = {}
        for g in self._runs:
            runs.add_metric([g.queue, g.workflow, g.status.value], g.count)
            due[g.queue] = due.get(g.queue, 0) + g.due
            if g.oldest_due_at is not None:
                oldest[g.queue] = min(oldest.get(g.queue, g.oldest_due_at), g.oldest_due_at)
        now = base.now_ms()
        for queue in sorted(set(due) | set(self.app.queues) | _declared_queues(self.app)):
            depth.add_metric([queue], due.get(queue, 0))
            at = oldest.get(queue)
            lag.add_metric([queue], 0.0 if at is None else max(0.0, (now - at) / 1000))
        tasks = GaugeMetricFamily(
            "flowdesk_tasks", "Open and claimed human tasks.", labels=["kind", "status"]
        )
        overdue = GaugeMetricFamily(
            "flowdesk_tasks_overdue",
            "Open or claimed human tasks past their due time (SLA breaches).",
            labels=["kind"],
        )
        late: dict[str, int] = {}
        for t in self._tasks:
            tasks.add_metric([t.kind, t.status], t.count)
            late[t.kind] = late.get(t.kind, 0) + t.overdue
        for kind, count in sorted(late.items()):
            overdue.add_metric([kind], count)
        if self._store_up:
            yield from (runs, depth, lag, tasks, overdue)


def _declared_queues(app: App) -> set[str]:
    return {w.queue for w in app.registry.workflows.values()}


# -- model calls (the gateway reports them) --------------------------------------------------

_current: contextvars.ContextVar[Metrics | None] = contextvars.ContextVar(
    "flowdesk_metrics", default=None
)
_latest: list[weakref.ref[Metrics] | None] = [None]


def record_model_call(
    task: str,
    model: str,
    latency_s: float,
    confidence: float | None,
    cost_usd: float | None,
    *,
    metrics: Metrics | None = None,
    workflow: str | None = None,
) -> None:
    """Count one model call: its latency, its answer's confidence (None when the model
    gives none) and its cost, and the cost under the calling run's ``workflow`` when it
    has one. The model gateway calls this once per call it makes.

    It lands in the metrics of the app whose run is executing here (a call made inside a
    step), else in those of the app instrumented last in this process; with none, it is
    dropped. ``task`` and ``model`` are names from the gateway's configuration (never
    prompts or answers)."""
    target = metrics or _current.get()
    if target is None:
        ref = _latest[0]
        target = None if ref is None else ref()
    if target is not None:
        target.model_call(task, model, latency_s, confidence, cost_usd, workflow)


def bind(metrics: Metrics | None) -> contextvars.Token[Metrics | None]:
    """Make ``metrics`` the target of `record_model_call` in this context (a run's task)."""
    return _current.set(metrics)


def unbind(token: contextvars.Token[Metrics | None]) -> None:
    _current.reset(token)


# -- a scrape endpoint for processes without the HTTP API (``flowdesk worker``) ----------------


async def serve(metrics: Metrics, host: str = "127.0.0.1", port: int = 9464) -> asyncio.Server:
    """Serve ``GET /metrics`` on ``host:port`` from this event loop (one short HTTP/1.0
    exchange per connection, for Prometheus). Close the returned server to stop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""
            if parts[:1] == [b"GET"] and path == b"/metrics":
                status, kind, body = b"200 OK", CONTENT_TYPE.encode(), await metrics.render()
            else:
                status, kind, body = b"404 Not Found", b"text/plain", b"GET /metrics\n"
            writer.write(
                b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body
            )  # fmt: skip
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
