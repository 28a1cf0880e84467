"""Invoice field extraction: labels left of and above values, tables by column alignment,
amounts and dates in several locales, multilingual labels, confidences and their flags,
the JSON contract; on text given with boxes, on the sample PDFs and on a sample scan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import flowdesk.documents
from flowdesk.documents import FIELD_NAMES, Document, extract_invoice

DATA = Path(__file__).resolve().parent.parent / "data" / "invoices"
Line = tuple[str, tuple[float, float, float, float]]


def page(*lines: Line) -> Document:
    return Document.from_words(list(lines), width=1000, height=1400)


def value(result: dict[str, Any], name: str) -> Any:
    return result["fields"][name]["value"]


def test_labels_left_of_their_values_in_english() -> None:
    doc = page(
        ("Northwind Supplies Ltd", (60, 40, 420, 80)),
        ("12 Station Road, Leeds LS1 4AP", (60, 90, 360, 110)),
        ("INVOICE", (700, 40, 900, 80)),
        ("Invoice No.", (600, 130, 700, 150)),
        ("INV-2025-0042", (780, 130, 920, 150)),
        ("Invoice Date", (600, 160, 700, 180)),
        ("14/03/2025", (800, 160, 920, 180)),
        ("Due Date", (600, 190, 700, 210)),
        ("13/04/2025", (800, 190, 920, 210)),
        ("PO Number", (600, 220, 700, 240)),
        ("PO-7781", (840, 220, 920, 240)),
        ("Subtotal", (600, 700, 700, 720)),
        ("£1,000.00", (820, 700, 920, 720)),
        ("VAT (20%)", (600, 730, 700, 750)),
        ("£200.00", (840, 730, 920, 750)),
        ("Total Due", (600, 760, 700, 780)),
        ("£1,200.00", (820, 760, 920, 780)),
        ("VAT Reg. No.: GB123 4567 89", (60, 1300, 360, 1320)),
        ("IBAN: GB33 BUKB 2020 1555 5555 55", (60, 1330, 420, 1350)),
    )
    result = extract_invoice(doc)
    assert value(result, "vendor_name") == "Northwind Supplies Ltd"
    assert value(result, "invoice_number") == "INV-2025-0042"
    assert value(result, "invoice_date") == "2025-03-14"
    assert value(result, "due_date") == "2025-04-13"
    assert value(result, "po_number") == "PO-7781"
    assert value(result, "currency") == "GBP"
    assert (value(result, "subtotal"), value(result, "tax"), value(result, "total")) == (
        "1000.00",
        "200.00",
        "1200.00",
    )
    assert value(result, "vendor_tax_id") == "GB123 4567 89"
    assert value(result, "iban") == "GB33BUKB20201555555555"
    total = result["fields"]["total"]
    assert total["page"] == 1 and total["bbox"] == [820.0, 760.0, 920.0, 780.0]
    assert total["confidence"] >= 0.9 and total["low_confidence"] is False


def test_labels_above_their_values_in_german() -> None:
    doc = page(
        ("Bergmann Bürotechnik GmbH", (500, 40, 940, 80)),
        ("Rechnungsnummer", (60, 200, 220, 216)),
        ("RE-10482", (60, 222, 170, 242)),
        ("Rechnungsdatum", (300, 200, 450, 216)),
        ("04.03.2025", (300, 222, 420, 242)),
        ("Fällig am", (540, 200, 640, 216)),
        ("18.03.2025", (540, 222, 660, 242)),
        ("Nettobetrag", (600, 700, 720, 720)),
        ("1.234,56 €", (820, 700, 920, 720)),
        ("MwSt. 19%", (600, 730, 720, 750)),
        ("234,57 €", (840, 730, 920, 750)),
        ("Gesamtbetrag", (600, 760, 720, 780)),
        ("1.469,13 €", (820, 760, 920, 780)),
        ("USt-IdNr.: DE123456789", (60, 1300, 300, 1320)),
    )
    result = extract_invoice(doc)
    assert value(result, "vendor_name") == "Bergmann Bürotechnik GmbH"
    assert value(result, "invoice_number") == "RE-10482"
    assert value(result, "invoice_date") == "2025-03-04"
    assert value(result, "due_date") == "2025-03-18"
    assert value(result, "currency") == "EUR"
    assert value(result, "subtotal") == "1234.56"
    assert value(result, "tax") == "234.57"
    assert value(result, "total") == "1469.13"
    assert value(result, "vendor_tax_id") == "DE123456789"
    assert result["document"]["decimal_separator"] == ","


def test_french_labels_and_numbers() -> None:
    doc = page(
        ("Moreau Informatique SARL", (60, 40, 420, 80)),
        ("Facture N° F2025-311", (60, 150, 300, 170)),
        ("Date de facture : 5 mars 2025", (60, 180, 360, 200)),
        ("Échéance : 4 avril 2025", (60, 210, 300, 230)),
        ("Total HT", (600, 700, 700, 720)),
        ("12 500,00 €", (800, 700, 920, 720)),
        ("TVA 20 %", (600, 730, 700, 750)),
        ("2 500,00 €", (810, 730, 920, 750)),
        ("Total TTC", (600, 760, 700, 780)),
        ("15 000,00 €", (800, 760, 920, 780)),
    )
    result = extract_invoice(doc)
    assert value(result, "invoice_number") == "F2025-311"
    assert value(result, "invoice_date") == "2025-03-05"
    assert value(result, "due_date") == "2025-04-04"
    assert (value(result, "subtotal"), value(result, "tax"), value(result, "total")) == (
        "12500.00",
        "2500.00",
        "15000.00",
    )


@pytest.mark.parametrize(
    ("hint", "issued", "due"),
    [("en_US", "2025-03-04", "2025-04-05"), ("de_DE", "2025-04-03", "2025-05-04")],
)
def test_an_ambiguous_date_follows_the_vendors_locale(hint: str, issued: str, due: str) -> None:
    doc = page(
        ("Acme Parts Inc.", (60, 40, 300, 80)),
        ("Invoice Date: 03/04/2025", (600, 130, 900, 150)),
        ("Due Date: 04/05/2025", (600, 160, 900, 180)),
        ("Total: 100.00", (600, 700, 900, 720)),
    )
    result = extract_invoice(doc, locale=hint)
    assert (value(result, "invoice_date"), value(result, "due_date")) == (issued, due)
    assert result["document"]["date_order"] == ("MDY" if hint == "en_US" else "DMY")


def test_without_a_hint_the_document_decides_the_date_order() -> None:
    doc = page(
        ("Invoice Date: 03/04/2025", (600, 130, 900, 150)),
        ("Due Date: 04/17/2025", (600, 160, 900, 180)),  # 17 cannot be a month
        ("Total: $100.00", (600, 700, 900, 720)),
    )
    result = extract_invoice(doc)
    assert value(result, "invoice_date") == "2025-03-04"
    assert result["document"]["date_order"] == "MDY"


def test_line_items_by_column_alignment() -> None:
    doc = page(
        ("Acme Parts Inc.", (60, 40, 300, 80)),
        ("Invoice #: 1001", (600, 130, 900, 150)),
        ("Description", (60, 300, 180, 318)),
        ("Qty", (560, 300, 600, 318)),
        ("Unit Price", (680, 300, 780, 318)),
        ("Amount", (860, 300, 940, 318)),
        ("Laptop stand, aluminium", (60, 330, 300, 348)),
        ("2", (588, 330, 600, 348)),
        ("39.50", (730, 330, 780, 348)),
        ("79.00", (890, 330, 940, 348)),
        ("Support hours for the", (60, 360, 280, 378)),
        ("1.5", (570, 360, 600, 378)),
        ("80.00", (730, 360, 780, 378)),
        ("120.00", (880, 360, 940, 378)),
        ("migration project", (60, 380, 240, 398)),  # the description wraps
        ("Subtotal", (700, 430, 800, 448)),
        ("199.00", (880, 430, 940, 448)),
        ("Tax", (700, 460, 800, 478)),
        ("0.00", (900, 460, 940, 478)),
        ("Total", (700, 490, 800, 508)),
        ("$199.00", (870, 490, 940, 508)),
    )
    result = extract_invoice(doc)
    items = [
        (i["description"], i["quantity"], i["unit_price"], i["amount"])
        for i in result["line_items"]
    ]
    assert items == [
        ("Laptop stand, aluminium", "2", "39.50", "79.00"),
        ("Support hours for the migration project", "1.5", "80.00", "120.00"),
    ]
    assert all(i["confidence"] > 0.9 and i["page"] == 1 for i in result["line_items"])
    assert value(result, "subtotal") == "199.00" and value(result, "total") == "199.00"
    assert not [v for v in result["validation"] if v["severity"] == "error"]


def test_a_misread_quantity_is_put_right_and_flagged() -> None:
    doc = page(
        ("Description", (60, 300, 180, 318)),
        ("Menge", (540, 300, 600, 318)),
        ("Einzelpreis", (680, 300, 780, 318)),
        ("Betrag", (870, 300, 940, 318)),
        ("Datenmigration", (60, 330, 300, 348)),
        ("75", (580, 330, 600, 348)),  # printed 7,5: the OCR lost the comma
        ("646,23", (720, 330, 780, 348)),
        ("4.846,73", (860, 330, 940, 348)),
        ("Gesamtbetrag", (700, 430, 800, 448)),
        ("4.846,73 €", (850, 430, 940, 448)),
    )
    (item,) = extract_invoice(doc)["line_items"]
    assert item["quantity"] == "7.5"
    assert item["notes"] == ["quantity read again from the other two columns"]
    assert item["confidence"] < 0.9


def test_low_confidence_is_flagged_per_field() -> None:
    doc = Document.from_words(
        [
            ("Invoice No: 4711", (600, 130, 900, 150), 0.3),  # OCR was unsure
            ("Total: 99.00 EUR", (600, 700, 900, 720), 0.99),
        ],
        width=1000,
        height=1400,
    )
    result = extract_invoice(doc)
    number = result["fields"]["invoice_number"]
    assert number["value"] == "4711" and number["low_confidence"] is True
    assert result["fields"]["total"]["low_confidence"] is False
    flagged = [v for v in result["validation"] if v["code"] == "low_confidence"]
    assert [v["field"] for v in flagged] == ["invoice_number"]


def test_the_result_is_the_json_contract() -> None:
    doc = page(("Invoice No: 4711", (600, 130, 900, 150)), ("Total 10.00", (600, 700, 900, 720)))
    result = extract_invoice(doc)
    assert json.loads(json.dumps(result)) == result == result.model_dump()
    assert set(result) >= {"fields", "line_items", "validation"}
    assert list(result["fields"]) == list(FIELD_NAMES)
    for entry in result["fields"].values():
        assert set(entry) >= {"value", "confidence", "page", "bbox"}
    assert value(result, "iban") is None and result["fields"]["iban"]["bbox"] is None
    for issue in result["validation"]:
        assert set(issue) == {"code", "field", "message", "severity"}
    assert result.model.fields["total"].value == "10.00"


def test_the_public_api_is_pinned() -> None:
    assert flowdesk.documents.__all__ == sorted(flowdesk.documents.__all__)
    assert set(flowdesk.documents.__all__) == {
        "Checks",
        "DEFAULT_LIMITS",
        "Document",
        "Extraction",
        "FIELD_NAMES",
        "InvoiceExtraction",
        "InvoiceKey",
        "KnownInvoice",
        "Limits",
        "Page",
        "PurchaseOrder",
        "Segment",
        "Vendor",
        "Word",
        "extract_invoice",
        "load_document",
        "validate",
    }


def sample_truths(layouts: set[int]) -> list[dict[str, Any]]:
    truths = [json.loads(p.read_text("utf-8")) for p in sorted(DATA.glob("*.json"))]
    return [t for t in truths if t["layout"] in layouts]


def rows(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(i["description"], i["quantity"], i["unit_price"], i["amount"]) for i in items]


@pytest.mark.parametrize("truth", sample_truths({1, 2, 3, 4, 5, 6}), ids=lambda t: t["key"])
def test_sample_digital_pdfs_read_exactly(truth: dict[str, Any]) -> None:
    """Every field and line item of the sample PDFs of layouts 1-6."""
    result = extract_invoice(DATA / truth["files"]["pdf"])
    got = {name: value(result, name) for name in FIELD_NAMES}
    assert got == truth["fields"]
    assert rows(result["line_items"]) == rows(truth["line_items"])
    assert result["document"]["pages"] == truth["pages"]


def test_held_out_sample_pdfs_give_the_full_structure() -> None:
    for truth in sample_truths({7, 8}):
        result = extract_invoice(DATA / truth["files"]["pdf"])
        assert list(result["fields"]) == list(FIELD_NAMES)
        assert result["document"]["pages"] == truth["pages"]


def test_a_sample_scan() -> None:
    (truth,) = [t for t in sample_truths({1}) if "scan" in t["files"]]
    result = extract_invoice(DATA / truth["files"]["scan"])
    assert result["document"]["ocr_pages"] == truth["pages"]
    for name in ("invoice_number", "invoice_date", "due_date", "currency", "total", "iban"):
        assert value(result, name) == truth["fields"][name], name
    for name in FIELD_NAMES:
        assert 0.0 <= result["fields"][name]["confidence"] <= 1.0
