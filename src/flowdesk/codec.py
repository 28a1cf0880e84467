"""JSON encoding of everything flowdesk stores: inputs, step results, signals, errors."""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import PydanticSerializationError, to_jsonable_python

from flowdesk import errors

_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=to_jsonable_python
)


def encode(value: Any, what: str = "value") -> str:
    """Encode ``value`` as compact JSON; Pydantic models, dataclasses, datetimes, UUIDs and
    decimals are turned into their JSON form. Anything else raises `SerializationError`."""
    if value is None:
        return "null"
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError, PydanticSerializationError) as exc:
        raise errors.SerializationError(
            f"{what} of type {type(value).__name__} cannot be stored as JSON: {exc}. "
            "Return JSON types, Pydantic models or dataclasses."
        ) from exc


def decode(text: str | None) -> Any:
    return None if text is None else json.loads(text)
