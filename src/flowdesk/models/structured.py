"""Structured output: answers that must be an instance of a Pydantic model.

``await ctx.model(task, input, schema=Model)`` sends the model's JSON Schema to every
provider in the chain, each in its own API's way (a llama.cpp grammar, an
OpenAI-compatible ``response_format``, an Anthropic tool definition), then validates the
reply here with the model itself. A reply that fails is retried once on the same model
with the validation error (``feedback``); a second failure is `AnswerRejected`, and the
gateway falls back down the chain.

Validation errors name the field and the rule broken, never the value (it may be
personal data).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from flowdesk import errors

_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n\s*```$", re.DOTALL)
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def json_schema(schema: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema sent to providers for ``schema``."""
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise errors.ConfigurationError(f"schema= must be a Pydantic model class, not {schema!r}.")
    return schema.model_json_schema()


def schema_name(schema: type[BaseModel]) -> str:
    """A name the APIs accept (letters, digits, ``_`` and ``-``; at most 64)."""
    return (_NAME.sub("_", schema.__name__) or "answer")[:64]


def describe(exc: ValidationError, limit: int = 5) -> str:
    """The validation errors as ``field: rule`` lines, without the values."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(the answer)"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def validate(text: str | None, schema: type[BaseModel]) -> BaseModel:
    """The reply as an instance of ``schema``, or `BadModelAnswer` saying what is wrong.
    One JSON value, optionally in a markdown code fence."""
    if text is None:
        raise errors.BadModelAnswer("the answer has no text.")
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        data = json.loads(body)
    except ValueError:
        raise errors.BadModelAnswer("the answer is not one JSON value.") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise errors.BadModelAnswer(
            f"the answer does not match {schema.__name__}: {describe(exc)}."
        ) from None


def feedback(schema: type[BaseModel], problem: str) -> str:
    """The correction sent with the one retry."""
    return (
        f"Your answer was refused: {problem} Answer again with exactly one JSON object "
        "that follows the JSON Schema you were given, and nothing else."
    )


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """``value`` (parsed JSON) with ``fn`` applied to every string in it."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_strings(v, fn) for k, v in value.items()}
    return value
