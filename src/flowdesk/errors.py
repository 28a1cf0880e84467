"""Every error flowdesk raises on purpose.

The tree::

    FlowdeskError
    ├── ConfigurationError          the app or its store is set up wrong
    │   └── SecretUnavailable       a webhook's secret variable or file is not there
    ├── StoreError                  the database refused or is not flowdesk's
    │   ├── SchemaTooNew            the database was written by a newer flowdesk
    │   └── PayloadError            a stored payload cannot be opened
    │       ├── MasterKeyMissing    its data key is wrapped by a master key not loaded
    │       └── PayloadTampered     its ciphertext (or its row) was changed
    ├── NotFound
    │   ├── UnknownWorkflow         no workflow is registered under that name
    │   ├── RunNotFound             no run has that id
    │   ├── TaskNotFound            no human task has that id
    │   ├── UnknownModelTask        no model task has that name in the gateway's config
    │   ├── ModelNotFound           no trained local model (or version) for that task
    │   ├── UnknownHook             no webhook is registered under that name
    │   └── AssistantNotInstalled   the app has no such assistant installed
    ├── InvalidInput                input failed the workflow's input model
    ├── InvalidForm                 task form data failed the form's JSON Schema
    ├── InvalidCursor               a pagination cursor no page returned
    ├── Conflict                    the thing to create already exists
    │   └── DeliveryConflict        a webhook delivery id (or signed request) came again
    │                               with another body (or under another delivery id)
    ├── Unauthenticated             no credential, or an expired, revoked or forged one
    │   ├── BadSignature            a webhook's signature is missing or does not verify
    │   ├── StaleDelivery           a webhook's timestamp is outside the tolerance
    │   └── SignInThrottled         too many failed sign-ins: the password is not checked
    ├── PermissionDenied            the user may not do this
    │   └── FourEyesViolation       the requester tried to approve their own work
    ├── ModelError                  a model call failed (the gateway may fall back)
    │   ├── ProviderUnavailable     timeout, connection error, 5xx, 429, open circuit
    │   │   └── ModelOverloaded     a local model's queue of waiting calls is full
    │   ├── BadModelAnswer          the provider's answer did not parse
    │   │   └── AnswerRejected      a guardrail refused the answer: it failed its schema
    │   │                           after one retry, or it is longer than allowed
    │   ├── AnswerTimeout           no acceptable answer within the task's time limit
    │   ├── BudgetExceeded          a cost budget or rate limit refuses the call
    │   └── NoEligibleModel         routing left no model that may take this call
    ├── ModelInputTooLong           model input longer than the task's max_input_chars
    ├── TrainingDataError           labelled examples that cannot train a classifier
    ├── ModelRegistryError          the local model registry refused a change
    ├── ConnectorError              a connector call failed
    │   ├── ConnectorUnavailable    timeout, connection error, 429/5xx after the connector's
    │   │                           own retries (the step may retry it)
    │   ├── ConnectorRejected       the target refused the call for good (also Permanent)
    │   ├── ConnectorInputRefused   the input carries a credential or does not fit the
    │   │                           operation (also Permanent)
    │   ├── BadTargetResponse       the target's answer does not fit the operation's output
    │   │                           model (also Permanent)
    │   └── EffectUncertain         an earlier attempt may have had its effect, and the target
    │                               cannot tell a repeat (also Permanent)
    ├── DocumentError               a document could not be read (``code`` names the reason)
    │   ├── UnsupportedDocument     not a PDF, PNG, JPEG or TIFF
    │   ├── EmptyDocument           the file has no bytes
    │   ├── CorruptDocument         the file does not decode as its format
    │   ├── EncryptedDocument       the PDF needs a password
    │   ├── DocumentTooLarge        over a limit of `flowdesk.documents.Limits`
    │   │   ├── TooManyPages        more pages than ``max_pages``
    │   │   └── ImageTooLarge       more pixels than ``max_pixels`` (decompression bombs)
    │   └── OcrFailed               Tesseract failed on a page
    │       ├── OcrUnavailable      Tesseract (or a language it needs) is not installed
    │       └── OcrTimeout          a page took longer than ``ocr_timeout`` (also a
    │                               TimeoutError)
    ├── SourceUnavailable           an event source (NATS, Redis, Kafka) cannot be reached
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


class PayloadError(StoreError):
    """A stored payload cannot be opened."""


class MasterKeyMissing(PayloadError):
    """A data key is wrapped by a master key that is not loaded."""

    def __init__(self, key_id: str, where: str = "") -> None:
        super().__init__(
            f"Master key {key_id} is needed{where} but is not loaded (or a different key "
            f"carries that id). Load it with FLOWDESK_MASTER_KEY_FILE or FLOWDESK_MASTER_KEY "
            "(the key file keeps every key not yet retired); a payload is never opened with "
            "another key."
        )
        self.key_id = key_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key_id,))


class PayloadTampered(PayloadError):
    """A stored ciphertext does not authenticate: it was changed or moved to another row."""

    def __init__(self, key_id: str, where: str) -> None:
        super().__init__(
            f"Tampering detected: the payload {where} (data key {key_id}) does not "
            "authenticate. It was changed, or copied from another row. Restore it from a "
            "backup; flowdesk will not return it."
        )
        self.key_id = key_id
        self.where = where

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key_id, self.where))


class NotFound(FlowdeskError):
    """Nothing has that name or id."""


class AssistantNotInstalled(NotFound):
    """The app has no such assistant installed."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"The {name} assistant is not installed on this app: build it with "
            f"flowdesk.assistants.{name} before serving the API."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name,))


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


class SignInThrottled(Unauthenticated):
    """Too many failed sign-ins of this account or from this address: wait, then try
    again. ``retry_after`` is the wait in seconds."""

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"Too many failed sign-ins; try again in {retry_after} seconds.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.retry_after,))


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


class ModelOverloaded(ProviderUnavailable):
    """A local model's queue of waiting calls is full: the call is refused at once (the
    gateway falls back down the chain) instead of waiting without bound."""


class BadModelAnswer(ModelError):
    """The provider answered something that does not parse as the expected answer."""


class AnswerRejected(BadModelAnswer):
    """A guardrail refused a generated answer: it still failed its schema after one retry
    with the validation error, or it is longer than the task's ``max_answer_chars``. The
    answer is never passed on; the gateway falls back down the chain, and when no model
    gives an acceptable answer the workflow gets this error (and can hand the work to a
    person)."""


class AnswerTimeout(ModelError):
    """No acceptable answer came within the task's ``answer_timeout_s`` (every attempt,
    retry and fallback included); the generation in progress is stopped."""


class BudgetExceeded(ModelError):
    """A cost budget or a rate limit refuses this call."""


class NoEligibleModel(ModelError):
    """No model in the task's chain may take this call (data classification, region,
    capability or cost ceiling); ``reasons`` says why each was left out."""

    def __init__(self, task: str, reasons: dict[str, str]) -> None:
        self.task = task
        self.reasons = dict(reasons)
        why = "; ".join(f"{model}: {reason}" for model, reason in self.reasons.items())
        super().__init__(
            f"No model may answer task {task!r}: {why or 'its chain is empty'}. Add a model "
            "that fits (a local one for pii/confidential data) to the task's chain or routes."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task, self.reasons))


class UnknownModelTask(NotFound):
    """No model task has that name in the gateway's configuration."""

    def __init__(self, task: str, known: list[str] | None = None) -> None:
        self.task = task
        self.known = sorted(known or [])
        hint = f"Known tasks: {', '.join(self.known)}." if self.known else "No task is configured."
        super().__init__(
            f"Unknown model task {task!r}. {hint} Add a [tasks.{task}] table to the gateway's "
            "config."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task, self.known))


class ModelNotFound(NotFound):
    """No trained local model has that task name (or that version) in the models directory."""

    def __init__(
        self,
        task: str,
        version: str | None = None,
        known: list[str] | None = None,
        root: str = "",
    ) -> None:
        self.task = task
        self.version = version
        self.known = list(known or [])
        self.root = root
        where = f" in {root}" if root else ""
        if version is None:
            hint = f" Known tasks: {', '.join(self.known)}." if self.known else ""
            message = (
                f"No local model task {task!r}{where}.{hint} Train one with "
                f"`flowdesk models train {task} FILE`, or point FLOWDESK_MODELS_DIR at the "
                "models directory."
            )
        else:
            hint = f" Its versions: {', '.join(self.known)}." if self.known else ""
            message = (
                f"Local model task {task!r} has no version {version!r}{where}.{hint} "
                "List them with `flowdesk models list`."
            )
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task, self.version, self.known, self.root))


class TrainingDataError(FlowdeskError):
    """The labelled examples cannot train a classifier; ``line`` names the bad line."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        self.path = path
        self.problem = problem
        self.line = line
        at = f", line {line}" if line is not None else ""
        super().__init__(f"{path}{at}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem, self.line))


class ModelRegistryError(FlowdeskError):
    """The local model registry refused the change (bad name, percent, or no history)."""


class ModelInputTooLong(FlowdeskError):
    """The model input is longer than the task allows; it is refused, never truncated."""

    def __init__(self, task: str, length: int, limit: int) -> None:
        self.task = task
        self.length = length
        self.limit = limit
        super().__init__(
            f"Input for model task {task!r} has {length} characters, more than its "
            f"max_input_chars = {limit}. Shorten or split the input, or raise max_input_chars "
            "in the task's config."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task, self.length, self.limit))


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
    """The idempotency key was already used for a different workflow or input.

    ``run_id`` names the run that holds the key (None when unknown)."""

    def __init__(self, message: str | None = None, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_conflict, (self.message, self.run_id))


def _rebuild_conflict(message: str, run_id: str | None) -> IdempotencyConflict:
    return IdempotencyConflict(message, run_id=run_id)


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


class DocumentError(FlowdeskError):
    """The document could not be read."""

    code = "document_error"

    def __init__(self, message: str | None = None, *, path: str = "", **details: Any) -> None:
        self.path = path
        self.details = details
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_document_error, (type(self), self.message, self.path, self.details))


def _rebuild_document_error(
    cls: type[DocumentError], message: str, path: str, details: dict[str, Any]
) -> DocumentError:
    return cls(message, path=path, **details)


class UnsupportedDocument(DocumentError):
    """The file is not a PDF, PNG, JPEG or TIFF document."""

    code = "unsupported_format"


class EmptyDocument(DocumentError):
    """The file is empty (0 bytes): upload it again."""

    code = "empty_file"


class CorruptDocument(DocumentError):
    """The file is damaged: it does not decode as the format its bytes claim."""

    code = "corrupt_file"


class EncryptedDocument(DocumentError):
    """The PDF is encrypted and needs a password: ask the sender for an unprotected copy."""

    code = "encrypted_pdf"


class DocumentTooLarge(DocumentError):
    """The document is over one of the reader's limits."""

    code = "too_large"


class TooManyPages(DocumentTooLarge):
    """The document has more pages than the reader's page limit."""

    code = "too_many_pages"


class ImageTooLarge(DocumentTooLarge):
    """An image has more pixels than the reader's pixel limit (a decompression bomb?)."""

    code = "image_too_large"


class OcrFailed(DocumentError):
    """Tesseract could not read a page."""

    code = "ocr_failed"


class OcrUnavailable(OcrFailed):
    """Tesseract is not installed: `make install` installs it (Debian package
    tesseract-ocr), or install it with your system's package manager."""

    code = "ocr_unavailable"


class OcrTimeout(OcrFailed, TimeoutError):
    """Tesseract took longer than the per-page time limit."""

    code = "ocr_timeout"


class ResultTimeout(FlowdeskError, TimeoutError):
    """The run did not finish within the time given to ``App.result``."""


class Permanent(Exception):
    """Raise from a step to fail it at once: it is not retried."""


class ConnectorError(FlowdeskError):
    """A connector call failed."""

    def __init__(
        self, message: str | None = None, *, connector: str = "", operation: str = ""
    ) -> None:
        super().__init__(message)
        self.connector = connector
        self.operation = operation

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_connector_error, (type(self), self.message, dict(self.__dict__)))


def _rebuild_connector_error(
    cls: type[ConnectorError], message: str, state: dict[str, Any]
) -> ConnectorError:
    exc = cls.__new__(cls)
    FlowdeskError.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class ConnectorUnavailable(ConnectorError):
    """The target did not answer in time, could not be reached, or refused for now (429,
    5xx) after the connector's own retries; the step's retry policy may try again later."""

    def __init__(
        self,
        message: str | None = None,
        *,
        connector: str = "",
        operation: str = "",
        retry_after: float | None = None,
        maybe_done: bool = False,
    ) -> None:
        super().__init__(message, connector=connector, operation=operation)
        self.retry_after = retry_after
        # The last attempt may have reached the target and had its effect (a timeout).
        self.maybe_done = maybe_done


class ConnectorRejected(ConnectorError, Permanent):
    """The target refused the call for good (a 4xx answer, a constraint violation); the
    step is not retried. Fix the input or the target's configuration, then retry the run."""

    def __init__(
        self,
        message: str | None = None,
        *,
        connector: str = "",
        operation: str = "",
        status: int | None = None,
    ) -> None:
        super().__init__(message, connector=connector, operation=operation)
        self.status = status


class ConnectorInputRefused(ConnectorError, Permanent):
    """The connector refused the input before calling anything: it does not fit the
    operation's input model, or it carries a credential. Credentials come from the
    environment or a secrets file (`flowdesk.connectors.secrets`), never from workflow input."""


class BadTargetResponse(ConnectorError, Permanent):
    """The target answered, but its answer does not fit the operation's output model."""


class EffectUncertain(ConnectorError, Permanent):
    """An earlier attempt of this call started and never reported back, so its effect may
    have happened; the target cannot recognise a repeat, and the connector is set to
    refuse one. Check the target, then mark the effect in `connector_effects` and retry."""


# -- triggers (webhooks, event streams) ----------------------------------------------------


class SecretUnavailable(ConfigurationError):
    """The webhook's secret is not configured: set its environment variable or secrets
    file on the server (the request never carries it)."""


class UnknownHook(NotFound):
    """No webhook is registered under that name."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        self.known = sorted(known or [])
        super().__init__(
            f"No webhook {name!r}. Register it with flowdesk.triggers.webhook(app, {name!r}, "
            "workflow=..., secret_env=...)."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.known))


class DeliveryConflict(Conflict):
    """The delivery id was used before for another body (or the same signed request came
    under another delivery id): nothing was started. Send new work under a new delivery id."""


class BadSignature(Unauthenticated):
    """The webhook signature is missing or does not verify: sign ``timestamp + "." + body``
    with HMAC-SHA256 and the hook's secret, and send ``X-Flowdesk-Signature: v1=<hex>``."""


class StaleDelivery(Unauthenticated):
    """The webhook's ``X-Flowdesk-Timestamp`` is too far from the server's clock: sign each
    delivery (and each retry) with the current time, and check the sender's clock."""


class SourceUnavailable(FlowdeskError):
    """An event source (NATS, Redis, Kafka) cannot be reached; check its address and that
    it runs."""


class Suspended(BaseException):
    """Unwinds a workflow that must wait; the wait is already durably recorded."""


class LeaseLost(BaseException):
    """This worker no longer owns the run; another worker has it or it was finished."""
