"""Observability: Prometheus metrics, OpenTelemetry spans, structured logs.

``instrument(app)`` installs it on an app (``flowdesk serve`` and ``flowdesk worker`` do it
for you): the app's metrics go to a registry of its own (``/metrics`` on the API;
``flowdesk worker --metrics-port``), its runs carry their context on every log line, and
with a tracer provider (or ``OTEL_EXPORTER_OTLP_ENDPOINT``) every run is one trace.

The model gateway reports each call with `metrics.record_model_call`. Through the engine's
observer port, ``ctx.model`` wraps each model call in `tracing.model_span` (with the answer's
model, confidence, tokens and cost) and connectors wrap each call in
`tracing.connector_span`.
"""

from __future__ import annotations

from opentelemetry.trace import TracerProvider

from flowdesk.engine.app import App
from flowdesk.observe import logs, metrics, tracing
from flowdesk.observe.observer import Observability

__all__ = ["Observability", "instrument", "logs", "metrics", "metrics_of", "tracing"]


def instrument(
    app: App,
    *,
    metrics_enabled: bool = True,
    tracer_provider: TracerProvider | None = None,
    otlp_endpoint: str | None = None,
) -> Observability:
    """Install observability on ``app`` (again: returns what is installed, adding tracing
    if it was off and a provider is given now).

    Tracing is on with ``tracer_provider`` (e.g. an SDK provider with your exporter), or
    with an OTLP/HTTP endpoint (``otlp_endpoint``, else ``$OTEL_EXPORTER_OTLP_ENDPOINT``;
    needs ``flowdesk[otel]``); otherwise off, and costs nothing."""
    current = app.observer
    if isinstance(current, Observability):
        if current.tracing is None:
            provider = tracer_provider or tracing.provider_from_env(otlp_endpoint)
            if provider is not None:
                current.tracing = tracing.Tracing(provider)
        if current.metrics is None and metrics_enabled:
            current.metrics = metrics.Metrics(app)
        return current
    provider = tracer_provider or tracing.provider_from_env(otlp_endpoint)
    observer = Observability(
        app,
        metrics.Metrics(app) if metrics_enabled else None,
        None if provider is None else tracing.Tracing(provider),
    )
    app.observer = observer
    return observer


def metrics_of(app: App) -> metrics.Metrics:
    """The app's metrics, installing observability first when needed."""
    observer = instrument(app)
    if observer.metrics is None:
        observer.metrics = metrics.Metrics(app)
    return observer.metrics
