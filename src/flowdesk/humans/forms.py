"""Validating what a person submits against a task's form.

The task stores its form as JSON Schema (from the Pydantic model the workflow named), so
any process can validate a submission without the workflow's code: the API server on
PostgreSQL stays stateless. When the form's model can be imported here too, it validates
as well, so model-level rules (validators beyond JSON Schema) are enforced before the
task closes, never after.
"""

from __future__ import annotations

import importlib
from typing import Any

import jsonschema
from pydantic import BaseModel, ValidationError

from flowdesk import errors


def _path(parts: Any) -> str:
    return ".".join(str(p) for p in parts)


def schema_errors(schema: dict[str, Any], data: Any) -> list[dict[str, Any]]:
    """Field-level errors of ``data`` against a JSON Schema (empty when valid)."""
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    found = []
    named: set[str] = set()
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.path))):
        field = _path(err.absolute_path)
        if err.validator == "required" and isinstance(err.validator_value, list):
            # "x is a required property", one error per missing field: name each one
            missing = [
                _path([*err.absolute_path, name])
                for name in err.validator_value
                if isinstance(err.instance, dict) and name not in err.instance
            ]
            field = next((m for m in missing if m not in named), field)
            named.add(field)
        if err.validator in ("anyOf", "oneOf") and err.context:
            # ``X | None`` and other unions: the branch whose type matched says what is wrong
            # ("-3 is less than or equal to the minimum of 0", not "not valid under any")
            typed = [e for e in err.context if e.validator != "type"]
            if len(typed) == 1:
                err = typed[0]
        found.append({"field": field, "message": err.message, "type": str(err.validator)})
    return found


def form_model(ref: str | None) -> type[BaseModel] | None:
    """The Pydantic model behind a form (``module:QualName``), when importable here."""
    if not ref or ":" not in ref:
        return None
    module_name, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseModel) else None


def validate(task_id: str, schema: dict[str, Any], ref: str | None, data: Any) -> Any:
    """Return ``data`` in its stored form, or raise `InvalidForm` with every field error."""
    found = schema_errors(schema, data)
    if found:
        raise errors.InvalidForm(task_id, found)
    model = form_model(ref)
    if model is None:
        return data
    try:
        return model.model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        raise errors.InvalidForm(
            task_id,
            [
                {"field": _path(e["loc"]), "message": e["msg"], "type": e["type"]}
                for e in exc.errors()
            ],
        ) from None
