"""flowdesk: durable workflows that move real work across models, people and systems."""

from __future__ import annotations

from flowdesk.engine.app import App, RunHandle
from flowdesk.engine.context import Child, Context, FirstOf, Signal, StepInfo, Timer, current_step
from flowdesk.engine.tasks import Assignees, Escalation
from flowdesk.errors import (
    FlowdeskError,
    FourEyesViolation,
    IdempotencyConflict,
    InvalidForm,
    InvalidInput,
    InvalidState,
    NonDeterminismError,
    Permanent,
    PermissionDenied,
    RunCancelled,
    RunFailed,
    RunNotFound,
    SerializationError,
    StepFailed,
    StepTimeout,
    TaskNotFound,
    UnknownWorkflow,
    WaitTimeout,
)
from flowdesk.store.base import QueueLimits, RunStatus, ScheduleRecord, StepRecord
from flowdesk.store.base import RunRecord as Run
from flowdesk.store.people import TaskRecord

__version__ = "0.1.0"

__all__ = [
    "App",
    "Assignees",
    "Child",
    "Context",
    "Escalation",
    "FirstOf",
    "FlowdeskError",
    "FourEyesViolation",
    "IdempotencyConflict",
    "InvalidForm",
    "InvalidInput",
    "InvalidState",
    "NonDeterminismError",
    "Permanent",
    "PermissionDenied",
    "QueueLimits",
    "Run",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
    "RunNotFound",
    "RunStatus",
    "ScheduleRecord",
    "SerializationError",
    "Signal",
    "StepFailed",
    "StepInfo",
    "StepRecord",
    "StepTimeout",
    "TaskNotFound",
    "TaskRecord",
    "Timer",
    "UnknownWorkflow",
    "WaitTimeout",
    "__version__",
    "current_step",
]
