"""Every error flowdesk raises on purpose.

The tree::

    FlowdeskError
    ├── ConfigurationError          the app or its store is set up wrong
    ├── StoreError                  the database refused or is not flowdesk's
    │   └── SchemaTooNew            the database was written by a newer flowdesk
    ├── NotFound
    │   ├── UnknownWorkflow         no workflow is registered under that name
    │   ├── RunNotFound             no run has that id
    │   └── TaskNotFound            no human task has that id
    ├── InvalidInput                input failed the workflow's input model
    ├── InvalidForm                 task form data failed the form's JSON Schema
    ├── InvalidCursor               a pagination cursor no page returned
    ├── Conflict                    the thing to create already exists
    ├── Unauthenticated             no credential, or an expired, revoked or forged one
    ├── PermissionDenied            the user may not do this
    │   └── FourEyesViolation       the requester tried to approve their own work
    ├── ModelError                  a model call failed (the gateway may fall back)
    │   ├── ProviderUnavailable     timeout, connection error, 5xx, 429, open circuit
    │   ├── BadModelAnswer          the provider's answer did not parse
    │   └── BudgetExceeded          a cost budget or rate limit refuses the call
    ├── SerializationError          a value cannot be stored as JSON
    ├── IdempotencyConflict         an idempotency key was reused for other work
    ├── InvalidState                the run's status does not allow the operation
    ├── StepFailed                  a step failed for good (raised inside workflows)
    ├── StepTimeout                 a step attempt ran too long (also a TimeoutError)
    ├── WaitTimeout                 a wait reached its timeout (also a TimeoutError)
    ├── NonDeterminismError         replay met a different step than the one recorded
    ├── RunFailed                   `App.result` of a failed run
    ├── RunCancelled                `App.result` of a cancelled run
    └── ResultTimeout               `App.result` gave up waiting (also a TimeoutError)

    Permanent                       raise it from a step: the step is not retried

Signals the engine uses to unwind a workflow (`Suspended`, `LeaseLost`) derive from
`BaseException`, so workflow code's ``except Exception`` never swallows them.
"""

from __future__ import annotations

from typing import Any


class FlowdeskError(Exception):
    """A flowdesk error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigurationError(FlowdeskError):
    """flowdesk is configured wrong; the message says what to change."""


class StoreError(FlowdeskError):
    """The store could not do what was asked."""


class SchemaTooNew(StoreError):
    """The database schema is newer than this flowdesk knows: upgrade flowdesk."""


class NotFound(FlowdeskError):
    """Nothing has that name or id."""


class UnknownWorkflow(NotFound):
    """No workflow is registered under that name."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        self.known = sorted(known or [])
        hint = f" Known workflows: {', '.join(self.known)}." if self.known else ""
        super().__init__(
            f"Unknown workflow {name!r}.{hint} Register it with @app.workflow({name!r})."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.known))


class RunNotFound(NotFound):
    """No run has that id."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"No run with id {run_id!r}. List runs with `flowdesk runs list`.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.run_id,))


class TaskNotFound(NotFound):
    """No human task has that id."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"No task with id {task_id!r}. List tasks with `flowdesk tasks list`.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_id,))


class InvalidForm(FlowdeskError):
    """The submitted form data does not match the task's form; nothing was changed."""

    def __init__(self, task_id: str, errors: list[dict[str, Any]]) -> None:
        self.task_id = task_id
        self.errors = errors
        details = "; ".join(f"{e.get('field') or '(form)'}: {e.get('message')}" for e in errors)
        super().__init__(f"Invalid form data for task {task_id}: {details}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_id, self.errors))


class InvalidCursor(FlowdeskError):
    """The pagination cursor was not one a page returned."""


class Conflict(FlowdeskError):
    """It already exists."""


class Unauthenticated(FlowdeskError):
    """No valid credential: send `Authorization: Bearer <token>` with a token from
    `flowdesk tokens create`."""


class PermissionDenied(FlowdeskError):
    """The user's roles do not allow this."""


class FourEyesViolation(PermissionDenied):
    """The person who requested the work cannot also approve it."""


class ModelError(FlowdeskError):
    """A model call failed."""


class ProviderUnavailable(ModelError):
    """The provider did not answer in time, refused (429/5xx), or its circuit is open."""

    def __init__(self, message: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.retry_after))


class BadModelAnswer(ModelError):
    """The provider answered something that does not parse as the expected answer."""


class BudgetExceeded(ModelError):
    """A cost budget or a rate limit refuses this call."""


class InvalidInput(FlowdeskError):
    """The input does not match the workflow's input model."""

    def __init__(self, workflow: str, errors: list[dict[str, Any]]) -> None:
        self.workflow = workflow
        self.errors = errors
        details = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())) or '(input)'}: {e.get('msg')}"
            for e in errors
        )
        super().__init__(f"Invalid input for workflow {workflow!r}: {details}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.workflow, self.errors))


class SerializationError(FlowdeskError):
    """A value cannot be stored as JSON."""


class IdempotencyConflict(FlowdeskError):
    """The idempotency key was already used for a different workflow or input."""


class InvalidState(FlowdeskError):
    """The run's status does not allow this operation."""


class StepFailed(FlowdeskError):
    """A step failed after its last attempt.

    The same exception type is raised on first execution and on replay, so workflow code
    that catches it behaves the same both times. ``error_type`` names the original
    exception class.
    """

    def __init__(self, step: str, seq: int, error_type: str, error_message: str) -> None:
        self.step = step
        self.seq = seq
        self.error_type = error_type
        self.error_message = error_message
        super().__init__(f"Step {step!r} (seq {seq}) failed: {error_type}: {error_message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.seq, self.error_type, self.error_message))


class StepTimeout(FlowdeskError, TimeoutError):
    """A step attempt ran past its timeout (it is retried like any other failure)."""


class WaitTimeout(FlowdeskError, TimeoutError):
    """A durable wait reached its timeout before what it waited for arrived."""


class NonDeterminismError(FlowdeskError):
    """Replay met a different step than the one recorded at the same position.

    The run is parked as failed. Restore the old code path (or guard the change with
    ``ctx.version``) and call ``retry``.
    """

    def __init__(self, run_id: str, seq: int, recorded: str, called: str) -> None:
        self.run_id = run_id
        self.seq = seq
        self.recorded = recorded
        self.called = called
        super().__init__(
            f"Run {run_id}: at seq {seq} the history records {recorded!r} but the workflow "
            f"now calls {called!r}. Check that the workflow is deterministic, or guard the "
            f"change with ctx.version(); then retry the run."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.run_id, self.seq, self.recorded, self.called))


class RunFailed(FlowdeskError):
    """The run failed; ``error`` holds its recorded error."""

    def __init__(self, run_id: str, error: dict[str, Any]) -> None:
        self.run_id = run_id
        self.error = error
        super().__init__(f"Run {run_id} failed: {error.get('type')}: {error.get('message')}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.run_id, self.error))


class RunCancelled(FlowdeskError):
    """The run was cancelled."""

    def __init__(self, run_id: str, reason: str = "") -> None:
        self.run_id = run_id
        self.reason = reason
        super().__init__(f"Run {run_id} was cancelled{': ' + reason if reason else ''}.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.run_id, self.reason))


class ResultTimeout(FlowdeskError, TimeoutError):
    """The run did not finish within the time given to ``App.result``."""


class Permanent(Exception):
    """Raise from a step to fail it at once: it is not retried."""


class Suspended(BaseException):
    """Unwinds a workflow that must wait; the wait is already durably recorded."""


class LeaseLost(BaseException):
    """This worker no longer owns the run; another worker has it or it was finished."""
