"""`Context`: what a workflow uses to do durable work.

Every call that can affect what the workflow does next takes the next sequence number
(``seq``) in call order: steps, sleeps, signal waits, child workflows and ``now()``. On
replay the recorded outcome at that seq is returned, after checking that the workflow
still calls the same thing there.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random as _random
import time
import traceback
import uuid as _uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from pydantic import BaseModel

from flowdesk import codec, errors
from flowdesk.engine import observe_port, registry, tasks
from flowdesk.store import base, people, sql_privacy
from flowdesk.store.base import Expired, Fenced, HistoryRow, NewRun, Parked, Resolved, StepRow

if TYPE_CHECKING:
    from flowdesk.engine.app import App as Runtime

R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("flowdesk.engine")

CHILD_SIGNAL = "flowdesk.child:"


@dataclass(frozen=True, slots=True)
class Signal:
    """A `Context.wait_any` branch: the signal ``name``."""

    name: str

    @property
    def label(self) -> str:
        return f"signal:{self.name}"


@dataclass(frozen=True, slots=True)
class Timer:
    """A `Context.wait_any` branch: a durable timer of ``after`` (seconds or timedelta)."""

    after: timedelta | float

    @property
    def label(self) -> str:
        return "timer"


@dataclass(frozen=True, slots=True)
class Child:
    """A `Context.wait_any` branch: a child workflow started for the wait."""

    workflow: str | Callable[..., Any]
    input: Any = None

    @property
    def label(self) -> str:
        name = self.workflow if isinstance(self.workflow, str) else self.workflow.__qualname__
        return f"child:{name}"


@dataclass(frozen=True, slots=True)
class FirstOf:
    """What `Context.wait_any` returns: the index of the branch that came first, and its
    value. Unpacks as ``index, value = await ctx.wait_any(...)``."""

    index: int
    value: Any

    def __iter__(self) -> Iterator[Any]:
        return iter((self.index, self.value))


class Cancelled(BaseException):
    """The run was cancelled while it ran; unwinds the workflow."""


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What a running step may know about itself (see `current_step`)."""

    run_id: str
    seq: int
    name: str
    attempt: int

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_id}:{self.seq}"


_current_step: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar(
    "flowdesk_current_step", default=None
)


def current_step() -> StepInfo | None:
    """Inside a step: its run id, seq, attempt and idempotency key. Elsewhere: None."""
    return _current_step.get()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _seconds(value: timedelta | float | int) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _unrecorded(exc: Exception) -> BaseException:
    """A write the store could not make is no failure of the workflow: the run is dropped
    here, and its lease runs out, so a worker replays it once the store answers again."""
    if isinstance(exc, errors.FlowdeskError) and not isinstance(exc, errors.StoreError):
        return exc  # the workflow's own mistake (an unknown child workflow, ...)
    log.warning("could not record a step (%r); the run will be recovered", exc)
    return errors.LeaseLost()


def error_info(exc: BaseException, attempts: int | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }
    if attempts is not None:
        info["attempts"] = attempts
    return info


class Context:
    """The handle a workflow gets as its first argument."""

    def __init__(
        self,
        runtime: Runtime,
        run_id: str,
        workflow: str,
        owner: str,
        attempt: int,
        history: dict[int, HistoryRow],
        versions: dict[str, int],
    ) -> None:
        self._rt = runtime
        self.run_id = run_id
        self.workflow = workflow
        self.attempt = attempt
        self._owner = owner
        self._history = history
        self._last_recorded = max(history) if history else 0
        self._versions = versions
        self._seq = 0
        self._buffer: list[StepRow] = []
        self._new_versions: dict[str, int] = {}
        self._rng = _random.Random(run_id)
        self._failures: dict[int, int] = {}  # id(exception) -> seq it was raised for
        # Set once replay diverged from the history: every later call raises it again and
        # the run fails with it, even if workflow code catches it.
        self.nondeterminism: errors.NonDeterminismError | None = None
        self._call = ""  # name of the latest call (for the log context)
        self.step_attempts = 0  # attempts of the latest step executed (for observers)
        self._counted_upto: int | None = None  # see `metric`
        self._metrics: list[tuple[observe_port.MetricDef, float, dict[str, str]]] = []

    # -- deterministic helpers -------------------------------------------------------
    def now(self) -> datetime:
        """The current time, recorded: replay returns the same instant."""
        seq = self._next("now", "now")
        rec = self._history.get(seq)
        if rec is not None and rec.status == "ok":
            value = int(codec.decode(rec.output))
        else:
            value = _now_ms()
            self._buffer.append(StepRow(seq, "now", "now", "ok", str(value), None, 1, value, value))
        return datetime.fromtimestamp(value / 1000, tz=UTC)

    def uuid(self) -> _uuid.UUID:
        """A UUID that replay reproduces (drawn from a generator seeded by the run id)."""
        return _uuid.UUID(int=self._rng.getrandbits(128), version=4)

    def random(self) -> float:
        """A float in [0, 1) that replay reproduces."""
        return self._rng.random()

    @property
    def position(self) -> tuple[int, str]:
        """The seq and name of the step running now, else of the latest call made."""
        info = _current_step.get()
        if info is not None and info.run_id == self.run_id:
            return info.seq, info.name
        return self._seq, self._call

    def metric(
        self, metric: str | observe_port.MetricDef, value: float = 1, /, **labels: str
    ) -> None:
        """Record a business metric declared on ``app.metrics``: a counter goes up by
        ``value``, a gauge is set to it, a histogram observes it.

        Each recording counts once per run, however often replay runs the line again. The
        run's history says which code already ran: everything before its latest recorded
        call (a finished step, or the wait the run parked on); a recording there is
        skipped. A recording past it is new, and counts once the workflow's next call (or
        its end) is recorded: a worker that dies or loses its lease before that counts
        nothing, and the worker that takes the run over counts it instead."""
        catalog = self._rt.metrics
        defn = metric if isinstance(metric, observe_port.MetricDef) else catalog.get(metric)
        defn.check(value, labels)
        if self._counted_upto is None:
            self._counted_upto = max(
                (s if r.status != "pending" else s - 1 for s, r in self._history.items()),
                default=-1,
            )
        if self._rt.observer is not None and self._seq > self._counted_upto:
            self._metrics.append((defn, float(value), labels))

    def metrics_recorded(self) -> None:
        """What the workflow did up to now is recorded: count its pending recordings."""
        pending, self._metrics = self._metrics, []
        observer = self._rt.observer
        if observer is not None:
            for defn, value, labels in pending:
                observer.metric(defn, value, labels)

    async def add_subject(self, subject: str) -> None:
        """Tie this run's payloads (those stored so far and all later ones) to a data
        subject such as ``"customer:42"``: erasing the subject destroys the run's data
        key. Idempotent: replay calls it again, and nothing changes."""
        sql_privacy.check_subject(subject)
        run_id, owner = self.run_id, self._owner
        try:
            await self._rt.writer.submit(lambda tx: tx.add_subject(run_id, owner, subject))
        except Fenced as exc:
            raise self._fenced(exc) from None
        except Exception as exc:
            raise _unrecorded(exc) from exc

    def idempotency_key(self) -> str:
        """``run_id:seq`` of the running step; outside a step, of the next step to be called.

        Pass it to the systems a step calls so that a step retried after a crash makes one
        effect, not two."""
        info = _current_step.get()
        if info is not None and info.run_id == self.run_id:
            return info.idempotency_key
        return f"{self.run_id}:{self._seq + 1}"

    def version(self, change_id: str, max_version: int, min_version: int = 0) -> int:
        """Which version of a code change this run follows.

        A run that reaches this call for the first time while executing new work gets
        ``max_version``; a run that was already past this point when the change was made
        (its replay still has recorded steps ahead) gets ``min_version``. The answer is
        recorded, so each run keeps its version for good."""
        if change_id in self._versions:
            return self._versions[change_id]
        value = min_version if self._seq < self._last_recorded else max_version
        self._versions[change_id] = value
        self._new_versions[change_id] = value
        return value

    # -- steps -----------------------------------------------------------------------
    async def step(
        self, fn: Callable[..., Awaitable[R]] | Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> R:
        """Run ``fn`` as a durable step, or return its recorded result on replay."""
        sdef = self._rt.registry.step_def(fn)
        seq = self._next(sdef.name, "step")
        rec = self._history.get(seq)
        if rec is not None:
            if rec.status == "ok":
                result: R = sdef.decode(rec.output)
                return result
            err = codec.decode(rec.error) or {}
            failure = errors.StepFailed(
                sdef.name, seq, err.get("type", "Error"), err.get("message", "")
            )
            self._failures[id(failure)] = seq
            raise failure
        observer = self._rt.observer
        if observer is None:
            value: R = await self._execute_step(sdef, seq, args, kwargs)
            return value
        call = observe_port.StepCall(self, seq, sdef.name)
        observed: R = await observer.step(call, self._execute_step(sdef, seq, args, kwargs))
        return observed

    async def _execute_step(
        self, sdef: registry.StepDef[Any, Any], seq: int, args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        started = _now_ms()
        policy = sdef.policy
        attempt = 0
        while True:
            attempt += 1
            self.step_attempts = attempt
            token = _current_step.set(StepInfo(self.run_id, seq, sdef.name, attempt))
            try:
                value = await self._invoke(sdef, args, kwargs)
                encoded = codec.encode(value, f"result of step {sdef.name!r}")
            except Exception as exc:
                if policy.retryable(exc) and attempt <= policy.retries:
                    await asyncio.sleep(policy.wait_before(attempt))
                    continue
                info = error_info(exc, attempt)
                await self._write(
                    StepRow(
                        seq,
                        sdef.name,
                        "step",
                        "error",
                        None,
                        codec.encode(info),
                        attempt,
                        started,
                        _now_ms(),
                    )
                )
                failure = errors.StepFailed(sdef.name, seq, info["type"], info["message"])
                self._failures[id(failure)] = seq
                raise failure from exc
            finally:
                _current_step.reset(token)
            await self._write(
                StepRow(seq, sdef.name, "step", "ok", encoded, None, attempt, started, _now_ms())
            )
            if value is None:
                return None
            # Return what replay will return, so both runs see equal values.
            return sdef.decode(encoded)

    async def _invoke(
        self, sdef: registry.StepDef[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if sdef.is_async:
            if sdef.timeout is None:
                return await sdef.fn(*args, **kwargs)
            coro = sdef.fn(*args, **kwargs)
        else:
            ctx = contextvars.copy_context()
            coro = asyncio.get_running_loop().run_in_executor(
                self._rt.executor, lambda: ctx.run(sdef.fn, *args, **kwargs)
            )
            if sdef.timeout is None:
                return await coro
        try:
            return await asyncio.wait_for(coro, sdef.timeout)
        except TimeoutError:
            raise errors.StepTimeout(
                f"Step {sdef.name!r} did not finish within {sdef.timeout} s."
            ) from None

    # -- models ----------------------------------------------------------------------
    async def model(
        self,
        task: str,
        input: Any,
        *,
        schema: type[BaseModel] | None = None,
        on_chunk: Callable[[Any], Awaitable[None]] | None = None,
        **hints: Any,
    ) -> Any:
        """Ask the app's model gateway (`App.gateway`) to answer ``input`` for ``task``.

        Recorded as a step named ``model:<task>``: replay returns the recorded answer and
        never calls a model again. ``hints`` are routing facts and options the gateway
        reads (``risk``, ``data``, ``region``, ``key``, ``max_cost_usd``, ``max_tokens``,
        ``temperature``). Returns the gateway's answer type (``flowdesk.models.base.Answer``
        with ``flowdesk.models.gateway.Gateway``): label or text, confidence, model and version,
        latency, tokens, cost, and whether it came from cache, a fallback, a canary or
        with a shadow answer; ``escalate`` says a person should decide.

        With ``schema=Model`` (a Pydantic model) the answer must be a ``Model``: every
        provider is asked for JSON of its schema, the reply is validated (and retried once
        with the error), and ``ctx.model`` returns the validated ``Model`` instance (the
        step records the whole answer, with the instance as JSON under ``data``).
        ``on_chunk`` receives the text as the model writes it (``flowdesk.models.base.Chunk``;
        a ``restart`` chunk voids what came before); the step records the final answer, so
        a replay returns it whole and calls neither the model nor ``on_chunk``.

        The gateway already retried and fell back down the task's chain, so a failure is
        not retried here: it is recorded as the step's final error and raised as
        `StepFailed` (``error_type`` names the gateway's error, e.g. ``ProviderUnavailable``),
        the same on replay."""
        gateway = self._rt.gateway
        if gateway is None:
            raise errors.ConfigurationError(
                f"Workflow {self.workflow!r} calls ctx.model({task!r}) but the app has no model "
                "gateway: set `app.gateway = Gateway.from_toml('models.toml')` (or "
                "`Gateway(config)`, from flowdesk.models.gateway) before starting workers; "
                "`flowdesk worker` uses the packaged local model for the task 'generate' when "
                "the llm extra is installed (`Gateway.default()`)."
            )
        name = f"model:{task}"
        seq = self._next(name, "step")
        rec = self._history.get(seq)
        if rec is not None:
            if rec.status == "ok":
                return self._model_answer(gateway, codec.decode(rec.output), schema)
            err = codec.decode(rec.error) or {}
            failure = errors.StepFailed(name, seq, err.get("type", "Error"), err.get("message", ""))
            self._failures[id(failure)] = seq
            raise failure
        extra: dict[str, Any] = {}
        if schema is not None:
            extra["schema"] = schema
        if on_chunk is not None:
            extra["on_chunk"] = on_chunk
        observer = self._rt.observer
        if observer is None:
            encoded = await self._ask_model(gateway, task, input, hints, name, seq, extra)
        else:
            call = observe_port.StepCall(self, seq, name)
            encoded = await observer.step(
                call, self._ask_model(gateway, task, input, hints, name, seq, extra)
            )
        # Return what replay will return: the recorded JSON, loaded the same way.
        return self._model_answer(gateway, codec.decode(encoded), schema)

    @staticmethod
    def _model_answer(gateway: Any, recorded: Any, schema: type[BaseModel] | None) -> Any:
        if schema is None:
            return gateway.load_answer(recorded)
        data = recorded.get("data") if isinstance(recorded, dict) else None
        return schema.model_validate(data)

    async def _ask_model(
        self,
        gateway: Any,
        task: str,
        input: Any,
        hints: dict[str, Any],
        name: str,
        seq: int,
        extra: dict[str, Any],
    ) -> str:
        """Call the gateway and record its answer (or its final error) at ``seq``."""
        started = _now_ms()
        observer = self._rt.observer
        span = nullcontext() if observer is None else observer.model_call(task)
        try:
            with span as traced:
                answer = await gateway.answer(
                    task,
                    input,
                    dict(hints),
                    run_id=self.run_id,
                    seq=seq,
                    workflow=self.workflow,
                    **extra,
                )
                if traced is not None:
                    _describe_answer(traced, answer)
            encoded: str = codec.encode(answer, f"answer of model task {task!r}")
        except Exception as exc:
            info = error_info(exc, 1)
            row = StepRow(
                seq, name, "step", "error", None, codec.encode(info), 1, started, _now_ms()
            )
            await self._write(row)
            failure = errors.StepFailed(name, seq, info["type"], info["message"])
            self._failures[id(failure)] = seq
            raise failure from exc
        await self._write(StepRow(seq, name, "step", "ok", encoded, None, 1, started, _now_ms()))
        return encoded

    # -- waits -----------------------------------------------------------------------
    async def sleep(self, duration: timedelta | float) -> None:
        """Sleep durably: the run is parked, and any worker resumes it when the time comes."""
        seq = self._next("sleep", "sleep")
        rec = self._history.get(seq)
        if rec is not None and rec.status == "ok":
            return
        now = _now_ms()
        if rec is not None:
            wake_at = int(codec.decode(rec.output)["wake_at"])
            started = rec.started_at
        else:
            wake_at = now + int(_seconds(duration) * 1000)
            started = now
        done = StepRow(
            seq,
            "sleep",
            "sleep",
            "ok",
            codec.encode({"wake_at": wake_at}),
            None,
            1,
            started,
            max(now, wake_at),
        )
        if wake_at <= now:
            self._buffer.append(done)
            return
        wait = StepRow(
            seq,
            "sleep",
            "sleep",
            "pending",
            codec.encode({"wake_at": wake_at}),
            None,
            1,
            started,
            None,
        )
        await self._await(wait, [], wake_at)
        self._buffer.append(done)  # Expired: the time came while we were recording

    async def wait_signal(self, name: str, timeout: timedelta | float | None = None) -> Any:
        """Wait for the signal ``name`` and return its payload.

        A signal sent before the workflow gets here waits for it, so none is lost; signals
        of the same name are taken oldest first. With ``timeout``, raises `WaitTimeout`
        when no signal came in time."""
        step_name = f"signal:{name}"
        seq = self._next(step_name, "signal")
        rec = self._history.get(seq)
        if rec is not None:
            if rec.status == "ok":
                return codec.decode(rec.output)
            if rec.status == "error":
                self._raise_timeout(seq, name)
            deadline = codec.decode(rec.output).get("deadline")
            started = rec.started_at
        else:
            deadline = None if timeout is None else _now_ms() + int(_seconds(timeout) * 1000)
            started = _now_ms()
        wait = StepRow(
            seq,
            step_name,
            "signal",
            "pending",
            codec.encode({"deadline": deadline}),
            None,
            1,
            started,
            None,
        )
        outcome = await self._await(wait, [name], deadline)
        if isinstance(outcome, Resolved):
            return outcome.payload
        info = {"type": "WaitTimeout", "message": f"no signal {name!r} before the deadline"}
        self._buffer.append(
            StepRow(
                seq, step_name, "signal", "error", None, codec.encode(info), 1, started, _now_ms()
            )
        )
        self._raise_timeout(seq, name)

    def _raise_timeout(self, seq: int, name: str) -> NoReturn:
        exc = errors.WaitTimeout(f"Run {self.run_id}: no signal {name!r} came before the timeout.")
        self._failures[id(exc)] = seq
        raise exc

    async def child(self, workflow: str | Callable[..., Any], input: Any = None) -> Any:
        """Start a child workflow and wait for its result (it runs on any worker).

        Raises `StepFailed` when the child fails or is cancelled."""
        name = workflow if isinstance(workflow, str) else self._rt.workflow_name(workflow)
        wdef = self._rt.registry.workflow(name)
        step_name = f"child:{name}"
        seq = self._next(step_name, "child")
        rec = self._history.get(seq)
        child_id = f"{self.run_id}-{seq}"
        children: list[NewRun] = []
        if rec is not None and rec.status == "ok":
            return self._child_outcome(seq, step_name, wdef, codec.decode(rec.output))
        if rec is None:
            children.append(
                NewRun(
                    id=child_id,
                    workflow=name,
                    input=wdef.validate(input),
                    queue=wdef.queue,
                    parent_id=self.run_id,
                    parent_seq=seq,
                )
            )
        started = rec.started_at if rec is not None else _now_ms()
        wait = StepRow(
            seq,
            step_name,
            "child",
            "pending",
            codec.encode({"run_id": child_id}),
            None,
            1,
            started,
            None,
        )
        outcome = await self._await(wait, [CHILD_SIGNAL + child_id], None, children)
        assert isinstance(outcome, Resolved)
        return self._child_outcome(seq, step_name, wdef, outcome.payload)

    async def human_task(
        self,
        kind: str,
        *,
        title: str,
        form: type[M],
        context: Any = None,
        candidates: tasks.Assignees | None = None,
        due: timedelta | None = None,
        follow_up: timedelta | None = None,
        priority: int = 0,
        labels: Sequence[str] = (),
        escalation: tasks.Escalation | Sequence[tasks.Escalation] | None = None,
        four_eyes: bool = False,
    ) -> M:
        """Hand work to a person and wait for it: returns the completed ``form``.

        The task is created durably (with the run's next step) and the run suspends, holding
        no worker, until someone completes it through the API, CLI or inbox; the submitted
        data was already validated against the form's JSON Schema. ``context`` is what the
        person reads (summary, model suggestion and confidence, document...). With
        ``four_eyes``, the user who started the run cannot complete the task."""
        step_name = f"task:{kind}"
        seq = self._next(step_name, "task")
        task_id = f"{self.run_id}-t{seq}"
        rec = self._history.get(seq)
        if rec is not None and rec.status == "ok":
            return form.model_validate(codec.decode(rec.output)["data"])
        new_tasks: list[people.NewTask] = []
        if rec is None:
            who = candidates or tasks.Assignees()
            stages = (
                []
                if escalation is None
                else [escalation]
                if isinstance(escalation, tasks.Escalation)
                else list(escalation)
            )
            now = _now_ms()
            new_tasks.append(
                people.NewTask(
                    id=task_id,
                    run_id=self.run_id,
                    seq=seq,
                    kind=kind,
                    title=title,
                    form_schema=codec.encode(form.model_json_schema()),
                    form_ref=f"{form.__module__}:{form.__qualname__}",
                    context=None if context is None else codec.encode(context, "task context"),
                    users=list(who.users),
                    groups=list(who.groups),
                    roles=list(who.roles),
                    assign=who.strategy,
                    priority=priority,
                    labels=list(labels),
                    four_eyes=four_eyes,
                    due_at=None if due is None else now + int(due.total_seconds() * 1000),
                    follow_up_at=(
                        None if follow_up is None else now + int(follow_up.total_seconds() * 1000)
                    ),
                    escalation=[stage.policy(form) for stage in stages],
                )
            )
        started = rec.started_at if rec is not None else _now_ms()
        wait = StepRow(
            seq,
            step_name,
            "task",
            "pending",
            codec.encode({"task_id": task_id}),
            None,
            1,
            started,
            None,
        )
        outcome = await self._await(wait, [people.TASK_SIGNAL + task_id], None, tasks=new_tasks)
        assert isinstance(outcome, Resolved)
        return form.model_validate(outcome.payload["data"])

    def _child_outcome(
        self, seq: int, step_name: str, wdef: registry.WorkflowDef, payload: dict[str, Any]
    ) -> Any:
        if payload.get("status") == "succeeded":
            return wdef.decode_result(payload.get("output"))
        err = payload.get("error") or {}
        failure = errors.StepFailed(
            step_name,
            seq,
            err.get("type", payload.get("status", "Error")),
            f"child run {payload.get('run_id')} {payload.get('status')}: {err.get('message', '')}",
        )
        self._failures[id(failure)] = seq
        raise failure

    async def wait_any(
        self, branches: Sequence[Signal | Timer | Child], *, cancel_others: bool = True
    ) -> FirstOf:
        """Wait for the first of several signals, timers and child workflows.

        Returns ``FirstOf(index, value)``: which branch came first and its value (the signal
        payload, None for a timer, the child's result). Children that lost are cancelled,
        unless ``cancel_others=False`` leaves them running. Signals that lost stay pending
        for a later wait. A failed child that comes first raises `StepFailed`."""
        if not branches:
            raise errors.ConfigurationError("wait_any needs at least one branch")
        step_name = "any:" + "|".join(b.label for b in branches)
        seq = self._next(step_name, "any")
        rec = self._history.get(seq)
        names: list[str] = []
        children: list[NewRun] = []
        child_names: dict[str, str] = {}
        for i, branch in enumerate(branches):
            if isinstance(branch, Signal):
                names.append(branch.name)
            elif isinstance(branch, Child):
                child_id = f"{self.run_id}-{seq}-{i}"
                name = CHILD_SIGNAL + child_id
                names.append(name)
                child_names[name] = child_id
                if rec is None:
                    wname = self._rt.workflow_name(branch.workflow)
                    wdef = self._rt.registry.workflow(wname)
                    children.append(
                        NewRun(
                            id=child_id,
                            workflow=wname,
                            input=wdef.validate(branch.input),
                            queue=wdef.queue,
                            parent_id=self.run_id,
                            parent_seq=seq,
                        )
                    )
        timers = [(i, b) for i, b in enumerate(branches) if isinstance(b, Timer)]
        if rec is not None and rec.status == "ok":
            return self._first_of(seq, step_name, branches, names, codec.decode(rec.output))
        now = _now_ms()
        if rec is not None:
            pending = codec.decode(rec.output)
            deadline, timer_index, started = pending["deadline"], pending["timer"], rec.started_at
        else:
            deadline, timer_index, started = None, None, now
            for i, timer in timers:
                at = now + int(_seconds(timer.after) * 1000)
                if deadline is None or at < deadline:
                    deadline, timer_index = at, i
        wait = StepRow(
            seq,
            step_name,
            "any",
            "pending",
            codec.encode({"deadline": deadline, "timer": timer_index}),
            None,
            1,
            started,
            None,
        )
        losers = child_names if cancel_others else None
        outcome = await self._await(wait, names, deadline, children, losers)
        if isinstance(outcome, Resolved):
            return self._first_of(
                seq, step_name, branches, names, {"name": outcome.name, "payload": outcome.payload}
            )
        # The timer came first: record it, and cancel the children in the same commit.
        done = StepRow(
            seq,
            step_name,
            "any",
            "ok",
            codec.encode({"timer": timer_index}),
            None,
            1,
            started,
            _now_ms(),
        )
        await self._write(done, cancel=list(child_names.values()) if cancel_others else [])
        return FirstOf(int(timer_index), None)

    def _first_of(
        self,
        seq: int,
        step_name: str,
        branches: Sequence[Signal | Timer | Child],
        names: list[str],
        recorded: dict[str, Any],
    ) -> FirstOf:
        if "timer" in recorded:
            return FirstOf(int(recorded["timer"]), None)
        name = recorded["name"]
        index = [i for i, b in enumerate(branches) if not isinstance(b, Timer)][names.index(name)]
        branch = branches[index]
        if isinstance(branch, Child):
            wdef = self._rt.registry.workflow(self._rt.workflow_name(branch.workflow))
            return FirstOf(index, self._child_outcome(seq, step_name, wdef, recorded["payload"]))
        return FirstOf(index, recorded["payload"])

    # -- recording -------------------------------------------------------------------
    def _next(self, name: str, kind: str) -> int:
        if self.nondeterminism is not None:
            raise self.nondeterminism
        self._seq += 1
        self._call = name
        seq = self._seq
        rec = self._history.get(seq)
        if rec is not None and (rec.name != name or rec.kind != kind):
            self.nondeterminism = errors.NonDeterminismError(self.run_id, seq, rec.name, name)
            raise self.nondeterminism
        return seq

    def check_history_consumed(self) -> None:
        """At the end of a workflow: every recorded call was made again. A workflow that now
        returns before calls its history records has changed under the run."""
        if self._last_recorded > self._seq:
            rec = self._history.get(self._seq + 1)
            self.nondeterminism = errors.NonDeterminismError(
                self.run_id,
                self._seq + 1,
                rec.name if rec else "(a recorded call)",
                "(the workflow returned)",
            )
            raise self.nondeterminism

    def _take_buffer(self) -> tuple[list[StepRow], dict[str, int]]:
        rows, versions = self._buffer, self._new_versions
        self._buffer, self._new_versions = [], {}
        return rows, versions

    def _fenced(self, exc: Fenced) -> BaseException:
        return Cancelled() if exc.reason == "cancel" else errors.LeaseLost()

    async def _write(self, row: StepRow, cancel: Sequence[str] = ()) -> None:
        rows, versions = self._take_buffer()
        rows.append(row)
        run_id, owner = self.run_id, self._owner
        if cancel:

            async def op(tx: base.Tx) -> None:
                await tx.record(run_id, owner, rows, versions)
                for child_id in cancel:
                    try:
                        await tx.cancel(child_id, "another branch of wait_any won")
                    except errors.InvalidState:
                        pass  # it had already finished

        else:

            async def op(tx: base.Tx) -> None:
                await tx.record(run_id, owner, rows, versions)

        try:
            await self._rt.writer.submit(op)
        except Fenced as exc:
            raise self._fenced(exc) from None
        except Exception as exc:
            raise _unrecorded(exc) from exc
        if self._metrics:
            self.metrics_recorded()

    async def _await(
        self,
        wait: StepRow,
        signals: list[str],
        deadline: int | None,
        children: list[NewRun] | None = None,
        losers: dict[str, str] | None = None,
        tasks: Sequence[people.NewTask] = (),
    ) -> base.AwaitOutcome:
        rows, versions = self._take_buffer()
        run_id, owner = self.run_id, self._owner
        kids = children or []
        try:
            outcome: base.AwaitOutcome = await self._rt.writer.submit(
                lambda tx: tx.await_(
                    run_id, owner, rows, versions, wait, signals, deadline, kids, losers, tasks
                )
            )
        except Fenced as exc:
            raise self._fenced(exc) from None
        except Exception as exc:
            raise _unrecorded(exc) from exc
        if self._metrics:
            self.metrics_recorded()
        if kids:
            self._rt.wake()
        if isinstance(outcome, Parked):
            raise errors.Suspended()
        assert isinstance(outcome, (Resolved, Expired))
        return outcome

    def failed_seq(self, exc: BaseException) -> int | None:
        """The seq of the step whose failure ended the workflow with ``exc``, if any."""
        seen: set[int] = set()
        cur: BaseException | None = exc
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            if id(cur) in self._failures:
                return self._failures[id(cur)]
            cur = cur.__cause__ or cur.__context__
        return None

    def pending(self) -> tuple[list[StepRow], dict[str, int]]:
        return self._take_buffer()


def _describe_answer(span: Any, answer: Any) -> None:
    """The answer's model, version, confidence, tokens and cost, on the model call's span."""
    for key, attr in (
        ("model", "flowdesk.model.name"),
        ("version", "flowdesk.model.version"),
        ("provider", "flowdesk.model.provider"),
        ("confidence", "flowdesk.model.confidence"),
        ("tokens_in", "flowdesk.model.tokens_in"),
        ("tokens_out", "flowdesk.model.tokens_out"),
        ("cost_usd", "flowdesk.model.cost_usd"),
        ("fallback", "flowdesk.model.fallback"),
        ("cached", "flowdesk.model.cached"),
    ):
        value = answer.get(key) if isinstance(answer, dict) else getattr(answer, key, None)
        if isinstance(value, str | int | float | bool):
            span.set_attribute(attr, value)
