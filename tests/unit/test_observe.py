"""Observability (`flowdesk.observe`) on both stores: the Prometheus ``/metrics`` of a real
API and worker, replay-safe business metrics, human-task and model metrics, one trace per
run across a wait and a second worker, structured log lines that name their run, step and
actor, and a real ``flowdesk worker`` process (JSON logs, its own metrics port) killed with
SIGKILL so that another worker recovers its run."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import importlib.util
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import prometheus_client
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

import flowdesk
from flowdesk import RunStatus, errors, observe
from flowdesk.engine import tasks
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.humans.inbox import Inbox
from flowdesk.observe import logs
from flowdesk.server import api
from flowdesk.server import app as server
from flowdesk.store import people
from flowdesk.store.people import Person

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition (the parser refuses a bad one)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(app: flowdesk.App) -> Samples:
    return parse((await observe.metrics_of(app).render()).decode())


# -- 1. /metrics -----------------------------------------------------------------------------


def register(app: flowdesk.App) -> dict[str, int]:
    calls = {"flaky": 0}
    approved = app.metrics.counter(
        "invoices_auto_approved_total", "Invoices approved without a person.", ["tier"]
    )
    app.metrics.histogram(
        "time_to_resolution_seconds", "From receipt to decision.", buckets=[1, 10, 100]
    )

    @app.step(name="add")
    async def add(a: int, b: int) -> int:
        return a + b

    @app.step(name="flaky_step", retries=3, retry_delay=0.01, jitter=False)
    async def flaky_step() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise RuntimeError("not yet")
        return "ok"

    @app.step(name="boom")
    async def boom() -> None:
        raise RuntimeError("broken on purpose")

    @app.workflow("sum")
    async def sum_(ctx: flowdesk.Context, a: int) -> int:
        total = int(await ctx.step(add, a, 1))
        ctx.metric(approved, 1, tier="gold")
        ctx.metric("time_to_resolution_seconds", 12.5)
        return total

    @app.workflow("flaky")
    async def flaky(ctx: flowdesk.Context) -> str:
        return str(await ctx.step(flaky_step))

    @app.workflow("broken")
    async def broken(ctx: flowdesk.Context) -> None:
        await ctx.step(boom)

    @app.workflow("waiter")
    async def waiter(ctx: flowdesk.Context, email: str) -> Any:
        return await ctx.wait_signal("go")

    @app.workflow("idle", queue="idle")
    async def idle(ctx: flowdesk.Context) -> None:
        return None

    return calls


async def test_metrics_endpoint_shows_runs_steps_queues_and_business_metrics(
    app, tmp_path, wait_status
):
    calls = register(app)
    api_app = server.create_app(app, audit=audit_log.AuditLog(app, tmp_path / "audit.key"))
    transport = httpx.ASGITransport(app=api_app)
    async with (
        app,
        httpx.AsyncClient(transport=transport, base_url="http://flowdesk.test") as client,
        app.worker(queues=["default"]),  # nobody works on queue "idle"
    ):
        ok = await app.start("sum", {"a": 1})
        assert await ok.result(timeout=15) == 2
        assert await (await app.start("flaky")).result(timeout=15) == "ok"
        failed = await app.start("broken")
        await wait_status(app, failed.id, RunStatus.FAILED)
        waiting = await app.start("waiter", {"email": "ann.lee@example.com"})
        await wait_status(app, waiting.id, RunStatus.WAITING)
        await app.start("idle")
        r = await client.get("/metrics")  # a loopback client: no token needed by default
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain")
        text = r.text
        await app.cancel(waiting.id)
        after_cancel = parse((await client.get("/metrics")).text)
    m = parse(text)
    assert calls["flaky"] == 3
    # counters by workflow and status
    assert value(m, "flowdesk_runs_started_total", workflow="sum") == 1
    assert value(m, "flowdesk_runs_finished_total", workflow="sum", status="succeeded") == 1
    assert value(m, "flowdesk_runs_finished_total", workflow="broken", status="failed") == 1
    assert value(m, "flowdesk_runs_started_total", workflow="idle") == 0
    # step latency histograms by workflow and step; retries
    step = {"workflow": "sum", "step": "add", "status": "ok"}
    assert value(m, "flowdesk_step_duration_seconds_count", **step) == 1
    assert value(m, "flowdesk_step_duration_seconds_bucket", le="+Inf", **step) == 1
    assert value(m, "flowdesk_step_duration_seconds_sum", **step) > 0
    broken = {"workflow": "broken", "step": "boom", "status": "error"}
    assert value(m, "flowdesk_step_duration_seconds_count", **broken) == 1
    assert value(m, "flowdesk_step_retries_total", workflow="flaky", step="flaky_step") == 2
    # gauges read from the store at scrape time
    assert value(m, "flowdesk_runs", queue="default", workflow="waiter", status="waiting") == 1
    assert value(m, "flowdesk_runs", queue="idle", workflow="idle", status="queued") == 1
    assert value(m, "flowdesk_queue_depth", queue="idle") == 1
    assert value(m, "flowdesk_queue_depth", queue="default") == 0
    assert value(m, "flowdesk_queue_lag_seconds", queue="idle") >= 0
    assert value(m, "flowdesk_metrics_store_up") == 1
    # business metrics the app declared
    assert value(m, "invoices_auto_approved_total", tier="gold") == 1
    assert value(m, "time_to_resolution_seconds_bucket", le="100.0") == 1
    assert value(m, "time_to_resolution_seconds_bucket", le="10.0") == 0
    # a cancel of a waiting run (no worker executes it) is counted too; it left the gauges
    assert (
        value(after_cancel, "flowdesk_runs_finished_total", workflow="waiter", status="cancelled")
        == 1
    )
    assert value(after_cancel, "flowdesk_runs", workflow="waiter", status="waiting") == 0
    # labels carry names and statuses only: never the payload
    assert "ann.lee" not in text and "example.com" not in text
    # a registry of the app's own: the process-wide one knows nothing of it
    assert b"flowdesk_runs_started_total" not in prometheus_client.generate_latest()


async def test_each_app_has_its_own_registry(make_app):
    first, second = make_app(), make_app()
    for a in (first, second):
        register(a)
        observe.instrument(a)
    assert observe.instrument(first) is first.observer  # installing again changes nothing
    async with first, second, first.worker():
        assert await (await first.start("sum", {"a": 2})).result(timeout=15) == 3
        ran, idle = await scrape(first), await scrape(second)
    assert value(ran, "flowdesk_runs_started_total", workflow="sum") == 1
    assert value(idle, "flowdesk_runs_started_total", workflow="sum") == 0
    assert value(idle, "invoices_auto_approved_total", tier="gold") == 0


async def test_who_may_scrape_is_configurable(app, tmp_path):
    register(app)
    key = tmp_path / "audit.key"
    async with app:
        ids = identity.Identity(app)
        await ids.create_user("vera", roles=["viewer"])
        await ids.create_user("anna", roles=["approver"])
        viewer = {"Authorization": f"Bearer {(await ids.create_token('vera'))[1]}"}
        approver = {"Authorization": f"Bearer {(await ids.create_token('anna'))[1]}"}

        async def get(access: str, client: tuple[str, int], headers: Any = None) -> int:
            api_app = server.create_app(
                app, audit=audit_log.AuditLog(app, key), metrics_access=access
            )
            transport = httpx.ASGITransport(app=api_app, client=client)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                r = await c.get("/metrics", headers=headers)
                return r.status_code

        remote, local, local6 = ("10.1.2.3", 40000), ("127.0.0.1", 40000), ("::1", 40000)
        assert await get("local", local) == 200
        assert await get("local", local6) == 200
        assert await get("local", remote) == 401
        assert await get("local", remote, viewer) == 200
        assert await get("local", remote, approver) == 403  # may not read runs
        assert await get("open", remote) == 200
        assert await get("token", local) == 401
        assert await get("token", local, viewer) == 200
    with pytest.raises(errors.ConfigurationError, match="metrics access"):
        server.create_app(app, metrics_access="everyone")


# -- business metrics: declared, checked, counted once ------------------------------------


async def test_business_metrics_are_not_counted_again_on_replay(app, wait_status, wait_until):
    stages = app.metrics.counter("order_stages_total", "Stages orders passed.", ["stage"])
    fails = {"left": 1}

    @app.step(name="prepare")
    async def prepare() -> int:
        return 1

    @app.step(name="ship")
    async def ship() -> str:
        if fails["left"]:
            fails["left"] -= 1
            raise RuntimeError("carrier down")
        return "shipped"

    @app.workflow("order")
    async def order(ctx: flowdesk.Context) -> str:
        ctx.metric(stages, stage="received")  # before any recorded call
        await ctx.step(prepare)
        ctx.metric(stages, stage="prepared")
        await ctx.wait_signal("paid")  # the run parks: replayed from here on
        ctx.metric(stages, stage="paid")
        result = str(await ctx.step(ship))  # fails once; retried by an operator
        ctx.metric(stages, stage="shipped")
        return result

    observe.instrument(app)

    async def counts() -> dict[str, float]:
        m = await scrape(app)
        names = ("received", "prepared", "paid", "shipped")
        return {s: value(m, "order_stages_total", stage=s) for s in names}

    async def settles_at(expected: dict[str, float]) -> None:
        # A recording is counted just after the next call commits, which the store shows
        # a moment before the worker hands the count over: poll (a double count never
        # equals the expected figures, so it still fails).
        async def reached() -> bool:
            return await counts() == expected

        await wait_until(reached, what=f"counts {expected}")

    async with app, app.worker():
        h = await app.start("order")
        await wait_status(app, h.id, RunStatus.WAITING)
        await settles_at({"received": 1, "prepared": 1, "paid": 0, "shipped": 0})
        await app.signal(h.id, "paid")
        await wait_status(app, h.id, RunStatus.FAILED)
        # the second segment replayed "received" and "prepared" without counting them
        await settles_at({"received": 1, "prepared": 1, "paid": 1, "shipped": 0})
        await app.retry(h.id)
        assert await h.result(timeout=15) == "shipped"
        # the retry replayed everything up to the failed step: only "shipped" is new
        await settles_at({"received": 1, "prepared": 1, "paid": 1, "shipped": 1})


async def test_a_recording_that_does_not_fit_its_declaration_fails_the_run(app, wait_status):
    app.metrics.counter("tickets_total", "Tickets.", ["channel"])

    @app.workflow("leaky")
    async def leaky(ctx: flowdesk.Context, who: str) -> None:
        ctx.metric("tickets_total", 1, channel=who)

    observe.instrument(app)
    async with app, app.worker():
        good = await app.start("leaky", {"who": "email"})
        await good.result(timeout=15)
        bad = await app.start("leaky", {"who": "ann@example.com"})
        run = await wait_status(app, bad.id, RunStatus.FAILED)
        m = await scrape(app)
    assert run.error is not None and run.error["type"] == "ConfigurationError"
    assert "personal data" in run.error["message"]
    assert value(m, "tickets_total", channel="email") == 1
    assert "ann@example.com" not in (await observe.metrics_of(app).render()).decode()


def test_metric_declarations_are_checked():
    catalog = flowdesk.App("sqlite:///:memory:").metrics
    counter = catalog.counter("a_total", "A.", ["kind"])
    assert catalog.counter("a_total", "A.", ["kind"]) is not None  # the same again: fine
    for bad in (
        lambda: catalog.gauge("a_total", "A."),  # used for another metric
        lambda: catalog.counter("flowdesk_mine_total", "engine prefix"),
        lambda: catalog.counter("9lives", "bad name"),
        lambda: catalog.counter("b_total", "dup label", ["x", "x"]),
        lambda: catalog.get("never_declared"),
        lambda: counter.check(1, {}),  # a declared label missing
        lambda: counter.check(1, {"kind": "x", "extra": "y"}),
        lambda: counter.check(-1, {"kind": "x"}),  # counters only go up
        lambda: counter.check(1, {"kind": "has space"}),
        lambda: counter.check(float("nan"), {"kind": "x"}),
    ):
        with pytest.raises(errors.ConfigurationError):
            bad()
    counter.check(2.5, {"kind": "gold-tier:v2"})


# -- human tasks and model calls ----------------------------------------------------------------


class Decision(BaseModel):
    approved: bool


async def test_human_task_backlog_sla_breaches_completion_and_escalations(
    app, wait_status, wait_until
):
    @app.workflow("approve")
    async def approve(ctx: flowdesk.Context) -> bool:
        decision = await ctx.human_task(
            "approve",
            title="Approve",
            form=Decision,
            candidates=tasks.Assignees(users=["anna"]),
            due=timedelta(milliseconds=1),
            escalation=tasks.Escalation.notify(reason="late"),
        )
        return decision.approved

    @app.workflow("auto")
    async def auto(ctx: flowdesk.Context) -> bool:
        decision = await ctx.human_task(
            "triage",
            title="Triage",
            form=Decision,
            candidates=tasks.Assignees(users=["anna"]),
            due=timedelta(milliseconds=1),
            escalation=tasks.Escalation.auto_decide(Decision(approved=False), reason="no one"),
        )
        return decision.approved

    observe.instrument(app)
    async with app, app.worker():
        h = await app.start("approve")
        await wait_status(app, h.id, RunStatus.WAITING)

        async def escalated() -> Any:
            m = await scrape(app)
            return m if value(m, "flowdesk_task_escalations_total", **late) else None

        late = {"kind": "approve", "action": "notify"}
        m = await wait_until(escalated, what="the notify escalation is counted")
        assert value(m, "flowdesk_tasks", kind="approve", status="open") == 1
        assert value(m, "flowdesk_tasks_overdue", kind="approve") == 1  # an SLA breach
        page = await app.store.list_tasks(people.TaskQuery(run_id=h.id))
        await Inbox(app).complete(page.items[0].id, Person("anna"), {"approved": True})
        assert await h.result(timeout=15) is True
        assert await (await app.start("auto")).result(timeout=15) is False
        m = await scrape(app)
    person = {"kind": "approve", "by": "person"}
    assert value(m, "flowdesk_task_completion_seconds_count", **person) == 1
    assert value(m, "flowdesk_task_completion_seconds_sum", **person) > 0
    by_rule = {"kind": "triage", "by": "escalation"}
    assert value(m, "flowdesk_task_completion_seconds_count", **by_rule) == 1
    assert value(m, "flowdesk_task_escalations_total", kind="triage", action="auto_decide") == 1
    assert value(m, "flowdesk_tasks", kind="approve", status="open") == 0
    assert value(m, "flowdesk_tasks_overdue", kind="approve") == 0


async def test_model_calls_land_in_the_metrics_of_the_app_running_the_step(make_app):
    app, other = make_app(), make_app()

    @app.step(name="classify")
    async def classify() -> str:
        observe.metrics.record_model_call("classify", "sk-local", 0.2, 0.93, 0.0004)
        return "invoice"

    @app.step(name="extract")
    def extract() -> str:  # a sync step: it runs in a thread, the run's context with it
        observe.metrics.record_model_call("extract", "llm-small", 1.5, None, 0.002)
        return "fields"

    @app.workflow("read")
    async def read(ctx: flowdesk.Context) -> list[str]:
        return [await ctx.step(classify), await ctx.step(extract)]

    mine = observe.metrics_of(app)
    observe.instrument(other)  # instrumented last: the default outside any run
    async with app, other, app.worker():
        assert await (await app.start("read")).result(timeout=15) == ["invoice", "fields"]
        observe.metrics.record_model_call("classify", "sk-local", 0.1, 0.5, None, metrics=mine)
        observe.metrics.record_model_call("route", "sk-local", 0.1, 0.5, None)  # outside a run
        m, o = await scrape(app), await scrape(other)
    sk = {"task": "classify", "model": "sk-local"}
    assert value(m, "flowdesk_model_call_duration_seconds_count", **sk) == 2
    assert value(m, "flowdesk_model_confidence_bucket", le="0.95", **sk) == 2
    assert value(m, "flowdesk_model_confidence_bucket", le="0.9", **sk) == 1
    assert value(m, "flowdesk_model_cost_usd_total", **sk) == pytest.approx(0.0004)
    llm = {"task": "extract", "model": "llm-small"}
    assert value(m, "flowdesk_model_call_duration_seconds_sum", **llm) == pytest.approx(1.5)
    assert value(m, "flowdesk_model_confidence_count", **llm) == 0  # it gave none
    assert value(m, "flowdesk_model_cost_usd_total", **llm) == pytest.approx(0.002)
    assert value(o, "flowdesk_model_call_duration_seconds_count", **sk) == 0
    route = {"task": "route", "model": "sk-local"}
    assert value(o, "flowdesk_model_call_duration_seconds_count", **route) == 1


# -- 2. spans: one trace per run, across waits and workers ------------------------------------


def _tracer(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _traceparent(span: ReadableSpan) -> str:
    c = span.context
    assert c is not None
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


async def test_a_run_that_waits_and_resumes_on_another_worker_is_one_trace(
    make_app, wait_status, query
):
    exporter = InMemorySpanExporter()

    def build() -> flowdesk.App:
        app = make_app()

        @app.step(name="fetch")
        async def fetch() -> str:
            with observe.tracing.model_span("classify", "sk-local") as span:
                span.set_attribute("flowdesk.model.confidence", 0.9)
            with observe.tracing.connector_span("erp", "post_invoice"):
                pass
            return "doc"

        @app.step(name="post")
        async def post(doc: str) -> str:
            return doc + ":posted"

        @app.workflow("traced")
        async def traced(ctx: flowdesk.Context) -> str:
            doc = await ctx.step(fetch)
            await ctx.wait_signal("go")
            await ctx.sleep(0.3)
            return str(await ctx.step(post, doc))

        return app

    first, second = build(), build()  # two processes, in effect, with providers of their own
    observe.instrument(first, tracer_provider=_tracer(exporter))
    observe.instrument(second, tracer_provider=_tracer(exporter))
    async with first:
        async with first.worker():
            h = await first.start("traced")
            await wait_status(first, h.id, RunStatus.WAITING)
        await first.signal(h.id, "go")
    async with second, second.worker():
        assert await second.result(h.id, timeout=15) == "doc:posted"

    spans = exporter.get_finished_spans()
    runs = sorted((s for s in spans if s.name == "run traced"), key=lambda s: s.start_time or 0)
    assert len(runs) == 3  # first segment, after the signal, after the sleep
    root = runs[0]
    assert root.parent is None
    assert {s.context.trace_id for s in spans if s.context} == {root.context.trace_id}
    for resumed in runs[1:]:
        assert resumed.parent is not None and resumed.parent.span_id == root.context.span_id
        assert resumed.attributes["flowdesk.resumed"] is True
    assert [s.attributes["flowdesk.outcome"] for s in runs] == [
        "suspended",
        "suspended",
        "succeeded",
    ]
    assert all(s.attributes["flowdesk.run_id"] == h.id for s in runs)
    (stored,) = query("SELECT trace_context FROM runs WHERE id = ?", (h.id,))[0]
    assert stored == _traceparent(root)

    steps = {s.attributes["flowdesk.step.name"]: s for s in spans if s.name.startswith("step ")}
    assert {name: s.attributes["flowdesk.step.seq"] for name, s in steps.items()} == {
        "fetch": 1,
        "post": 4,
    }
    assert steps["fetch"].parent.span_id == runs[0].context.span_id
    assert steps["post"].parent.span_id == runs[2].context.span_id
    assert all(s.attributes["flowdesk.run_id"] == h.id for s in steps.values())
    assert all(s.attributes["flowdesk.step.status"] == "ok" for s in steps.values())
    (model,) = [s for s in spans if s.name == "model classify"]
    (connector,) = [s for s in spans if s.name == "connector erp.post_invoice"]
    for call in (model, connector):
        assert call.parent.span_id == steps["fetch"].context.span_id
        assert (call.attributes["flowdesk.run_id"], call.attributes["flowdesk.step.seq"]) == (
            h.id,
            1,
        )
    assert connector.attributes["flowdesk.idempotency_key"] == f"{h.id}:1"
    assert model.attributes["flowdesk.model.name"] == "sk-local"


def test_tracing_is_off_without_a_provider_and_exports_by_otlp_when_configured(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    plain = flowdesk.App("sqlite:///:memory:")
    assert plain.observer is None  # nothing is installed behind an app's back
    assert observe.instrument(plain).tracing is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    traced = observe.instrument(flowdesk.App("sqlite:///:memory:"))
    assert traced.tracing is not None
    provider = traced.tracing.provider
    assert isinstance(provider, TracerProvider)
    provider.shutdown()  # nothing was exported: no collector is needed


# -- 3. structured logs ------------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every line logged anywhere, formatted as JSON the way `logs.configure` sets it up."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    test_log = logging.getLogger("obs.test")
    level = test_log.level
    test_log.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        test_log.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_every_line_a_run_logs_names_its_run_step_and_actor(app, wait_status, captured):
    say = logging.getLogger("obs.test")

    @app.step(name="fetch")
    async def fetch() -> int:
        say.info("fetching")
        return 1

    @app.step(name="score")
    def score(x: int) -> int:  # runs in a step thread
        say.info("scoring %s", x)
        return x + 1

    @app.workflow("logged")
    async def logged(ctx: flowdesk.Context) -> None:
        say.info("starting")
        x = await ctx.step(fetch)
        await ctx.step(score, x)
        say.info("between steps")
        await ctx.sleep(0.05)  # the run parks and resumes: a second segment
        say.info("after the sleep")
        raise ValueError("no rule for this case")  # the worker logs the failure

    observe.instrument(app)
    async with app, app.worker():
        h = await app.start("logged")
        await wait_status(app, h.id, RunStatus.FAILED)
    got = [e for e in lines(captured) if e["logger"] in ("obs.test", "flowdesk.worker")]
    expected = [
        ("starting", 0, ""),
        ("fetching", 1, "fetch"),
        ("scoring 1", 2, "score"),
        ("between steps", 2, "score"),
        # the second segment replays the workflow body (not the steps) up to the sleep
        ("starting", 0, ""),
        ("between steps", 2, "score"),
        ("after the sleep", 3, "sleep"),
    ]
    assert [(e["message"], e["seq"], e["step"]) for e in got[:-1]] == expected
    assert "no rule for this case" in got[-1]["message"] and got[-1]["level"] == "WARNING"
    for entry in got:
        assert (entry["run_id"], entry["workflow"], entry["actor"]) == (h.id, "logged", "system")
        assert {"seq", "step", "worker", "time", "level"} <= set(entry)


async def test_every_line_a_request_logs_names_the_request_and_actor(app, tmp_path, captured):
    say = logging.getLogger("obs.test")
    register(app)
    api_app = server.create_app(app, audit=audit_log.AuditLog(app, tmp_path / "audit.key"))

    async def probe(user: api.User) -> dict[str, str]:
        say.info("handling for %s", user.id)
        return {}

    api_app.add_api_route("/probe", probe, methods=["GET"])
    async with app:
        await identity.Identity(app).create_user("vera", roles=["viewer"])
        secret = (await identity.Identity(app).create_token("vera"))[1]
        transport = httpx.ASGITransport(app=api_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            auth = {"Authorization": f"Bearer {secret}"}
            r = await client.get("/probe", headers={**auth, "X-Request-ID": "req-42"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
            r = await client.get("/probe", headers=auth)
            fresh = r.headers["x-request-id"]
    got = [e for e in lines(captured) if e["logger"] == "obs.test"]
    assert [(e["request_id"], e["actor"], e["method"], e["path"]) for e in got] == [
        ("req-42", "vera", "GET", "/probe"),
        (fresh, "vera", "GET", "/probe"),
    ]
    assert "run_id" not in got[0]


def test_text_lines_carry_the_context_in_brackets():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain %s", ("line",), None)
    assert logs.TextFormatter().format(record).endswith("x plain line")
    record.flowdesk = {"run_id": "r1", "seq": 2, "step": "fetch", "actor": "system"}
    assert (
        logs.TextFormatter()
        .format(record)
        .endswith("plain line [run_id=r1 seq=2 step=fetch actor=system]")
    )
    with pytest.raises(errors.ConfigurationError):
        logs.configure("xml")


# -- a real worker process: JSON logs, its metrics port, a lease recovered after SIGKILL ---------

APP_SOURCE = """
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import flowdesk

app = flowdesk.App(poll_interval=0.05)
handled = app.metrics.counter("documents_handled_total", "Documents handled.", ["kind"])


@app.step(name="hold")
async def hold() -> str:
    marker = os.environ.get("OBS_MARKER")
    if marker:  # the first worker: say so, then hold the run until it is killed
        logging.getLogger("obsapp").info("holding the run")
        Path(marker).write_text("held")
        await asyncio.sleep(3600)
    return "released"


@app.workflow("held")
async def held(ctx: flowdesk.Context) -> str:
    ctx.metric(handled, kind="invoice")
    return str(await ctx.step(hold))


@app.step(name="greet_step")
def greet_step(name: str) -> str:
    logging.getLogger("obsapp").info("greeting")
    return "hello " + name


@app.workflow("greet")
async def greet(ctx: flowdesk.Context, name: str) -> str:
    return str(await ctx.step(greet_step, name))
"""


def _load(source: Path, db_url: str) -> flowdesk.App:
    spec = importlib.util.spec_from_file_location(f"obsapp_{source.parent.name}", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app: flowdesk.App = module.app
    app.database_url = db_url
    return app


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "FLOWDESK_LOG_LEVEL": "INFO", **extra}
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def test_a_killed_worker_process_run_is_recovered_and_counted(
    db_url, tmp_path, wait_status, wait_until
):
    source = tmp_path / "obsapp.py"
    source.write_text(APP_SOURCE)
    app = _load(source, db_url)
    marker, port = tmp_path / "held", _free_port()
    err = (tmp_path / "worker.err").open("wb")
    command = [
        *(sys.executable, "-m", "flowdesk", "worker", "--app", f"{source}:app"),
        *("--database-url", db_url, "--lease-seconds", "1", "--poll-interval", "0.05"),
        *("--log-format", "json", "--metrics-port", str(port)),
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=_env(OBS_MARKER=str(marker)),
        start_new_session=True,
    )
    try:
        async with app:
            h = await app.start("held")
            await wait_until(marker.exists, timeout=60, what="the worker process holds the run")
            async with httpx.AsyncClient() as client:
                r = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
                assert (await client.get(f"http://127.0.0.1:{port}/x")).status_code == 404
            assert r.status_code == 200
            theirs = parse(r.text)
            assert value(theirs, "flowdesk_runs_started_total", workflow="held") == 1
            # counted only once the workflow's next call is recorded: "hold" never is
            assert value(theirs, "documents_handled_total", kind="invoice") == 0
            assert (
                value(theirs, "flowdesk_runs", queue="default", workflow="held", status="running")
                == 1
            )

            os.killpg(proc.pid, signal.SIGKILL)  # the crash: no goodbye, the lease runs out
            proc.wait(10)
            observe.instrument(app)
            async with app.worker():
                assert await h.result(timeout=30) == "released"
            ours = await scrape(app)
    finally:
        _stop(proc)
        err.close()
    assert value(ours, "flowdesk_lease_recoveries_total", workflow="held") == 1
    assert value(ours, "flowdesk_runs_started_total", workflow="held") == 0  # not a new start
    assert value(ours, "flowdesk_runs_finished_total", workflow="held", status="succeeded") == 1
    # The killed worker never recorded what followed the recording: the worker that took
    # the run over executed that code for the first time, and counted it (once in all).
    assert value(ours, "documents_handled_total", kind="invoice") == 1
    logged = [
        json.loads(line)
        for line in (tmp_path / "worker.err").read_text().splitlines()
        if line.startswith("{")
    ]
    (held,) = [e for e in logged if e["message"] == "holding the run"]
    assert (held["run_id"], held["seq"], held["step"], held["actor"]) == (h.id, 1, "hold", "system")
    assert held["logger"] == "obsapp" and held["workflow"] == "held"


def test_the_observe_package_exports_what_it_documents():
    assert observe.__all__ == sorted(observe.__all__)
    assert {name for name in observe.__all__ if not hasattr(observe, name)} == set()
    assert observe.metrics.__all__ == sorted(observe.metrics.__all__)
    assert observe.tracing.__all__ == sorted(observe.tracing.__all__)


async def test_serve_logs_json_lines_and_serves_metrics(db_url, tmp_path, wait_until):
    source = tmp_path / "obsapp.py"
    source.write_text(APP_SOURCE)
    app, port = _load(source, db_url), _free_port()
    err = (tmp_path / "serve.err").open("wb")
    command = [
        *(sys.executable, "-m", "flowdesk", "serve", "--app", f"{source}:app"),
        *("--database-url", db_url, "--port", str(port), "--log-format", "json"),
        *("--key-file", str(tmp_path / "audit.key")),
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=err, env=_env(), start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:

            async def up() -> bool:
                try:
                    return (await client.get("/health")).status_code == 200
                except httpx.TransportError:
                    assert proc.poll() is None, "flowdesk serve exited"
                    return False

            await wait_until(up, timeout=60, what="flowdesk serve answers")
            async with app:
                h = await app.start("greet", {"name": "ann"})
                assert await h.result(timeout=30) == "hello ann"  # the embedded worker ran it
            r = await client.get("/metrics", headers={"X-Request-ID": "scrape-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "scrape-1"
        m = parse(r.text)
        done = {"workflow": "greet", "status": "succeeded"}
        assert value(m, "flowdesk_runs_finished_total", **done) == 1
        ok = {"workflow": "greet", "step": "greet_step", "status": "ok"}
        assert value(m, "flowdesk_step_duration_seconds_count", **ok) == 1
    finally:
        _stop(proc)
        err.close()
    text = (tmp_path / "serve.err").read_text()
    logged = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    (greeting,) = [e for e in logged if e["message"] == "greeting"]
    assert (greeting["run_id"], greeting["seq"], greeting["step"]) == (h.id, 1, "greet_step")
    (access,) = [e for e in logged if e.get("request_id") == "scrape-1"]
    assert access["logger"] == "uvicorn.access" and access["path"] == "/metrics"
    assert access["actor"] == "system"


class _Collector(http.server.BaseHTTPRequestHandler):
    """A stand-in OTLP/HTTP collector: keeps each export request's body."""

    bodies: list[bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_spans_are_exported_by_otlp_to_the_configured_endpoint(app):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    bodies: list[bytes] = []
    handler = type("Handler", (_Collector,), {"bodies": bodies})
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()

    @app.step(name="one")
    async def one() -> int:
        return 1

    @app.workflow("exported")
    async def exported(ctx: flowdesk.Context) -> int:
        return int(await ctx.step(one))

    try:
        endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
        observer = observe.instrument(app, otlp_endpoint=endpoint)
        assert observer.tracing is not None
        async with app, app.worker():
            h = await app.start("exported")
            assert await h.result(timeout=15) == 1
        provider = observer.tracing.provider
        assert isinstance(provider, TracerProvider)
        await asyncio.to_thread(provider.force_flush)
        await asyncio.to_thread(provider.shutdown)
    finally:
        collector.shutdown()
        collector.server_close()
        thread.join(10)
    spans = []
    for body in bodies:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}
            assert service["service.name"] == "flowdesk"
            for scope in resource.scope_spans:
                spans += list(scope.spans)
    names = sorted(s.name for s in spans)
    assert names == ["run exported", "step one"]
    for span in spans:
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["flowdesk.run_id"].string_value == h.id
    assert len({s.trace_id for s in spans}) == 1


async def test_real_model_and_connector_calls_are_spans_of_their_step(app, tmp_path, wait_status):
    """The gateway's answer and a SQL connector's write, as the engine really makes them:
    each is a span under its step, with the run, the seq and what the call did."""
    from flowdesk.connectors import sql
    from flowdesk.models import registry, training
    from flowdesk.models.gateway import Gateway

    texts = [f"refund my order {n}" for n in range(12)]
    texts += [f"my card {n} is lost" for n in range(12)]
    labels = ["refund"] * 12 + ["card"] * 12
    examples = training.Examples(
        texts=tuple(texts), labels=tuple(labels), path="-", sha256="-", format="csv",
        text_column="text", label_column="label",
    )  # fmt: skip
    result = training.train(examples, features="tfidf")
    registry.Registry(tmp_path / "models").register("intent", result.classifier)
    config = tmp_path / "models.toml"
    config.write_text(
        f'[providers.local]\ntype = "local"\ntask = "intent"\nmodels_dir = "{tmp_path / "models"}"'
        '\n\n[models.clf]\nprovider = "local"\nmodel = "intent"\ncapabilities = ["classify"]\n\n'
        '[tasks.intent]\ncapability = "classify"\nlabels = ["refund", "card"]\nchain = ["clf"]\n'
    )
    app.gateway = Gateway.from_toml(config)
    db = tmp_path / "side.db"
    exporter = InMemorySpanExporter()
    observe.instrument(app, tracer_provider=_tracer(exporter))

    class Note(BaseModel):
        text: str

    save = sql.statement("save_note", "INSERT INTO notes (text) VALUES (:text)", Note)
    make = sql.statement("make_table", "CREATE TABLE IF NOT EXISTS notes (text TEXT)", Note)
    async with sql.SqlConnector("side", app, f"sqlite:///{db}") as side:

        @app.step(name="write")
        async def write(text: str) -> int:
            await side.call(make, {"text": ""})
            return (await side.call(save, {"text": text})).rowcount

        @app.workflow("spanned")
        async def spanned(ctx: flowdesk.Context, text: str) -> str:
            answer = await ctx.model("intent", text)
            await ctx.step(write, str(answer.label))
            return str(answer.label)

        try:
            async with app, app.worker():
                h = await app.start("spanned", {"text": "please refund my order"})
                assert (await wait_status(app, h.id, RunStatus.SUCCEEDED)).output == "refund"
        finally:
            await app.gateway.close()  # type: ignore[attr-defined]
    spans = exporter.get_finished_spans()
    steps = {s.attributes["flowdesk.step.name"]: s for s in spans if s.name.startswith("step ")}
    (model,) = [s for s in spans if s.name == "model intent"]
    assert model.parent.span_id == steps["model:intent"].context.span_id
    assert model.attributes["flowdesk.model.name"] == "local:intent"
    assert model.attributes["flowdesk.model.provider"] == "local"
    assert 0.5 < model.attributes["flowdesk.model.confidence"] <= 1.0
    calls = [s for s in spans if s.name.startswith("connector side.")]
    assert [s.name for s in calls] == ["connector side.make_table", "connector side.save_note"]
    for call in calls:
        assert call.parent.span_id == steps["write"].context.span_id
        assert call.attributes["flowdesk.run_id"] == h.id
        assert call.attributes["flowdesk.idempotency_key"] == f"{h.id}:2"
