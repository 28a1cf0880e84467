"""The engine's view of observability: the port ``flowdesk.observe`` plugs into.

The engine sits below ``flowdesk.observe`` and never imports it. `App.observer` holds an
`Observer`; while it is None nothing is measured and the engine pays one ``is None`` check
per step. ``flowdesk.observe.instrument(app)`` installs the observer flowdesk ships
(Prometheus metrics, OpenTelemetry spans, the log context of runs); ``flowdesk serve`` and
``flowdesk worker`` install it for you::

    from flowdesk import observe

    observe.instrument(app)

`App.metrics` is where an assistant declares its business metrics; its workflows record
them with `Context.metric`, which counts only code that runs for the first time (never
on replay)::

    approved = app.metrics.counter(
        "invoices_auto_approved_total", "Invoices approved without a person.", ["tier"]
    )
    ...
    ctx.metric(approved, 1, tier="gold")
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from flowdesk import errors

if TYPE_CHECKING:
    from flowdesk.engine.context import Context
    from flowdesk.store.base import Claimed, RunStatus
    from flowdesk.store.people import Escalated, TaskRecord

T = TypeVar("T")

MetricKind = Literal["counter", "gauge", "histogram"]
SegmentOutcome = Literal["succeeded", "failed", "cancelled", "suspended", "released", "lost"]
"""How an execution segment ended: the run finished (first three), parked on a wait,
was given back to the queue at shutdown, or was lost (lease lost, store unreachable)."""

_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


@dataclass(frozen=True, slots=True)
class MetricDef:
    """A business metric an assistant declared (see `MetricCatalog`)."""

    name: str
    doc: str
    kind: MetricKind
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None

    def check(self, value: float, labels: dict[str, str]) -> None:
        """Refuse a recording that does not fit the declaration. Label values must be
        short names (a status, a kind, a tier): never payload or personal data."""
        if set(labels) != set(self.labels):
            raise errors.ConfigurationError(
                f"Metric {self.name!r} takes the labels {list(self.labels)}, "
                f"not {sorted(labels)}: pass each declared label, and only those."
            )
        for key, text in labels.items():
            if not isinstance(text, str) or not _LABEL_VALUE.match(text):
                raise errors.ConfigurationError(
                    f"Metric {self.name!r}: label {key}={text!r} is not a short name "
                    "(letters, digits, _ . : / -, at most 64). Labels name kinds and "
                    "statuses; they never carry payload or personal data."
                )
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise errors.ConfigurationError(f"Metric {self.name!r}: {value!r} is not a number.")
        if self.kind == "counter" and value < 0:
            raise errors.ConfigurationError(
                f"Counter {self.name!r} only goes up: {value} is negative."
            )


class MetricCatalog:
    """The business metrics an app declares (``app.metrics``).

    Names are Prometheus names (``[a-zA-Z_][a-zA-Z0-9_]*``; counters usually end in
    ``_total``); the ``flowdesk_`` prefix is the engine's own. Declaring the same metric
    again returns it; declaring another one under a used name is an error."""

    def __init__(self) -> None:
        self.defs: dict[str, MetricDef] = {}

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> MetricDef:
        """A count that only goes up (``invoices_auto_approved_total``, ...)."""
        return self._declare(MetricDef(name, doc, "counter", tuple(labels)))

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> MetricDef:
        """A value that is set (the last recording wins, per process)."""
        return self._declare(MetricDef(name, doc, "gauge", tuple(labels)))

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] | None = None,
    ) -> MetricDef:
        """A distribution (``time_to_resolution_seconds``, ...); ``buckets`` are upper
        bounds (default: 1 s to 1 week)."""
        bounds = None if buckets is None else tuple(sorted(float(b) for b in buckets))
        return self._declare(MetricDef(name, doc, "histogram", tuple(labels), bounds))

    def get(self, name: str) -> MetricDef:
        try:
            return self.defs[name]
        except KeyError:
            raise errors.ConfigurationError(
                f"No metric {name!r} is declared: declare it with app.metrics.counter(...), "
                ".gauge(...) or .histogram(...) first."
            ) from None

    def _declare(self, defn: MetricDef) -> MetricDef:
        if not _NAME.match(defn.name) or defn.name.startswith("flowdesk_"):
            raise errors.ConfigurationError(
                f"Metric name {defn.name!r} is not allowed: use letters, digits and _, "
                "not starting with a digit, and not the engine's prefix 'flowdesk_'."
            )
        for label in defn.labels:
            if not _NAME.match(label) or label.startswith("__"):
                raise errors.ConfigurationError(
                    f"Metric {defn.name!r}: label name {label!r} is not allowed."
                )
        if len(set(defn.labels)) != len(defn.labels):
            raise errors.ConfigurationError(f"Metric {defn.name!r}: a label is named twice.")
        known = self.defs.get(defn.name)
        if known is not None and known != defn:
            raise errors.ConfigurationError(
                f"Metric {defn.name!r} is already declared differently ({known.kind}, "
                f"labels {list(known.labels)}): choose another name."
            )
        self.defs[defn.name] = defn
        return defn


@dataclass(frozen=True, slots=True)
class Segment:
    """One execution segment of a run: from its claim to its end, or to a wait."""

    context: Context
    claimed: Claimed
    worker_id: str


@dataclass(frozen=True, slots=True)
class StepCall:
    """A step about to execute for the first time (never a replayed one)."""

    context: Context
    seq: int
    name: str


class Observer:
    """What the engine tells observability as runs execute. Every hook does nothing here;
    ``flowdesk.observe`` overrides them. A hook must not raise: its failure is logged and
    the run goes on."""

    async def segment_started(self, segment: Segment) -> Any:
        """A worker is about to execute a run; the returned state goes to
        `segment_ended`. Runs in the run's own task, so context variables it sets hold
        for the whole segment."""
        return None

    def segment_ended(self, segment: Segment, state: Any, outcome: SegmentOutcome) -> None:
        """The segment ended (``outcome``); for a finished run, after its end committed."""

    async def step(self, call: StepCall, execute: Awaitable[T]) -> T:
        """Wrap the execution of a step (all its attempts, and recording its outcome):
        await ``execute`` and return what it returns, or let what it raises through."""
        return await execute

    def model_call(self, task: str) -> AbstractContextManager[Any]:
        """A span around one model call (``ctx.model``); what it yields takes
        ``set_attribute(key, value)`` (the answer's model, confidence, tokens, cost) or is
        None when nothing is traced."""
        return nullcontext()

    def connector_call(self, connector: str, operation: str) -> AbstractContextManager[Any]:
        """A span around one call a connector makes to another system (all its attempts)."""
        return nullcontext()

    def metric(self, defn: MetricDef, value: float, labels: dict[str, str]) -> None:
        """Count a business metric a workflow recorded (`Context.metric`): called once the
        call that followed the recording (or the run's end) is recorded, never on replay."""

    async def runs_ended(self, run_ids: Sequence[str], status: RunStatus) -> None:
        """Runs ended without a worker executing them (cancelled while queued or
        waiting, or past their deadline)."""

    async def task_completed(self, task: TaskRecord) -> None:
        """A person completed a human task (through the inbox)."""

    async def task_escalated(self, escalated: Escalated) -> None:
        """An escalation of a human task was applied."""
