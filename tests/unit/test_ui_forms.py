"""Forms generated from a task's JSON Schema (`flowdesk.server.ui.formgen`): the fields a
schema gives, the posted form read back into the document the schema validates, and the
validation messages put on the fields they name. Pure functions: no store."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from flowdesk.humans import forms
from flowdesk.server.ui import formgen


class Line(BaseModel):
    sku: str
    qty: int = Field(ge=1)


class Corrections(BaseModel):
    total: float | None = Field(default=None, gt=0)
    iban: str | None = None


class Review(BaseModel):
    decision: Literal["approve", "reject"]
    urgent: bool = False
    corrections: Corrections
    count: int = Field(default=1, ge=1, le=10)
    tags: list[str] = []
    lines: list[Line] = []
    reason: str | None
    note: str = Field(default="", max_length=2000)


SCHEMA = Review.model_json_schema()


def test_each_kind_of_property_gets_its_widget():
    fields = {f.name: f for f in formgen.fields_of(SCHEMA)}
    assert list(fields) == [
        "decision",
        "urgent",
        "corrections.total",
        "corrections.iban",
        "count",
        "tags",
        "lines",
        "reason",
        "note",
    ]
    assert fields["decision"].widget == "select" and fields["decision"].required
    assert fields["decision"].options == [("approve", "approve"), ("reject", "reject")]
    assert fields["urgent"].widget == "boolean" and fields["urgent"].value == "false"
    assert fields["corrections.total"].widget == "number"
    assert (
        fields["corrections.total"].nullable and fields["corrections.total"].group == "Corrections"
    )
    assert fields["corrections.total"].minimum == 0 and fields["corrections.total"].exclusive[0]
    assert fields["count"].widget == "integer" and fields["count"].value == "1"
    assert fields["tags"].widget == "lines" and fields["lines"].widget == "json"
    assert fields["reason"].nullable and not fields["reason"].required
    assert fields["note"].widget == "textarea" and fields["note"].max_length == 2000


def test_extracted_values_prefill_the_fields_they_correct_and_drafts_win():
    extracted = {"total": {"value": "1,234.50", "confidence": 0.4, "page": 1, "bbox": None}}
    fields = {f.name: f for f in formgen.fields_of(SCHEMA, None, extracted)}
    assert fields["corrections.total"].value == "1234.5"
    assert fields["corrections.total"].source == extracted["total"]
    draft = {"corrections": {"total": 99}}
    fields = {f.name: f for f in formgen.fields_of(SCHEMA, draft, extracted)}
    assert fields["corrections.total"].value == "99"


def test_a_posted_form_becomes_the_document_the_schema_validates():
    posted = {
        "decision": "approve",
        "urgent": "true",
        "corrections.total": "1,250.75",
        "corrections.iban": "",
        "count": "3",
        "tags": "late\n\n vip \n",
        "lines": '[{"sku": "A-1", "qty": 2}]',
        "reason": "",
        "note": "",
    }
    data, problems = formgen.data_of(SCHEMA, posted)
    assert problems == []
    assert data == {
        "decision": "approve",
        "urgent": True,
        "corrections": {"total": 1250.75},
        "count": 3,
        "tags": ["late", "vip"],
        "lines": [{"sku": "A-1", "qty": 2}],
        "reason": None,  # required but nullable: an empty input is null
    }
    clean = forms.validate("t1", SCHEMA, None, data)
    assert clean == data


def test_bad_inputs_are_named_at_their_fields_in_plain_words():
    posted = {"decision": "", "count": "many", "lines": "[{", "corrections.total": "-3"}
    data, problems = formgen.data_of(SCHEMA, posted)
    assert {p["field"] for p in problems} == {"count", "lines"}
    fields = formgen.fields_of(SCHEMA)
    loose = formgen.attach_errors(fields, problems + forms.schema_errors(SCHEMA, data))
    by_name = {f.name: f.errors for f in fields}
    assert by_name["count"] == ["'many' is not a whole number"]
    assert by_name["lines"][0].startswith("not valid JSON")
    assert by_name["decision"] == ["Please choose."]
    assert by_name["corrections.total"] == ["Must be more than 0."]
    assert loose == []
    assert formgen.attach_errors(fields, [{"field": "", "message": "whole form"}]) == ["whole form"]


def test_percentiles_by_nearest_rank():
    from flowdesk.server.ui.dashboard import percentile

    assert percentile([], 50) == 0.0
    assert percentile([42.0, 58.0], 50) == 42.0
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (
        50.0,
        95.0,
        99.0,
    )
    assert percentile([7.0], 99) == 7.0


def test_labels_read_like_sentences_unless_the_schema_names_them():
    class Invoice(BaseModel):
        vendor_tax_id: str
        po_number: str
        iban: str
        net: float = Field(title="Net amount (EUR)")

    labels = [f.label for f in formgen.fields_of(Invoice.model_json_schema())]
    assert labels == ["Vendor tax ID", "PO number", "IBAN", "Net amount (EUR)"]
