"""OpenTelemetry spans for runs, steps, model calls and connector calls.

Spans (attributes in the ``flowdesk.`` namespace; never payloads):

* ``run <workflow>``: one per execution segment of a run, from its claim to its end or to
  the wait it parks on (``flowdesk.run_id``, ``flowdesk.workflow``, ``flowdesk.attempt``,
  ``flowdesk.worker``, ``flowdesk.recovered``, ``flowdesk.outcome``);
* ``step <name>``: a step executed (not replayed), child of its segment
  (``flowdesk.run_id``, ``flowdesk.step.seq``, ``flowdesk.step.name``,
  ``flowdesk.step.attempts``, ``flowdesk.step.status``);
* ``model <task>`` (`model_span`) and ``connector <name>.<operation>``
  (`connector_span`): opened by the model gateway and the connectors around each call,
  children of the step that makes it.

A run is one trace however long it waits. Its first segment's span is the run's root:
its W3C ``traceparent`` is kept in the store (``runs.trace_context``) before the workflow
starts, and every later segment, on whatever worker, after however long a sleep, signal
or human task, starts as a child of that root.

Tracing is on only when a tracer provider is configured: passed to
``flowdesk.observe.instrument(app, tracer_provider=...)``, or built from
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``otlp_endpoint=``) with the OTLP/HTTP exporter of
the ``flowdesk[otel]`` extra.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import flowdesk
from flowdesk import errors
from flowdesk.engine import context as context_mod
from flowdesk.engine import observe_port

if TYPE_CHECKING:
    from flowdesk.engine.app import App

__all__ = ["Tracing", "connector_span", "model_span", "provider_from_env"]

log = logging.getLogger("flowdesk.observe")
_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar(
    "flowdesk_tracer", default=None
)


def traceparent(span: Span) -> str | None:
    """The W3C traceparent header value that names ``span``."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def parent_context(value: str) -> otel_context.Context:
    """A context whose (remote) parent span is the one ``value`` names."""
    return _PROPAGATOR.extract({"traceparent": value}, context=otel_context.Context())


@dataclass(slots=True)
class SegmentSpan:
    span: Span
    token: object
    bound: contextvars.Token[Tracer | None]


class Tracing:
    """Spans of one app's runs, from ``provider`` (not the global one)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("flowdesk", flowdesk.__version__)

    async def start_segment(self, segment: observe_port.Segment, app: App) -> SegmentSpan:
        claimed = segment.claimed
        stored = claimed.trace_context
        parent = parent_context(stored) if stored else otel_context.Context()
        span = self.tracer.start_span(
            f"run {claimed.workflow}",
            context=parent,
            attributes={
                "flowdesk.run_id": claimed.id,
                "flowdesk.workflow": claimed.workflow,
                "flowdesk.attempt": claimed.attempts,
                "flowdesk.worker": segment.worker_id,
                "flowdesk.recovered": claimed.recovered,
                "flowdesk.resumed": bool(stored),
            },
        )
        if not stored:
            # This segment's span is the run's root: keep it before any wait can happen,
            # so that the run's next segment, wherever it runs, joins the same trace.
            value = traceparent(span)
            if value is not None:
                run_id = claimed.id
                try:
                    await app.submit(lambda tx: tx.set_trace_context(run_id, value), "system")
                    claimed.trace_context = value
                except Exception:  # the run goes on; its later segments start new traces
                    log.warning("could not keep the trace context of run %s", run_id)
        token = otel_context.attach(trace.set_span_in_context(span))
        return SegmentSpan(span, token, _tracer.set(self.tracer))

    def end_segment(self, state: SegmentSpan, outcome: observe_port.SegmentOutcome) -> None:
        state.span.set_attribute("flowdesk.outcome", outcome)
        if outcome == "failed":
            state.span.set_status(Status(StatusCode.ERROR, "the run failed"))
        try:
            otel_context.detach(state.token)  # type: ignore[arg-type]
            _tracer.reset(state.bound)
        finally:
            state.span.end()

    @contextmanager
    def step_span(self, call: observe_port.StepCall) -> Iterator[Span]:
        with self.tracer.start_as_current_span(
            f"step {call.name}",
            attributes={
                "flowdesk.run_id": call.context.run_id,
                "flowdesk.workflow": call.context.workflow,
                "flowdesk.step.seq": call.seq,
                "flowdesk.step.name": call.name,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span


def _tracer_here() -> Tracer:
    """The tracer of the app whose run executes here, else the global one (a no-op
    unless the program configured OpenTelemetry itself)."""
    return _tracer.get() or trace.get_tracer("flowdesk", flowdesk.__version__)


def _step_attributes() -> dict[str, Any]:
    info = context_mod.current_step()
    if info is None:
        return {}
    return {
        "flowdesk.run_id": info.run_id,
        "flowdesk.step.seq": info.seq,
        "flowdesk.step.name": info.name,
        "flowdesk.step.attempt": info.attempt,
    }


@contextmanager
def model_span(task: str, model: str | None = None) -> Iterator[Span]:
    """A span around one model call, for the gateway: ``with model_span(task, model) as
    span: ...``, then ``span.set_attribute(...)`` for tokens, cost, confidence. Inside a
    step it is that step's child and names its run and seq. An exception marks it as an
    error and goes on."""
    attributes = {"flowdesk.model.task": task}
    if model:
        attributes["flowdesk.model.name"] = model
    attributes.update(_step_attributes())
    with _tracer_here().start_as_current_span(f"model {task}", attributes=attributes) as span:
        yield span


@contextmanager
def connector_span(name: str, operation: str) -> Iterator[Span]:
    """A span around one call a connector makes to another system (``name``: the
    connector, ``operation``: what it does, e.g. ``post_invoice``), with the run, seq and
    idempotency key of the step that makes it."""
    attributes: dict[str, Any] = {
        "flowdesk.connector.name": name,
        "flowdesk.connector.operation": operation,
    }
    attributes.update(_step_attributes())
    info = context_mod.current_step()
    if info is not None:
        attributes["flowdesk.idempotency_key"] = info.idempotency_key
    with _tracer_here().start_as_current_span(
        f"connector {name}.{operation}", kind=trace.SpanKind.CLIENT, attributes=attributes
    ) as span:
        yield span


def provider_from_env(endpoint: str | None = None) -> TracerProvider | None:
    """A tracer provider exporting by OTLP/HTTP to ``endpoint`` (the collector's base URL,
    e.g. ``http://127.0.0.1:4318``), else to ``$OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; None when none is set (no tracing)."""
    base = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not base and not traces:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise errors.ConfigurationError(
            "Exporting traces by OTLP needs the exporter: pip install 'flowdesk[otel]' "
            f"({exc.name} is missing)."
        ) from exc
    url = (
        endpoint.rstrip("/") + "/v1/traces" if endpoint else None
    )  # else: env, as the SDK reads it
    service = os.environ.get("OTEL_SERVICE_NAME") or "flowdesk"
    provider = SdkTracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    return provider
