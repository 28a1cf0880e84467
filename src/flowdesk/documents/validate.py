"""Checks on an extracted invoice: arithmetic, dates, IBAN, duplicates, vendor, PO.

`validate(result)` returns a list of ``{code, field, message, severity}``. Three checks
need to know what the business already has; each is a callable passed in `Checks`:

* ``duplicates(key) -> known invoices``: the invoices already received from this vendor
  (``key`` names the vendor, number, date and amount; the callable may pre-filter). The
  invoice is a duplicate when one has the same number, or the same amount and date.
* ``vendors(name, tax_id) -> Vendor | None``: the vendor master. An unknown vendor is a
  warning; a known vendor whose IBAN differs from the invoice's is an error (a changed
  bank account is how invoice fraud is done).
* ``purchase_orders(po_number) -> PurchaseOrder | None``: the PO must exist, be in the
  same currency and its amount must match the invoice's within a tolerance.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from stdnum import iban as stdnum_iban

from flowdesk.documents import result as result_mod

Issue = dict[str, str | None]


@dataclass(frozen=True)
class InvoiceKey:
    """What identifies an invoice for the duplicate check."""

    vendor_name: str | None
    vendor_tax_id: str | None
    invoice_number: str | None
    invoice_date: date | None
    total: Decimal | None
    currency: str | None


@dataclass(frozen=True)
class KnownInvoice:
    """An invoice already received."""

    id: str
    invoice_number: str | None
    invoice_date: date | None
    total: Decimal | None
    currency: str | None = None


@dataclass(frozen=True)
class Vendor:
    """A vendor master record."""

    id: str
    name: str
    tax_id: str | None = None
    iban: str | None = None


@dataclass(frozen=True)
class PurchaseOrder:
    """An open purchase order."""

    number: str
    amount: Decimal
    currency: str | None = None
    vendor_id: str | None = None


DuplicateLookup = Callable[[InvoiceKey], Iterable[KnownInvoice]]
VendorLookup = Callable[[str | None, str | None], Vendor | None]
PurchaseOrderLookup = Callable[[str], PurchaseOrder | None]


@dataclass(frozen=True, kw_only=True)
class Checks:
    """What to check beyond the document itself, and how strictly.

    Attributes:
        duplicates, vendors, purchase_orders: the lookups (None: that check is skipped).
        amount_tolerance: the rounding allowed in sums (absolute, in the currency).
        po_tolerance: how far the invoice may be from its PO (share of the PO amount).
        max_age_days / max_future_days: the plausible window for the invoice date.
        max_payment_days: the longest plausible time from invoice date to due date.
        low_confidence: fields read with less confidence than this are flagged.
        today: the date to judge by (default: today, UTC).
    """

    duplicates: DuplicateLookup | None = None
    vendors: VendorLookup | None = None
    purchase_orders: PurchaseOrderLookup | None = None
    amount_tolerance: Decimal = Decimal("0.02")
    po_tolerance: Decimal = Decimal("0.05")
    max_age_days: int = 3 * 365
    max_future_days: int = 31
    max_payment_days: int = 366
    low_confidence: float = result_mod.LOW_CONFIDENCE
    today: date | None = None


REQUIRED = ("vendor_name", "invoice_number", "invoice_date", "total", "currency")


def issue(code: str, field: str | None, message: str, severity: str) -> Issue:
    return {"code": code, "field": field, "message": message, "severity": severity}


def _dec(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _date(value: Any) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        return None


def _norm_id(value: str | None) -> str:
    return re.sub(r"[^0-9A-Z]", "", (value or "").upper())


def _norm_name(value: str | None) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", (value or "").lower())).strip()


def validate(extraction: Mapping[str, Any], checks: Checks | None = None) -> list[Issue]:
    """Every finding on ``extraction`` (the dict `extract_invoice` returns)."""
    checks = checks or Checks()
    fields: Mapping[str, Any] = extraction.get("fields", {})

    def value(name: str) -> Any:
        entry = fields.get(name) or {}
        return entry.get("value")

    out: list[Issue] = []
    for name in result_mod.FIELD_NAMES:
        entry = fields.get(name) or {}
        if entry.get("value") is not None and entry.get("confidence", 0) < checks.low_confidence:
            out.append(
                issue(
                    "low_confidence",
                    name,
                    f"{name} was read as {entry['value']!r} with confidence "
                    f"{entry.get('confidence', 0):.2f}: have it confirmed",
                    "warning",
                )
            )
    for name in REQUIRED:
        if value(name) is None:
            out.append(issue("missing_field", name, f"no {name} was found", "warning"))
    out.extend(_arithmetic(extraction, checks))
    out.extend(_dates(value("invoice_date"), value("due_date"), checks))
    iban = value("iban")
    if iban is not None and not stdnum_iban.is_valid(iban):
        out.append(
            issue(
                "iban_invalid",
                "iban",
                f"IBAN {iban} fails its checksum: it was misread or mistyped",
                "error",
            )
        )
    key = InvoiceKey(
        vendor_name=value("vendor_name"),
        vendor_tax_id=value("vendor_tax_id"),
        invoice_number=value("invoice_number"),
        invoice_date=_date(value("invoice_date")),
        total=_dec(value("total")),
        currency=value("currency"),
    )
    if checks.duplicates is not None and (key.vendor_name or key.vendor_tax_id):
        out.extend(_duplicates(key, checks.duplicates(key)))
    if checks.vendors is not None:
        out.extend(_vendor(key, iban, checks.vendors))
    if checks.purchase_orders is not None:
        out.extend(_purchase_order(value("po_number"), key, _dec(value("subtotal")), checks))
    return out


def _arithmetic(extraction: Mapping[str, Any], checks: Checks) -> list[Issue]:
    out: list[Issue] = []
    tol = checks.amount_tolerance
    fields = extraction.get("fields", {})
    subtotal = _dec((fields.get("subtotal") or {}).get("value"))
    tax = _dec((fields.get("tax") or {}).get("value"))
    total = _dec((fields.get("total") or {}).get("value"))
    items = list(extraction.get("line_items") or [])
    for n, item in enumerate(items):
        q, p, a = _dec(item.get("quantity")), _dec(item.get("unit_price")), _dec(item.get("amount"))
        if q is not None and p is not None and a is not None and abs(q * p - a) > tol:
            out.append(
                issue(
                    "line_amount_mismatch",
                    f"line_items[{n}].amount",
                    f"line {n + 1}: {q} x {p} = {(q * p).quantize(Decimal('0.01'))}, "
                    f"but the line says {a}",
                    "warning",
                )
            )
    amounts = [_dec(i.get("amount")) for i in items]
    if items and all(a is not None for a in amounts):
        lines = sum((a for a in amounts if a is not None), Decimal("0"))
        target_name, target = ("subtotal", subtotal) if subtotal is not None else ("total", total)
        if target is not None and (subtotal is not None or not tax):
            line_tol = tol * max(1, len(items))
            if abs(lines - target) > line_tol:
                out.append(
                    issue(
                        "lines_sum_mismatch",
                        target_name,
                        f"the {len(items)} lines add up to {lines}, but the {target_name} "
                        f"is {target}",
                        "warning",
                    )
                )
    if subtotal is not None and total is not None:
        expected = subtotal + (tax or Decimal("0"))
        if abs(expected - total) > tol:
            out.append(
                issue(
                    "totals_mismatch",
                    "total",
                    f"subtotal {subtotal} + tax {tax or 0} = {expected}, but the total is {total}",
                    "error",
                )
            )
    return out


def _dates(invoice: Any, due: Any, checks: Checks) -> list[Issue]:
    out: list[Issue] = []
    today = checks.today or datetime.now(UTC).date()
    issued = _date(invoice)
    due_on = _date(due)
    if issued is not None:
        if issued > today + timedelta(days=checks.max_future_days):
            out.append(
                issue(
                    "date_in_future",
                    "invoice_date",
                    f"invoice date {issued} is in the future",
                    "error",
                )
            )
        elif issued < today - timedelta(days=checks.max_age_days):
            out.append(
                issue(
                    "date_too_old",
                    "invoice_date",
                    f"invoice date {issued} is more than {checks.max_age_days} days ago",
                    "warning",
                )
            )
    if issued is not None and due_on is not None:
        if due_on < issued:
            out.append(
                issue(
                    "due_before_issue",
                    "due_date",
                    f"due date {due_on} is before the invoice date {issued}",
                    "error",
                )
            )
        elif due_on > issued + timedelta(days=checks.max_payment_days):
            out.append(
                issue(
                    "due_date_far",
                    "due_date",
                    f"due date {due_on} is more than {checks.max_payment_days} days after "
                    f"the invoice date",
                    "warning",
                )
            )
    return out


def _duplicates(key: InvoiceKey, known: Iterable[KnownInvoice]) -> list[Issue]:
    out: list[Issue] = []
    number = _norm_id(key.invoice_number)
    for other in known:
        if number and _norm_id(other.invoice_number) == number:
            out.append(
                issue(
                    "duplicate_invoice",
                    "invoice_number",
                    f"invoice {key.invoice_number} from this vendor was already received "
                    f"({other.id})",
                    "error",
                )
            )
            break
        if (
            key.total is not None
            and other.total is not None
            and key.total == other.total
            and key.invoice_date is not None
            and key.invoice_date == other.invoice_date
        ):
            out.append(
                issue(
                    "possible_duplicate",
                    "total",
                    f"an invoice from this vendor for {key.total} dated {key.invoice_date} "
                    f"was already received ({other.id}) under another number",
                    "error",
                )
            )
            break
    return out


def _vendor(key: InvoiceKey, iban: str | None, lookup: VendorLookup) -> list[Issue]:
    vendor = lookup(key.vendor_name, key.vendor_tax_id)
    if vendor is None:
        return [
            issue(
                "unknown_vendor",
                "vendor_name",
                f"vendor {key.vendor_name!r} (tax id {key.vendor_tax_id or 'none'}) is not in "
                "the vendor master",
                "warning",
            )
        ]
    out: list[Issue] = []
    if vendor.iban and iban and _norm_id(vendor.iban) != _norm_id(iban):
        out.append(
            issue(
                "iban_changed",
                "iban",
                f"the invoice asks for payment to {iban}, but vendor {vendor.id} is paid to "
                f"{vendor.iban}: confirm the change with the vendor by phone",
                "error",
            )
        )
    if (
        vendor.tax_id
        and key.vendor_tax_id
        and _norm_id(vendor.tax_id) != _norm_id(key.vendor_tax_id)
    ):
        out.append(
            issue(
                "tax_id_mismatch",
                "vendor_tax_id",
                f"tax id {key.vendor_tax_id} differs from the vendor master's {vendor.tax_id}",
                "warning",
            )
        )
    return out


def _purchase_order(
    po_number: str | None, key: InvoiceKey, subtotal: Decimal | None, checks: Checks
) -> list[Issue]:
    assert checks.purchase_orders is not None
    if not po_number:
        return [issue("po_missing", "po_number", "the invoice names no purchase order", "info")]
    po = checks.purchase_orders(po_number)
    if po is None:
        return [
            issue(
                "po_not_found", "po_number", f"purchase order {po_number} does not exist", "error"
            )
        ]
    out: list[Issue] = []
    if po.currency and key.currency and po.currency != key.currency:
        out.append(
            issue(
                "po_currency_mismatch",
                "currency",
                f"purchase order {po.number} is in {po.currency}, the invoice in {key.currency}",
                "error",
            )
        )
    amounts = [a for a in (subtotal, key.total) if a is not None]
    limit = abs(po.amount) * checks.po_tolerance
    if amounts and not any(abs(a - po.amount) <= limit for a in amounts):
        shown = key.total if key.total is not None else subtotal
        out.append(
            issue(
                "po_amount_mismatch",
                "total",
                f"the invoice ({shown}) is more than {checks.po_tolerance * 100:.0f}% away "
                f"from purchase order {po.number} ({po.amount})",
                "warning",
            )
        )
    return out
