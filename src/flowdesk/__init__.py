"""flowdesk: durable workflows that move real work across models, people and systems."""

from __future__ import annotations

from flowdesk.engine.app import App, RunHandle
from flowdesk.engine.context import Context, StepInfo, current_step
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
from flowdesk.store.base import RunRecord as Run
from flowdesk.store.base import RunStatus, StepRecord

__version__ = "0.1.0"

__all__ = [
    "App",
    "Context",
    "FlowdeskError",
    "IdempotencyConflict",
    "InvalidInput",
    "InvalidState",
    "NonDeterminismError",
    "Permanent",
    "Run",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
    "RunNotFound",
    "RunStatus",
    "SerializationError",
    "StepFailed",
    "StepInfo",
    "StepRecord",
    "StepTimeout",
    "UnknownWorkflow",
    "WaitTimeout",
    "__version__",
    "current_step",
]
