"""Workflow and step definitions: names, retry policies, input models, result types."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import random
import typing
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

import pydantic

from flowdesk import codec, errors

P = ParamSpec("P")
R = TypeVar("R")

_PLAIN_JSON = {None, type(None), Any, dict, list, str, int, float, bool, object}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a failing step is tried again.

    ``retries`` is the number of tries after the first. The n-th retry waits
    ``min(max_delay, delay * backoff ** (n - 1))`` seconds, scaled by a random factor in
    [0.5, 1.0] when ``jitter`` is on (so failing callers do not retry in lockstep).
    `flowdesk.Permanent` and the ``no_retry_on`` types are never retried.
    """

    retries: int = 0
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: bool = True
    no_retry_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise errors.ConfigurationError("retries must be >= 0")
        if self.delay < 0 or self.max_delay < 0:
            raise errors.ConfigurationError("retry delays must be >= 0")
        if self.backoff < 1:
            raise errors.ConfigurationError("backoff must be >= 1 (1 means a constant delay)")

    def wait_before(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        try:
            grown = self.delay * self.backoff ** (retry - 1)
        except OverflowError:  # past any float: the cap applies (or 0 without a delay)
            grown = self.max_delay if self.delay else 0.0
        base = min(self.max_delay, grown)
        return base * (0.5 + random.random() / 2) if self.jitter else base

    def retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, (errors.Permanent, errors.SerializationError, *self.no_retry_on))


def _return_adapter(fn: Callable[..., Any]) -> pydantic.TypeAdapter[Any] | None:
    """A TypeAdapter for the function's return annotation when JSON alone would not give
    the same value back (Pydantic models, dataclasses, tuples, datetimes ...)."""
    try:
        annotation = typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable forward references: fall back to plain JSON
        return None
    origin = typing.get_origin(annotation) or annotation
    if annotation is None or annotation in _PLAIN_JSON:
        return None
    if origin in (dict, list) and all(a in _PLAIN_JSON for a in typing.get_args(annotation)):
        return None  # dict[str, Any], list[int] ...: JSON gives them back as they were
    try:
        return pydantic.TypeAdapter(annotation)
    except pydantic.PydanticSchemaGenerationError:
        return None


class StepDef(Generic[P, R]):
    """A function registered as a step. Calling it directly runs the plain function."""

    def __init__(
        self, fn: Callable[P, R], *, name: str, policy: RetryPolicy, timeout: float | None
    ) -> None:
        self.fn = fn
        self.name = name
        self.policy = policy
        self.timeout = timeout
        self.is_async = inspect.iscoroutinefunction(fn)
        self._adapter = _return_adapter(fn)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def decode(self, text: str | None) -> Any:
        """The recorded result as the step's return type."""
        if text is None:
            return None
        if self._adapter is not None:
            return self._adapter.validate_json(text)
        return json.loads(text)

    def __repr__(self) -> str:
        return f"<step {self.name}>"


class WorkflowDef:
    """A workflow: an ``async def`` taking a `Context` and JSON input."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        queue: str,
        timeout: float | None = None,
        key: str | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise errors.ConfigurationError(
                f"Workflow {name!r} must be an `async def` function taking a Context first."
            )
        self.fn = fn
        self.name = name
        self.queue = queue
        self.timeout = timeout
        self.key = key  # input field whose value is the run's concurrency key
        self._result_adapter = _return_adapter(fn)
        params = list(inspect.signature(fn).parameters.values())[1:]
        hints = typing.get_type_hints(fn)
        self.params = [p.name for p in params]
        self.model: type[pydantic.BaseModel]
        self.single_model = False
        if len(params) == 1:
            ann = hints.get(params[0].name)
            if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
                self.model, self.single_model = ann, True
        if not self.single_model:
            fields: dict[str, Any] = {}
            for p in params:
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    raise errors.ConfigurationError(
                        f"Workflow {name!r}: *args/**kwargs are not supported; name each input."
                    )
                ann = hints.get(p.name, Any)
                default = ... if p.default is inspect.Parameter.empty else p.default
                fields[p.name] = (ann, default)
            self.model = pydantic.create_model(
                f"{fn.__name__}_input",
                __config__=pydantic.ConfigDict(extra="forbid"),
                **fields,
            )

    def validate(self, value: Any) -> str:
        """Validate start input; returns it encoded for the store, or raises InvalidInput."""
        if isinstance(value, pydantic.BaseModel):
            value = value.model_dump(mode="json")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise errors.InvalidInput(
                self.name,
                [{"loc": (), "msg": f"input must be a JSON object, not {type(value).__name__}"}],
            )
        try:
            model = self.model.model_validate(value)
        except pydantic.ValidationError as exc:
            raise errors.InvalidInput(
                self.name, [dict(e) for e in exc.errors(include_url=False, include_input=False)]
            ) from None
        return codec.encode(model.model_dump(mode="json"), "workflow input")

    def concurrency_key(self, encoded: str) -> str | None:
        if self.key is None:
            return None
        value = json.loads(encoded).get(self.key)
        return None if value is None else str(value)

    def kwargs(self, encoded: str) -> dict[str, Any]:
        model = self.model.model_validate_json(encoded)
        if self.single_model:
            return {self.params[0]: model}
        return {name: getattr(model, name) for name in self.params}

    def decode_result(self, value: Any) -> Any:
        if self._result_adapter is None or value is None:
            return value
        return self._result_adapter.validate_python(value)

    def input_schema(self) -> dict[str, Any]:
        return self.model.model_json_schema()


class Registry:
    def __init__(self) -> None:
        self.workflows: dict[str, WorkflowDef] = {}
        self._steps: dict[Callable[..., Any], StepDef[Any, Any]] = {}

    def add_workflow(self, wdef: WorkflowDef) -> None:
        existing = self.workflows.get(wdef.name)
        if existing is not None and existing.fn is not wdef.fn:
            raise errors.ConfigurationError(f"Workflow {wdef.name!r} is registered twice.")
        self.workflows[wdef.name] = wdef

    def workflow(self, name: str) -> WorkflowDef:
        try:
            return self.workflows[name]
        except KeyError:
            raise errors.UnknownWorkflow(name, list(self.workflows)) from None

    def step_def(self, fn: Callable[..., Any]) -> StepDef[Any, Any]:
        if isinstance(fn, StepDef):
            return fn
        sdef = self._steps.get(fn)
        if sdef is None:
            if not callable(fn):
                raise errors.ConfigurationError(f"ctx.step needs a function, got {fn!r}.")
            sdef = StepDef(fn, name=fn.__qualname__, policy=RetryPolicy(), timeout=None)
            self._steps[fn] = sdef
        return sdef
