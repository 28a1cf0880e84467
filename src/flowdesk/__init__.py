"""flowdesk: durable workflows that move real work across models, people and systems."""

from __future__ import annotations

from flowdesk.engine.app import App, RunHandle
from flowdesk.engine.context import Child, Context, FirstOf, Signal, StepInfo, Timer, current_step
from flowdesk.errors import (
    FlowdeskError,
    IdempotencyConflict,
    InvalidInput,
    InvalidState,
    NonDeterminismError,
    Permanent,
    RunCancelled,
    RunFailed,
    RunNotFound,
    SerializationError,
    StepFailed,
    StepTimeout,
    UnknownWorkflow,
    WaitTimeout,
)
from flowdesk.store.base import QueueLimits, RunStatus, ScheduleRecord, StepRecord
from flowdesk.store.base import RunRecord as Run

__version__ = "0.1.0"

__all__ = [
    "App",
    "Child",
    "Context",
    "FirstOf",
    "FlowdeskError",
    "IdempotencyConflict",
    "InvalidInput",
    "InvalidState",
    "NonDeterminismError",
    "Permanent",
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
    "Timer",
    "UnknownWorkflow",
    "WaitTimeout",
    "__version__",
    "current_step",
]
