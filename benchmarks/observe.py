"""The engine benchmark (``engine.py``) with observability installed on the app.

    python benchmarks/observe.py [--tracing] [engine.py options, e.g. --no-peers]

Runs exactly the workload of ``engine.py`` and prints the same figures, with
``flowdesk.observe.instrument(app)`` (metrics and log context; with ``--tracing`` also
spans, recorded by an SDK tracer provider whose exporter drops them), so the cost of
instrumentation on the step hot path is the difference from a plain ``engine.py`` run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

import flowdesk
from flowdesk import observe


class Drop(SpanExporter):
    """Takes every span and keeps none: the cost measured is flowdesk's, not a backend's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def main() -> None:
    tracing = "--tracing" in sys.argv
    if tracing:
        sys.argv.remove("--tracing")
    plain = engine.build_app

    def build_app(url: str) -> flowdesk.App:
        app = plain(url)
        provider = None
        if tracing:
            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(Drop()))
        observe.instrument(app, tracer_provider=provider)
        return app

    engine.build_app = build_app
    print(f"observability on: metrics, log context{', spans' if tracing else ''}")
    engine.main()


if __name__ == "__main__":
    main()
