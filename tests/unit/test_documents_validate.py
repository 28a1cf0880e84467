"""Checks on extracted invoices: arithmetic with rounding tolerance, plausible dates, the
IBAN checksum, duplicates, the vendor master and purchase orders (pluggable lookups)."""

from __future__ import annotations

import copy
from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from flowdesk.documents import (
    Checks,
    InvoiceKey,
    KnownInvoice,
    PurchaseOrder,
    Vendor,
    validate,
)

TODAY = date(2025, 6, 1)


def invoice(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "vendor_name": "Northwind Supplies Ltd",
        "invoice_number": "INV-42",
        "invoice_date": "2025-05-20",
        "due_date": "2025-06-19",
        "currency": "EUR",
        "subtotal": "150.00",
        "tax": "28.50",
        "total": "178.50",
        "vendor_tax_id": "DE123456789",
        "po_number": "PO-7",
        "iban": "DE89370400440532013000",
    }
    base.update(fields)
    return {
        "fields": {
            name: {"value": v, "confidence": 0.95, "page": 1, "bbox": [0, 0, 1, 1]}
            for name, v in base.items()
        },
        "line_items": [
            {"description": "A", "quantity": "2", "unit_price": "50.00", "amount": "100.00"},
            {"description": "B", "quantity": "1", "unit_price": "50.00", "amount": "50.00"},
        ],
    }


def codes(extraction: dict[str, Any], checks: Checks | None = None) -> list[str]:
    return [issue["code"] for issue in validate(extraction, checks or Checks(today=TODAY))]


def test_a_consistent_invoice_passes() -> None:
    assert codes(invoice()) == []


def test_a_line_whose_amount_is_not_quantity_times_price() -> None:
    doc = invoice()
    doc["line_items"][0]["amount"] = "110.00"
    found = validate(doc, Checks(today=TODAY))
    assert [i["code"] for i in found] == ["line_amount_mismatch", "lines_sum_mismatch"]
    assert found[0]["field"] == "line_items[0].amount"
    assert "2 x 50.00 = 100.00" in found[0]["message"]


def test_lines_that_do_not_add_up_to_the_subtotal() -> None:
    assert codes(invoice(subtotal="160.00", total="188.50")) == ["lines_sum_mismatch"]


def test_subtotal_plus_tax_is_not_the_total() -> None:
    found = validate(invoice(total="180.00"), Checks(today=TODAY))
    assert [(i["code"], i["severity"]) for i in found] == [("totals_mismatch", "error")]


def test_rounding_within_the_tolerance_passes() -> None:
    assert codes(invoice(total="178.51")) == []
    assert codes(invoice(total="178.53")) == ["totals_mismatch"]
    assert (
        codes(invoice(total="178.53"), Checks(today=TODAY, amount_tolerance=Decimal("0.05"))) == []
    )


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"invoice_date": "2025-09-01", "due_date": "2025-10-01"}, "date_in_future"),
        ({"invoice_date": "2020-01-01", "due_date": "2020-02-01"}, "date_too_old"),
        ({"due_date": "2025-05-01"}, "due_before_issue"),
        ({"due_date": "2027-01-01"}, "due_date_far"),
    ],
)
def test_implausible_dates(fields: dict[str, str], code: str) -> None:
    assert codes(invoice(**fields)) == [code]


def test_an_iban_with_a_wrong_checksum() -> None:
    found = validate(invoice(iban="DE89370400440532013001"), Checks(today=TODAY))
    assert [(i["code"], i["field"], i["severity"]) for i in found] == [
        ("iban_invalid", "iban", "error")
    ]


def test_missing_required_fields_and_low_confidence() -> None:
    doc = invoice(invoice_number=None)
    doc["fields"]["total"]["confidence"] = 0.4
    assert codes(doc) == ["low_confidence", "missing_field"]


class Ledger:
    """The invoices already received, per vendor: a real in-memory store."""

    def __init__(self, known: list[KnownInvoice]) -> None:
        self.known = known
        self.asked: list[InvoiceKey] = []

    def __call__(self, key: InvoiceKey) -> list[KnownInvoice]:
        self.asked.append(key)
        return list(self.known)


def test_a_duplicate_by_vendor_and_number() -> None:
    ledger = Ledger([KnownInvoice("run-1", "inv 42", date(2025, 5, 1), Decimal("12.00"))])
    found = validate(invoice(), Checks(today=TODAY, duplicates=ledger))
    assert [(i["code"], i["severity"]) for i in found] == [("duplicate_invoice", "error")]
    assert "run-1" in found[0]["message"]
    (key,) = ledger.asked
    assert key.vendor_name == "Northwind Supplies Ltd" and key.total == Decimal("178.50")


def test_a_duplicate_by_vendor_amount_and_date() -> None:
    ledger = Ledger([KnownInvoice("run-2", "OTHER-9", date(2025, 5, 20), Decimal("178.50"))])
    assert codes(invoice(), Checks(today=TODAY, duplicates=ledger)) == ["possible_duplicate"]


def test_not_a_duplicate() -> None:
    ledger = Ledger([KnownInvoice("run-3", "INV-41", date(2025, 5, 20), Decimal("99.00"))])
    assert codes(invoice(), Checks(today=TODAY, duplicates=ledger)) == []


VENDORS = {
    "DE123456789": Vendor("v-1", "Northwind Supplies Ltd", "DE123456789", "DE89370400440532013000"),
}


def vendor_master(name: str | None, tax_id: str | None) -> Vendor | None:
    if tax_id in VENDORS:
        return VENDORS[tax_id]
    return next((v for v in VENDORS.values() if v.name == name), None)


def test_a_known_vendor_passes() -> None:
    assert codes(invoice(), Checks(today=TODAY, vendors=vendor_master)) == []


def test_an_unknown_vendor() -> None:
    doc = invoice(vendor_name="Stranger GmbH", vendor_tax_id="DE999999999")
    assert codes(doc, Checks(today=TODAY, vendors=vendor_master)) == ["unknown_vendor"]


def test_a_known_vendor_asking_to_be_paid_elsewhere() -> None:
    doc = invoice(iban="GB33BUKB20201555555555")
    found = validate(doc, Checks(today=TODAY, vendors=vendor_master))
    assert [(i["code"], i["severity"]) for i in found] == [("iban_changed", "error")]


ORDERS = {"PO-7": PurchaseOrder("PO-7", Decimal("150.00"), "EUR", "v-1")}


def test_the_purchase_order_matches() -> None:
    assert codes(invoice(), Checks(today=TODAY, purchase_orders=ORDERS.get)) == []


def test_a_purchase_order_that_does_not_exist() -> None:
    doc = invoice(po_number="PO-404")
    assert codes(doc, Checks(today=TODAY, purchase_orders=ORDERS.get)) == ["po_not_found"]


def test_an_invoice_far_from_its_purchase_order() -> None:
    doc = invoice(subtotal="300.00", tax="57.00", total="357.00")
    doc["line_items"][0].update(quantity="5", amount="250.00")
    checks = Checks(today=TODAY, purchase_orders=ORDERS.get)
    assert codes(doc, checks) == ["po_amount_mismatch"]
    generous = Checks(today=TODAY, purchase_orders=ORDERS.get, po_tolerance=Decimal("1.5"))
    assert codes(doc, generous) == []


def test_a_purchase_order_in_another_currency() -> None:
    doc = invoice(currency="USD")
    assert codes(doc, Checks(today=TODAY, purchase_orders=ORDERS.get)) == ["po_currency_mismatch"]


def test_validation_does_not_change_its_input() -> None:
    doc = invoice(total="999.00")
    before = copy.deepcopy(doc)
    validate(doc, Checks(today=TODAY, vendors=vendor_master, purchase_orders=ORDERS.get))
    assert doc == before
