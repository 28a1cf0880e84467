"""`Observability`: the observer ``flowdesk.observe.instrument`` installs on an app. It
turns the engine's hooks into metrics, spans and the log context of runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry.trace import Status, StatusCode

from flowdesk import errors
from flowdesk.engine import observe_port
from flowdesk.observe import logs
from flowdesk.observe import metrics as metrics_mod
from flowdesk.observe import tracing as tracing_mod
from flowdesk.store.base import RunStatus

if TYPE_CHECKING:
    import contextvars

    from flowdesk.engine.app import App
    from flowdesk.store.people import Escalated, TaskRecord

T = TypeVar("T")
log = logging.getLogger("flowdesk.observe")

_FINISHED = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(slots=True)
class _SegmentState:
    log_token: contextvars.Token[logs.RunScope | None]
    metrics_token: contextvars.Token[metrics_mod.Metrics | None] | None
    span: tracing_mod.SegmentSpan | None


class Observability(observe_port.Observer):
    """Metrics (unless ``metrics`` is None), spans (when ``tracing`` is set) and the log
    context of every run ``app`` executes."""

    def __init__(
        self,
        app: App,
        metrics: metrics_mod.Metrics | None,
        tracing: tracing_mod.Tracing | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing

    # -- runs ----------------------------------------------------------------------------
    async def segment_started(self, segment: observe_port.Segment) -> _SegmentState:
        claimed = segment.claimed
        m = self.metrics
        if m is not None:
            if claimed.attempts == 1:
                m.runs_started.inc((claimed.workflow,))
            if claimed.recovered:
                m.lease_recoveries.inc((claimed.workflow,))
        state = _SegmentState(
            logs.bind_run(segment.context, segment.worker_id),
            None if m is None else metrics_mod.bind(m),
            None,
        )
        if self.tracing is not None:
            try:
                state.span = await self.tracing.start_segment(segment, self.app)
            except Exception:
                log.exception("could not start the span of run %s", claimed.id)
        return state

    def segment_ended(
        self, segment: observe_port.Segment, state: Any, outcome: observe_port.SegmentOutcome
    ) -> None:
        if self.metrics is not None and outcome in _FINISHED:
            self.metrics.runs_finished.inc((segment.claimed.workflow, outcome))
            segment.context.metrics_recorded()  # the end is recorded: count what led to it
        if not isinstance(state, _SegmentState):
            return
        if state.span is not None and self.tracing is not None:
            self.tracing.end_segment(state.span, outcome)
        if state.metrics_token is not None:
            metrics_mod.unbind(state.metrics_token)
        logs.unbind_run(state.log_token)

    async def runs_ended(self, run_ids: Sequence[str], status: RunStatus) -> None:
        if self.metrics is None:
            return
        for run_id in run_ids:
            try:
                run = await self.app.store.get_run(run_id)
            except Exception:  # never fail the cancel that already committed
                log.warning("metrics: could not read run %s to count its end", run_id)
                continue
            if run is not None:
                self.metrics.runs_finished.inc((run.workflow, status.value))

    # -- steps ---------------------------------------------------------------------------
    async def step(self, call: observe_port.StepCall, execute: Awaitable[T]) -> T:
        if self.tracing is None:
            return await self._timed(call, execute, None)
        with self.tracing.step_span(call) as span:
            return await self._timed(call, execute, span)

    async def _timed(self, call: observe_port.StepCall, execute: Awaitable[T], span: Any) -> T:
        started = time.perf_counter()
        status = "ok"
        try:
            return await execute
        except errors.StepFailed:
            status = "error"
            raise
        except BaseException:
            status = ""  # lost or cancelled before its outcome was recorded: not counted
            raise
        finally:
            elapsed = time.perf_counter() - started
            ctx = call.context
            m = self.metrics
            if m is not None and status:
                m.step_duration.observe((ctx.workflow, call.name, status), elapsed)
                if ctx.step_attempts > 1:
                    m.step_retries.inc((ctx.workflow, call.name), ctx.step_attempts - 1)
            if span is not None:
                span.set_attribute("flowdesk.step.attempts", ctx.step_attempts)
                span.set_attribute("flowdesk.step.status", status or "lost")
                if status == "error":
                    span.set_status(Status(StatusCode.ERROR))

    def model_call(self, task: str) -> AbstractContextManager[Any]:
        if self.tracing is None:
            return nullcontext()
        return tracing_mod.model_span(task)

    def connector_call(self, connector: str, operation: str) -> AbstractContextManager[Any]:
        if self.tracing is None:
            return nullcontext()
        return tracing_mod.connector_span(connector, operation)

    def metric(self, defn: observe_port.MetricDef, value: float, labels: dict[str, str]) -> None:
        if self.metrics is not None:
            self.metrics.business(defn, value, labels)

    # -- people --------------------------------------------------------------------------
    async def task_completed(self, task: TaskRecord) -> None:
        if self.metrics is not None and task.completed_at is not None:
            took = (task.completed_at - task.created_at).total_seconds()
            self.metrics.task_completion.observe((task.kind, "person"), max(0.0, took))

    async def task_escalated(self, escalated: Escalated) -> None:
        if self.metrics is None:
            return
        try:
            task = await self.app.store.get_task(escalated.task_id)
        except Exception:
            log.warning("metrics: could not read task %s (escalation)", escalated.task_id)
            return
        if task is None:
            return
        self.metrics.escalations.inc((task.kind, escalated.action))
        if escalated.action == "auto_decide" and task.completed_at is not None:
            took = (task.completed_at - task.created_at).total_seconds()
            self.metrics.task_completion.observe((task.kind, "escalation"), max(0.0, took))
