"""The extraction result as it crosses the boundary: Pydantic models and the JSON dict.

`extract_invoice` returns an `Extraction`: a plain ``dict`` (so ``json.dumps`` takes it as
is, and ``result["fields"]["total"]["value"]`` works) that also answers
``model_dump()`` and ``model_dump_json()`` like the `InvoiceExtraction` model it was
validated against.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FIELD_NAMES = (
    "vendor_name",
    "invoice_number",
    "invoice_date",
    "due_date",
    "currency",
    "subtotal",
    "tax",
    "total",
    "vendor_tax_id",
    "po_number",
    "iban",
)
LOW_CONFIDENCE = 0.6

Severity = Literal["error", "warning", "info"]


class FieldValue(BaseModel):
    """One field: its value (None when not found), how sure, and where it was read."""

    model_config = ConfigDict(extra="forbid")

    value: str | None
    confidence: float = Field(ge=0.0, le=1.0)
    page: int | None
    bbox: list[float] | None
    low_confidence: bool = False
    source: str | None = None  # "label", "pattern", "layout", "inferred"


class LineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None
    quantity: str | None
    unit_price: str | None
    amount: str | None
    confidence: float = Field(ge=0.0, le=1.0)
    page: int
    bbox: list[float]
    low_confidence: bool = False
    notes: list[str] = Field(default_factory=list)


class Issue(BaseModel):
    """A validation finding."""

    model_config = ConfigDict(extra="forbid")

    code: str
    field: str | None
    message: str
    severity: Severity


class DocumentInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None
    kind: str
    pages: int
    ocr_pages: int
    locale: str | None
    decimal_separator: str | None
    date_order: str | None
    notes: list[str] = Field(default_factory=list)


class InvoiceExtraction(BaseModel):
    """What ``flowdesk documents extract --json`` prints."""

    model_config = ConfigDict(extra="forbid")

    fields: dict[str, FieldValue]
    line_items: list[LineItem]
    validation: list[Issue]
    document: DocumentInfo


class Extraction(dict[str, Any]):
    """The JSON-ready result; ``model_dump()`` gives a deep copy, ``model`` the Pydantic
    model."""

    def model_dump(self, **_: Any) -> dict[str, Any]:
        return copy.deepcopy(dict(self))

    def model_dump_json(self, *, indent: int | None = None, **_: Any) -> str:
        return json.dumps(self, indent=indent, ensure_ascii=False)

    @property
    def model(self) -> InvoiceExtraction:
        return InvoiceExtraction.model_validate(self)

    def value(self, name: str) -> str | None:
        """The value of field ``name`` (None when not found)."""
        entry = self["fields"][name]
        return None if entry is None else entry.get("value")
