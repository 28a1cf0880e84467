"""HTML forms from a task's JSON Schema, and the posted form back to JSON.

Each property becomes one `Field` (nested objects become groups of fields with dotted
names, ``corrections.total``): strings are text inputs (a textarea past 500 characters),
enums and ``Literal`` are selects, booleans are a yes/no choice, numbers are number
inputs, nullable fields accept an empty input as null, and arrays of plain values are one
value per line. Anything else (arrays of objects, unions of objects) is edited as JSON.
The posted values are converted back by the same descriptions, then validated by
`flowdesk.humans.forms` exactly as the API validates them; its messages are shown next to
the fields they name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Widget = str  # text | textarea | number | integer | select | boolean | lines | json


@dataclass(slots=True)
class Field:
    name: str  # dotted path
    label: str
    widget: Widget
    required: bool
    nullable: bool = False
    options: list[tuple[str, str]] = field(default_factory=list)  # (value, label)
    help: str | None = None
    value: str = ""  # as shown in the input
    minimum: float | None = None
    maximum: float | None = None
    exclusive: tuple[bool, bool] = (False, False)  # is the minimum, the maximum exclusive
    max_length: int | None = None
    errors: list[str] = field(default_factory=list)
    source: Mapping[str, Any] | None = None  # the extracted field it corrects, if any
    group: str | None = None  # label of the enclosing object, if nested

    @property
    def input_id(self) -> str:
        return "f-" + self.name.replace(".", "-")


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    seen = 0
    while "$ref" in schema and seen < 20:
        ref = str(schema["$ref"])
        target: Any = root
        for part in ref.removeprefix("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        merged = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**target, **merged}
        seen += 1
    if "allOf" in schema and len(schema["allOf"]) == 1:
        schema = {
            **_resolve(schema["allOf"][0], root),
            **{k: v for k, v in schema.items() if k != "allOf"},
        }
    return schema


def _split_nullable(
    schema: Mapping[str, Any], root: Mapping[str, Any]
) -> tuple[Mapping[str, Any], bool]:
    """The non-null alternative of ``X | None`` and whether null is allowed."""
    options = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(options, list):
        rest = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
        if len(rest) == 1 and len(rest) < len(options):
            inner = dict(_resolve(rest[0], root))
            for key in ("title", "description", "default"):
                if key in schema:
                    inner[key] = schema[key]
            return inner, True
    kinds = schema.get("type")
    if isinstance(kinds, list) and "null" in kinds:
        others = [k for k in kinds if k != "null"]
        if len(others) == 1:
            return {**schema, "type": others[0]}, True
    return schema, False


ACRONYMS = frozenset({"iban", "bic", "po", "vat", "id", "sku", "url", "iso", "eu", "us", "uk"})


def _label(name: str, schema: Mapping[str, Any]) -> str:
    """The schema's own title, unless it is Pydantic's default one ("Vendor Tax Id"):
    then the name in sentence case with its acronyms in capitals ("Vendor tax ID")."""
    title = schema.get("title")
    if isinstance(title, str) and title and title != name.replace("_", " ").title():
        return title
    words = name.replace("_", " ").split()
    shown = [w.upper() if w.lower() in ACRONYMS else w.lower() for w in words]
    if shown and shown[0].islower():
        shown[0] = shown[0].capitalize()
    return " ".join(shown)


def _shown(value: Any, widget: Widget) -> str:
    if value is None:
        return ""
    if widget == "boolean":
        return "true" if value is True else "false" if value is False else ""
    if widget == "lines" and isinstance(value, list):
        return "\n".join(str(v) for v in value)
    if widget == "json":
        return json.dumps(value, ensure_ascii=False, indent=2)
    return str(value)


def fields_of(
    schema: Mapping[str, Any],
    values: Mapping[str, Any] | None = None,
    extracted: Mapping[str, Any] | None = None,
) -> list[Field]:
    """The form's fields, filled with ``values`` (a draft, or defaults). ``extracted``
    (the context's ``fields``: name -> {value, confidence, page, bbox}) links a form field
    to the extracted value it corrects, by name, and prefills it when no value is given."""
    out: list[Field] = []
    _walk(schema, schema, "", values or {}, extracted or {}, out, None)
    return out


def _walk(
    schema: Mapping[str, Any],
    root: Mapping[str, Any],
    prefix: str,
    values: Mapping[str, Any],
    extracted: Mapping[str, Any],
    out: list[Field],
    group: str | None,
) -> None:
    schema = _resolve(schema, root)
    required = set(schema.get("required", []))
    for name, raw in (schema.get("properties") or {}).items():
        prop, nullable = _split_nullable(_resolve(raw, root), root)
        path = prefix + name
        given = values.get(name) if isinstance(values, Mapping) else None
        if prop.get("type") == "object" and prop.get("properties"):
            sub = given if isinstance(given, Mapping) else prop.get("default") or {}
            _walk(prop, root, path + ".", sub, extracted, out, _label(name, prop))
            continue
        widget, options = _widget(prop, root)
        source = extracted.get(name) if isinstance(extracted.get(name), Mapping) else None
        if name in values:
            value = given
        elif source is not None and widget != "json":
            value = _coerce_shown(source.get("value"), widget)
        else:
            value = prop.get("default")
        out.append(
            Field(
                name=path,
                label=_label(name, prop),
                widget=widget,
                required=name in required and not nullable,
                nullable=nullable or name not in required,
                options=options,
                help=prop.get("description") if isinstance(prop.get("description"), str) else None,
                value=_shown(value, widget),
                minimum=_num(prop.get("minimum", prop.get("exclusiveMinimum"))),
                maximum=_num(prop.get("maximum", prop.get("exclusiveMaximum"))),
                exclusive=("exclusiveMinimum" in prop, "exclusiveMaximum" in prop),
                max_length=prop.get("maxLength")
                if isinstance(prop.get("maxLength"), int)
                else None,
                source=source,
                group=group,
            )
        )


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _coerce_shown(value: Any, widget: Widget) -> Any:
    """An extracted value (text) as the widget would show it: amounts like ``1.234,50``
    stay as extracted for text fields; number fields get the number when it parses."""
    if value is None or widget not in ("number", "integer"):
        return value
    try:
        return float(str(value).replace(",", "")) if widget == "number" else int(str(value))
    except ValueError:
        return None


def _widget(
    prop: Mapping[str, Any], root: Mapping[str, Any]
) -> tuple[Widget, list[tuple[str, str]]]:
    if "enum" in prop:
        return "select", [(_shown(v, "text"), _shown(v, "text")) for v in prop["enum"]]
    if "const" in prop:
        shown = _shown(prop["const"], "text")
        return "select", [(shown, shown)]
    kind = prop.get("type")
    if kind == "boolean":
        return "boolean", [("true", "Yes"), ("false", "No")]
    if kind == "integer":
        return "integer", []
    if kind == "number":
        return "number", []
    if kind == "string":
        limit = prop.get("maxLength")
        return ("textarea" if isinstance(limit, int) and limit > 500 else "text"), []
    if kind == "array":
        items = _resolve(prop.get("items") or {}, root)
        if items.get("type") in ("string", "integer", "number"):
            return "lines", []
    return "json", []


def data_of(
    schema: Mapping[str, Any], posted: Mapping[str, str]
) -> tuple[Any, list[dict[str, str]]]:
    """The JSON document the posted form stands for, and conversion errors (a number
    that is not one, JSON that does not parse). Empty optional inputs are left out (or
    null when the field is nullable and required)."""
    data: dict[str, Any] = {}
    problems: list[dict[str, str]] = []
    for f in fields_of(schema):
        raw = posted.get(f.name)
        if raw is None:
            continue
        text = raw if f.widget in ("textarea", "json") else raw.strip()
        if not text.strip():
            # nothing typed: null where the schema wants the key present and allows null;
            # otherwise left out (its default applies, or "required" names the field)
            if f.nullable and _explicit_null(schema, f.name):
                _put(data, f.name, None)
            continue
        try:
            value = _convert(text, f.widget)
        except ValueError as exc:
            problems.append({"field": f.name, "message": str(exc)})
            continue
        _put(data, f.name, value)
    return data, problems


def _explicit_null(schema: Mapping[str, Any], path: str) -> bool:
    """Does the schema list this nullable field as required (so null must be sent)?"""
    node: Mapping[str, Any] = _resolve(schema, schema)
    parts = path.split(".")
    for part in parts[:-1]:
        node, _ = _split_nullable(
            _resolve((node.get("properties") or {}).get(part, {}), schema), schema
        )
    return parts[-1] in set(node.get("required", []))


def _convert(text: str, widget: Widget) -> Any:
    if widget == "number":
        try:
            return float(text.replace(",", "")) if "." in text or "," in text else int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if widget == "integer":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    if widget == "boolean":
        if text not in ("true", "false"):
            raise ValueError("choose yes or no")
        return text == "true"
    if widget == "lines":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if widget == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg} (line {exc.lineno})") from None
    return text


def _put(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def attach_errors(fields: list[Field], problems: list[dict[str, Any]]) -> list[str]:
    """Put each error on the field it names; return the messages that name none."""
    by_name = {f.name: f for f in fields}
    loose: list[str] = []
    for p in problems:
        name = str(p.get("field") or "")
        target = by_name.get(name)
        if target is None:  # a nested error may name a child of a json field
            target = next((f for f in fields if name.startswith(f.name + ".")), None)
        if target is None:
            loose.append(f"{name}: {p.get('message')}" if name else str(p.get("message")))
        else:
            target.errors.append(friendly(p, target))
    return loose


def friendly(problem: Mapping[str, Any], f: Field) -> str:
    """A validation message in the words of the form, not of JSON Schema."""
    kind = problem.get("type")
    if kind in ("required", "missing"):
        return "Please fill this in." if f.widget not in ("select", "boolean") else "Please choose."
    if kind in ("enum", "const", "literal_error"):
        return "Please choose one of the options."
    if kind in ("minimum", "exclusiveMinimum") and f.minimum is not None:
        return f"Must be {'more than' if f.exclusive[0] else 'at least'} {f.minimum:g}."
    if kind in ("maximum", "exclusiveMaximum") and f.maximum is not None:
        return f"Must be {'less than' if f.exclusive[1] else 'at most'} {f.maximum:g}."
    if kind == "minLength":
        return "Please fill this in."
    if kind == "maxLength" and f.max_length is not None:
        return f"At most {f.max_length} characters."
    if kind == "type":
        return {
            "number": "Enter a number.",
            "integer": "Enter a whole number.",
            "boolean": "Please choose yes or no.",
        }.get(f.widget, str(problem.get("message")))
    return str(problem.get("message"))


def values_from_posted(fields: list[Field], posted: Mapping[str, str]) -> None:
    """Show what the person typed (after a refused submission), not the defaults."""
    for f in fields:
        if f.name in posted:
            f.value = posted[f.name]
