"""The invoice assistant: documents in, ledger rows out, people only for the exceptions.

::

    erp = Erp(SqlConnector("erp", app, "sqlite:///erp.db"))
    await erp.create_tables()
    invoices = Invoices(app, Archive("documents"), erp)
    handle = await invoices.submit(pdf_bytes, "acme-0042.pdf")   # or a file drop, an e-mail

An invoice arrives three ways: `Invoices.submit` (what ``POST /invoices`` calls), a file
dropped in a folder that `Invoices.watch` watches, or an e-mail (`Invoices.submit_email`, a
raw RFC 822 message; ``.eml`` files in the watched folder too), each PDF or image attachment
of which becomes its own invoice. The bytes go into the content-addressed `Archive` first,
and the run is started with the idempotency key ``invoice:<sha256>``: the same file sent
twice, by any route, is one run.

Each run of ``invoices.process``:

1. **extract** (a step): read the document (text layer, or OCR for scans) and extract the
   fields with their confidence, page and box (`flowdesk.documents.extract_invoice`). A file
   that cannot be read (empty, damaged, encrypted, too large, not an invoice) is not a
   failure of the run: the reason is recorded and a person gets the review task;
2. **look up** (a step): the vendor master, the purchase order and the invoices already in
   the ledger from this vendor, from the ERP database;
3. **validate**: arithmetic, dates, IBAN checksum, duplicates, vendor and PO
   (`flowdesk.documents.validate`);
4. **risk**: ``ctx.model("invoice_risk", features)``, a local classifier through the gateway,
   trained on the sample decisions in ``data/invoices/risk.csv`` (`risk_features` says what it
   sees). Without a gateway or that task, the risk is "unknown" and the invoice goes to a
   person;
5. **decide** by `InvoicePolicy` (data, not code): auto-approve only a known vendor, a
   matching PO, a total under the threshold, every field read with high confidence, no
   validation error and a low risk; otherwise a review task (``invoices.review``) whose
   form (`InvoiceReview`) holds the extracted fields for correction, with the document and
   the reasons in its context;
6. **post** (a step) the approved invoice to the ERP table ``ap_invoices`` through the SQL
   connector, keyed by the step's idempotency key: a replayed post writes no second row;
7. **learn**: a person's corrections, and the decision as a risk label, are stored in
   ``invoice_corrections`` as labelled examples for retraining (`Erp.labelled_examples`);
8. **archive**: a JSON record of everything decided (fields, findings, risk, who decided and
   when, the ledger key) is written beside the document; every transition of the run is in
   the audit chain.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import email
import email.policy
import json
import multiprocessing
import os
import re
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from flowdesk import errors
from flowdesk.assistants import installed
from flowdesk.connectors import sql
from flowdesk.documents import archive as archive_mod
from flowdesk.documents.result import FIELD_NAMES
from flowdesk.engine import tasks
from flowdesk.engine.app import App, RunHandle
from flowdesk.engine.context import Context, current_step
from flowdesk.triggers import filedrop

__all__ = [
    "AP_INVOICES_DDL",
    "ERP_DDL",
    "CORRECTIONS_DDL",
    "Erp",
    "InvoicePolicy",
    "InvoiceReview",
    "Invoices",
    "PROCESS",
    "PURCHASE_ORDERS_DDL",
    "VENDORS_DDL",
    "risk_features",
]

PROCESS = "invoices.process"
EMAIL = "invoices.email"
RISK_TASK = "invoice_risk"
RISK_LABELS = ("low", "medium", "high")
HEADER_FIELDS = FIELD_NAMES
ATTACHMENT_TYPES = frozenset({"application/pdf", "image/png", "image/jpeg", "image/tiff"})
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_REREAD_CHARS = 12_000
REREAD_TASK = "invoice_reread"
REREAD_FIELDS = ("vendor_name", "invoice_number", "invoice_date", "currency", "total")

# -- the ERP tables ------------------------------------------------------------------------------
# Portable DDL (SQLite, PostgreSQL, MariaDB). Amounts are decimal strings' numeric values.
AP_INVOICES_DDL = (
    "CREATE TABLE IF NOT EXISTS ap_invoices ("
    " idempotency_key VARCHAR(200) PRIMARY KEY,"
    " ledger_key VARCHAR(300) NOT NULL UNIQUE,"
    " vendor_key VARCHAR(300) NOT NULL,"
    " document_id VARCHAR(64) NOT NULL,"
    " run_id VARCHAR(200) NOT NULL,"
    " vendor_id VARCHAR(100),"
    " vendor_name VARCHAR(300) NOT NULL,"
    " vendor_tax_id VARCHAR(50),"
    " invoice_number VARCHAR(100) NOT NULL,"
    " invoice_date DATE NOT NULL,"
    " due_date DATE,"
    " currency CHAR(3) NOT NULL,"
    " subtotal NUMERIC(18, 2),"
    " tax NUMERIC(18, 2),"
    " total NUMERIC(18, 2) NOT NULL,"
    " po_number VARCHAR(100),"
    " iban VARCHAR(40),"
    " approval VARCHAR(10) NOT NULL,"
    " approved_by VARCHAR(200))"
)
VENDORS_DDL = (
    "CREATE TABLE IF NOT EXISTS vendors ("
    " id VARCHAR(100) PRIMARY KEY,"
    " name VARCHAR(300) NOT NULL,"
    " tax_id VARCHAR(50),"
    " iban VARCHAR(40),"
    " locale VARCHAR(10),"
    " name_key VARCHAR(300) NOT NULL)"
)
PURCHASE_ORDERS_DDL = (
    "CREATE TABLE IF NOT EXISTS purchase_orders ("
    " number VARCHAR(100) PRIMARY KEY,"
    " vendor_id VARCHAR(100),"
    " amount NUMERIC(18, 2) NOT NULL,"
    " currency CHAR(3))"
)
CORRECTIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS invoice_corrections ("
    " idempotency_key VARCHAR(250) PRIMARY KEY,"
    " document_id VARCHAR(64) NOT NULL,"
    " run_id VARCHAR(200) NOT NULL,"
    " field VARCHAR(50) NOT NULL,"
    " extracted TEXT,"
    " corrected TEXT,"
    " page INTEGER,"
    " bbox VARCHAR(200),"
    " reviewer VARCHAR(200))"
)
"""One labelled example per row: a field a person corrected (``field`` is the field's name,
``extracted`` what was read, ``corrected`` the truth), or the risk label the decision
implies (``field = 'risk'``: ``extracted`` holds the model's features, ``corrected`` the
label)."""


ERP_DDL = (AP_INVOICES_DDL, VENDORS_DDL, PURCHASE_ORDERS_DDL, CORRECTIONS_DDL)
"""Every table the assistant uses in the ERP database (`Erp.create_tables`)."""


class ApRow(BaseModel):
    ledger_key: str = ""
    """One row per vendor and invoice number (`ledger_key`): filled in by `Erp.post`."""
    vendor_key: str = ""
    """The vendor's name as it is matched (`name_key`): filled in by `Erp.post`."""
    document_id: str
    run_id: str
    vendor_id: str | None
    vendor_name: str
    vendor_tax_id: str | None
    invoice_number: str
    invoice_date: date
    due_date: date | None
    currency: str
    subtotal: Decimal | None
    tax: Decimal | None
    total: Decimal
    po_number: str | None
    iban: str | None
    approval: Literal["auto", "review"]
    approved_by: str | None


class CorrectionRow(BaseModel):
    document_id: str
    run_id: str
    field: str
    extracted: str | None
    corrected: str | None
    page: int | None
    bbox: str | None
    reviewer: str | None


class _Nothing(BaseModel):
    pass


class _Name(BaseModel):
    name: str
    tax_id: str


class _Number(BaseModel):
    number: str


class _Vendor(BaseModel):
    vendor_name: str
    vendor_tax_id: str


class _VendorRow(BaseModel):
    id: str
    name: str
    tax_id: str | None
    iban: str | None
    locale: str | None
    name_key: str


class _PoRow(BaseModel):
    number: str
    amount: str
    currency: str
    vendor_id: str | None


_DELETE_VENDOR = sql.statement("remove_vendor", "DELETE FROM vendors WHERE id = :id", _VendorRow)
_ADD_VENDOR = sql.statement(
    "add_vendor",
    "INSERT INTO vendors (id, name, tax_id, iban, locale, name_key)"
    " VALUES (:id, :name, :tax_id, :iban, :locale, :name_key)",
    _VendorRow,
)
_DELETE_PO = sql.statement(
    "remove_purchase_order", "DELETE FROM purchase_orders WHERE number = :number", _PoRow
)
_ADD_PO = sql.statement(
    "add_purchase_order",
    "INSERT INTO purchase_orders (number, vendor_id, amount, currency)"
    " VALUES (:number, :vendor_id, :amount, :currency)",
    _PoRow,
)
_LEDGER = sql.statement(
    "ledger",
    "SELECT idempotency_key, document_id, run_id, vendor_id, vendor_name, vendor_tax_id,"
    " invoice_number, invoice_date, due_date, currency, subtotal, tax, total, po_number, iban,"
    " approval, approved_by FROM ap_invoices ORDER BY invoice_number, idempotency_key",
    _Nothing,
)


class _LedgerKey(BaseModel):
    ledger_key: str


_HOLDER = sql.statement(
    "find_ledger_row",
    "SELECT idempotency_key FROM ap_invoices WHERE ledger_key = :ledger_key",
    _LedgerKey,
)
_POST = sql.upsert("post_invoice", "ap_invoices", ApRow, on_conflict="ignore")
_CORRECT = sql.upsert("store_correction", "invoice_corrections", CorrectionRow)
_FIND_VENDOR = sql.statement(
    "find_vendor",
    "SELECT id, name, tax_id, iban, locale FROM vendors"
    " WHERE (tax_id IS NOT NULL AND tax_id = :tax_id) OR name_key = :name",
    _Name,
)
_FIND_PO = sql.statement(
    "find_purchase_order",
    "SELECT number, vendor_id, amount, currency FROM purchase_orders WHERE number = :number",
    _Number,
)
_KNOWN = sql.statement(
    "known_invoices",
    "SELECT idempotency_key, invoice_number, invoice_date, total, currency FROM ap_invoices"
    " WHERE vendor_key = :vendor_name"
    " OR (vendor_tax_id IS NOT NULL AND vendor_tax_id = :vendor_tax_id)",
    _Vendor,
)
_EXAMPLES = sql.statement(
    "labelled_examples",
    "SELECT document_id, run_id, field, extracted, corrected, page, bbox, reviewer"
    " FROM invoice_corrections ORDER BY document_id, field",
    _Nothing,
)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _compact(value: str | None) -> str:
    return re.sub(r"[\s.\-/]", "", value or "").upper()


def name_key(name: str | None) -> str:
    """A vendor name as it is matched: case and accents folded, spaces collapsed."""
    import unicodedata

    plain = unicodedata.normalize("NFKD", name or "")
    plain = "".join(c for c in plain if not unicodedata.combining(c))
    return " ".join(plain.casefold().split())


def ledger_key(tax_id: str | None, vendor_name: str | None, invoice_number: str | None) -> str:
    """What makes an invoice one in the ledger: the vendor (its tax id, else its name) and
    its number, both normalised."""
    vendor = _compact(tax_id) or name_key(vendor_name)
    return f"{vendor}|{_compact(invoice_number)}"


class Erp:
    """The ERP database the assistant reads masters from and posts invoices to."""

    def __init__(self, connector: sql.SqlConnector) -> None:
        self.connector = connector

    async def _call(self, op: Any, data: Any) -> Any:
        """Reads and master-data writes: inside a step they carry its idempotency key; the
        administrative calls made outside one (setting up, seeding) carry the operation's
        name instead."""
        step = current_step()
        key = step.idempotency_key if step is not None else f"erp-admin:{op.name}"
        return await self.connector.call(op, data, idempotency_key=key)

    async def create_tables(self) -> None:
        """Create the four tables when they are missing (a real ERP has its own)."""
        for ddl in ERP_DDL:
            op = sql.statement("create_table", ddl, _Nothing)
            await self._call(op, {})

    async def lookups(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The vendor master record, the purchase order and the invoices already posted that
        ``fields`` (extracted values) point at, as plain JSON."""
        name = name_key(str(fields.get("vendor_name") or ""))
        tax_id = _compact(_text(fields.get("vendor_tax_id")))
        vendor = None
        if name or tax_id:
            rows = (await self._call(_FIND_VENDOR, _Name(name=name, tax_id=tax_id))).rows
            by_tax = [r for r in rows if tax_id and _compact(r["tax_id"]) == tax_id]
            chosen = by_tax or rows
            vendor = chosen[0] if chosen else None
        po = None
        po_number = _text(fields.get("po_number"))
        if po_number:
            found = (await self._call(_FIND_PO, _Number(number=po_number))).rows
            po = found[0] if found else None
        known: list[dict[str, Any]] = []
        if name or tax_id:
            probe = _Vendor(vendor_name=name, vendor_tax_id=tax_id)
            known = (await self._call(_KNOWN, probe)).rows
        return {
            "vendor": _jsonable(vendor),
            "purchase_order": _jsonable(po),
            "known": [_jsonable(k) for k in known],
        }

    async def add_vendor(
        self,
        vendor_id: str,
        name: str,
        *,
        tax_id: str | None = None,
        iban: str | None = None,
        locale: str | None = None,
    ) -> None:
        """Put a vendor in the vendor master (replacing one with the same id)."""
        row = _VendorRow(
            id=vendor_id,
            name=name,
            tax_id=_compact(tax_id) or None,
            iban=_compact(iban) or None,
            locale=locale,
            name_key=name_key(name),
        )
        await self._call(_DELETE_VENDOR, row)
        await self._call(_ADD_VENDOR, row)

    async def add_purchase_order(
        self, number: str, amount: Decimal, currency: str, vendor_id: str | None = None
    ) -> None:
        """Open a purchase order (replacing one with the same number)."""
        row = _PoRow(number=number, amount=str(amount), currency=currency, vendor_id=vendor_id)
        await self._call(_DELETE_PO, row)
        await self._call(_ADD_PO, row)

    async def ledger(self) -> list[dict[str, Any]]:
        """Every row of ``ap_invoices`` (for reports and tests)."""
        rows = (await self._call(_LEDGER, {})).rows
        return [r for r in (_jsonable(x) for x in rows) if r is not None]

    async def post(self, row: ApRow, key: str) -> dict[str, Any]:
        """Write ``row`` under ``key`` (the posting step's idempotency key), once.

        Returns ``{"idempotency_key", "inserted"}``, plus ``duplicate_of`` (the key of the
        row already there) when the ledger holds this vendor's invoice number from another
        post: the table's unique ``ledger_key`` makes that hold even for two copies of one
        invoice posted at the same moment."""
        ledger = ledger_key(row.vendor_tax_id, row.vendor_name, row.invoice_number)
        holder = await self._holder(ledger)
        if holder is None:
            try:
                keyed = row.model_copy(
                    update={
                        "ledger_key": ledger,
                        "vendor_key": name_key(row.vendor_name),
                        "vendor_tax_id": _compact(row.vendor_tax_id) or None,
                    }
                )
                written = await self.connector.call(_POST, keyed, idempotency_key=key)
            except errors.ConnectorRejected:
                holder = await self._holder(ledger)
                if holder is None or holder == key:
                    raise
            else:
                return {"idempotency_key": key, "inserted": written.inserted}
        if holder == key:
            return {"idempotency_key": key, "inserted": False}
        return {"idempotency_key": key, "inserted": False, "duplicate_of": holder}

    async def _holder(self, ledger: str) -> str | None:
        found: sql.SqlResult = await self._call(_HOLDER, _LedgerKey(ledger_key=ledger))
        return str(found.rows[0]["idempotency_key"]) if found.rows else None

    async def correct(self, row: CorrectionRow, key: str) -> sql.UpsertResult:
        return await self.connector.call(_CORRECT, row, idempotency_key=key)

    async def labelled_examples(self) -> list[dict[str, Any]]:
        """Every stored correction and risk label (see `CORRECTIONS_DDL`)."""
        found: sql.SqlResult = await self._call(_EXAMPLES, {})
        return found.rows


def _jsonable(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: (str(v) if isinstance(v, Decimal | date) else v) for k, v in row.items()}


# -- policy, form, features -------------------------------------------------------------------
class InvoicePolicy(BaseModel):
    """When an invoice may be approved without a person (every condition must hold)."""

    model_config = ConfigDict(extra="forbid")

    max_total: Decimal = Field(default=Decimal("10000"), ge=0)
    """Totals at or above this go to a person (in the invoice's currency)."""
    min_field_confidence: float = Field(default=0.8, ge=0, le=1)
    """Every required field must have been read at least this surely."""
    require_known_vendor: bool = True
    require_po: bool = True
    """The invoice must name an existing PO whose amount it matches."""
    max_risk: Literal["low", "medium", "high"] = "low"
    min_risk_confidence: float = Field(default=0.6, ge=0, le=1)
    currencies: list[str] = Field(default_factory=list)
    """Currencies that may be auto-approved (empty: any)."""

    @classmethod
    def from_toml(cls, path: str | Path) -> InvoicePolicy:
        import tomllib

        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            return cls.model_validate(data.get("policy", data))
        except (OSError, tomllib.TOMLDecodeError, pydantic.ValidationError) as exc:
            raise errors.ConfigurationError(f"invoice policy {path}: {exc}") from None


_AMOUNT = r"^-?\d{1,15}(\.\d{1,4})?$"


class InvoiceReview(BaseModel):
    """What the reviewer decides: the fields as they should be, and approve or reject."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    vendor_name: str | None = Field(default=None, max_length=300)
    vendor_tax_id: str | None = Field(default=None, max_length=50)
    invoice_number: str | None = Field(default=None, max_length=100)
    invoice_date: date | None = None
    due_date: date | None = None
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    subtotal: str | None = Field(default=None, pattern=_AMOUNT)
    tax: str | None = Field(default=None, pattern=_AMOUNT)
    total: str | None = Field(default=None, pattern=_AMOUNT)
    po_number: str | None = Field(default=None, max_length=100)
    iban: str | None = Field(default=None, max_length=40)
    comment: str = Field(default="", max_length=4000)

    @pydantic.model_validator(mode="after")
    def _approvable(self) -> InvoiceReview:
        if self.decision == "approve":
            missing = [
                name
                for name in ("vendor_name", "invoice_number", "invoice_date", "currency", "total")
                if getattr(self, name) in (None, "")
            ]
            if missing:
                raise ValueError(f"to approve, fill in: {', '.join(missing)}")
        return self


def _amount_band(total: Decimal | None) -> str:
    if total is None:
        return "amount_unknown"
    for limit, band in ((1000, "lt_1k"), (10_000, "1k_10k"), (50_000, "10k_50k")):
        if total < limit:
            return f"amount_{band}"
    return "amount_ge_50k"


def risk_features(
    fields: Mapping[str, Any], findings: Sequence[Mapping[str, Any]], lookups: Mapping[str, Any]
) -> str:
    """The risk model's input: one token per fact, e.g. ``vendor_known iban_changed
    po_match sums_ok dates_ok no_duplicate amount_1k_10k conf_high history_some``."""
    codes = {str(f.get("code")) for f in findings}
    values = {k: (v or {}).get("value") for k, v in fields.items()}
    confidences = [
        float((fields.get(k) or {}).get("confidence") or 0.0)
        for k in ("vendor_name", "invoice_number", "invoice_date", "total")
    ]
    lowest = min(confidences) if confidences else 0.0
    tokens = [
        "vendor_known" if lookups.get("vendor") else "vendor_unknown",
        "iban_changed"
        if "iban_changed" in codes
        else "iban_invalid"
        if "iban_invalid" in codes
        else "iban_missing"
        if not values.get("iban")
        else "iban_ok",
        "po_none"
        if not values.get("po_number")
        else "po_not_found"
        if "po_not_found" in codes
        else "po_mismatch"
        if codes & {"po_amount_mismatch", "po_currency_mismatch"}
        else "po_match",
        "sums_off"
        if codes & {"totals_mismatch", "lines_sum_mismatch", "line_amount_mismatch"}
        else "sums_ok",
        "dates_odd"
        if codes & {"date_in_future", "date_too_old", "due_before_issue", "due_date_far"}
        else "dates_ok",
        "duplicate" if codes & {"duplicate_invoice", "possible_duplicate"} else "no_duplicate",
        _amount_band(_decimal(values.get("total"))),
        "conf_high" if lowest >= 0.85 else "conf_mid" if lowest >= 0.6 else "conf_low",
        "history_some" if lookups.get("known") else "history_none",
    ]
    return " ".join(tokens)


def _decimal(value: Any) -> Decimal | None:
    if value in (None, ""):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


@dataclass(frozen=True)
class Decision:
    auto: bool
    reasons: list[str]


def decide(
    policy: InvoicePolicy,
    fields: Mapping[str, Any],
    findings: Sequence[Mapping[str, Any]],
    lookups: Mapping[str, Any],
    risk: Mapping[str, Any],
) -> Decision:
    """Apply ``policy``; ``reasons`` says, in words, every condition that failed."""
    reasons: list[str] = []
    values = {k: (v or {}).get("value") for k, v in fields.items()}
    for f in findings:
        if f.get("severity") == "error":
            reasons.append(str(f.get("message")))
    if policy.require_known_vendor and not lookups.get("vendor"):
        reasons.append(f"vendor {values.get('vendor_name')!r} is not in the vendor master")
    if policy.require_po:
        po = lookups.get("purchase_order")
        mismatch = any(
            f.get("code") in ("po_amount_mismatch", "po_currency_mismatch") for f in findings
        )
        if not values.get("po_number"):
            reasons.append("the invoice names no purchase order")
        elif po is None and not any(f.get("code") == "po_not_found" for f in findings):
            reasons.append(f"purchase order {values.get('po_number')} does not exist")
        elif mismatch and not any("purchase order" in r for r in reasons):
            reasons.append(f"the amount does not match purchase order {values.get('po_number')}")
    total = _decimal(values.get("total"))
    if total is None:
        reasons.append("no total was read")
    elif total >= policy.max_total:
        reasons.append(f"total {total} is at or above the auto-approval limit {policy.max_total}")
    currency = values.get("currency")
    if policy.currencies and currency not in policy.currencies:
        reasons.append(f"currency {currency} is not auto-approved")
    unsure = [
        name
        for name in ("vendor_name", "invoice_number", "invoice_date", "currency", "total")
        if float((fields.get(name) or {}).get("confidence") or 0.0) < policy.min_field_confidence
    ]
    if unsure:
        reasons.append(f"read with low confidence: {', '.join(unsure)}")
    label = risk.get("label")
    if label is None:
        reasons.append(f"no risk assessment: {risk.get('error', 'the risk model did not answer')}")
    else:
        confidence = float(risk.get("confidence") or 0.0)
        if RISK_LABELS.index(str(label)) > RISK_LABELS.index(policy.max_risk):
            reasons.append(f"the risk model rates it {label} ({confidence:.0%})")
        elif confidence < policy.min_risk_confidence:
            reasons.append(f"the risk model is unsure ({label}, {confidence:.0%})")
    return Decision(auto=not reasons, reasons=reasons)


# -- the assistant ---------------------------------------------------------------------------------
class InvoiceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    document_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = Field(min_length=1, max_length=300)
    source: Literal["api", "folder", "email"] = "api"
    locale: str | None = Field(default=None, pattern=r"^[a-z]{2}(_[A-Z]{2})?$")
    submitted_by: str | None = None


class EmailIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    name: str


def attachments(raw: bytes) -> list[tuple[str, bytes]]:
    """The PDF and image attachments of an RFC 822 message: ``[(file name, bytes)]``.
    Raises `DocumentError` for bytes that are not a message with at least one."""
    try:
        message = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception as exc:  # the parser's errors are not one class
        raise errors.DocumentError(f"not a readable e-mail message: {exc}") from None
    found: list[tuple[str, bytes]] = []
    for number, part in enumerate(message.walk()):
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        name = part.get_filename() or f"attachment-{number}"
        if kind == "application/octet-stream":
            kind = archive_mod.MEDIA_TYPES.get(Path(name).suffix.lower(), kind)
        if kind not in ATTACHMENT_TYPES:
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and payload:
            found.append((Path(name).name, payload))
    if not found and not message.keys():
        raise errors.DocumentError("not an e-mail message (no headers)")
    return found


class Invoices:
    """Registers the invoice assistant's workflows and steps on ``app``."""

    def __init__(
        self,
        app: App,
        archive: archive_mod.Archive,
        erp: Erp,
        *,
        policy: InvoicePolicy | None = None,
        risk_task: str = RISK_TASK,
        reread_task: str = REREAD_TASK,
        reviewers: tasks.Assignees | None = None,
        review_due: timedelta = timedelta(days=2),
        escalate_to: Sequence[str] = (),
        locale: str | None = None,
        reader_processes: int = 1,
    ) -> None:
        self.app = app
        self.archive = archive
        self.reader_processes = reader_processes
        self.erp = erp
        self.policy = policy or InvoicePolicy()
        self.risk_task = risk_task
        self.reread_task = reread_task
        self.reviewers = reviewers or tasks.Assignees(groups=["ap"])
        self.review_due = review_due
        self.escalate_to = list(escalate_to)
        self.locale = locale
        self.records = archive.root / "records"
        self._register()
        installed.of(app).invoices = self

    # -- intake ---------------------------------------------------------------------------------
    async def submit(
        self,
        data: bytes,
        name: str,
        *,
        source: Literal["api", "folder", "email"] = "api",
        locale: str | None = None,
        submitted_by: str | None = None,
    ) -> RunHandle:
        """Archive ``data`` and start its run (the same bytes again: the same run)."""
        if len(data) > MAX_FILE_BYTES:
            raise errors.DocumentError(
                f"{name}: {len(data)} bytes is over the {MAX_FILE_BYTES} byte limit"
            )
        doc_id = await asyncio.to_thread(self.archive.put, data)
        payload = InvoiceIn(
            document_id=doc_id,
            name=Path(name).name or "invoice",
            source=source,
            locale=locale or self.locale,
            submitted_by=submitted_by,
        )
        try:
            return await self.app.start(
                PROCESS, payload.model_dump(), idempotency_key=f"invoice:{doc_id}"
            )
        except errors.IdempotencyConflict as exc:
            # The same document, received before under another name or by another route:
            # it is the same invoice, so the answer is the run it started then.
            if exc.run_id is None:
                raise
            return RunHandle(id=exc.run_id, workflow=PROCESS, created=False, app=self.app)

    async def submit_email(self, raw: bytes) -> list[RunHandle]:
        """One run per PDF or image attachment of the e-mail ``raw``."""
        found = attachments(raw)
        if not found:
            raise errors.DocumentError("the e-mail has no PDF or image attachment")
        return [await self.submit(data, name, source="email") for name, data in found]

    def watch(self, folder: str | Path, **options: Any) -> filedrop.FileDrop:
        """A `FileDrop` on ``folder``: every file dropped there is an invoice (``.eml``
        files are e-mails: each attachment is one). Call ``run()`` on it."""
        return filedrop.FileDrop(
            self.app,
            folder,
            workflow=EMAIL,
            to_input=lambda f: EmailIn(path=f.path, name=f.name).model_dump(),
            **options,
        )

    # -- the workflow ------------------------------------------------------------------------
    def _register(self) -> None:
        app = self.app
        counted = app.metrics.counter(
            "invoices_total",
            "Invoices decided, by outcome (approved, rejected, duplicate) and route (auto: by "
            "policy; review: by a person). Exception fraction: the review share of the total.",
            ["outcome", "route"],
        )
        auto_approved = app.metrics.counter(
            "invoices_auto_approved_total", "Invoices approved by policy, without a person"
        )
        exceptions = app.metrics.counter(
            "invoices_exceptions_total",
            "Invoices handed to a person, by the first reason's kind",
            ["kind"],
        )
        resolution = app.metrics.histogram(
            "invoices_time_to_resolution_seconds",
            "From the invoice's arrival to its decision (posted, rejected or a duplicate)",
            ["route"],
        )

        @app.step(name="invoices.intake_file")
        async def intake_file(path: str, name: str) -> list[dict[str, Any]]:
            data = await asyncio.to_thread(Path(path).read_bytes)
            if name.lower().endswith(".eml") or data[:200].lstrip().lower().startswith(
                (b"from:", b"received:", b"return-path:", b"mime-version:", b"message-id:")
            ):
                found = attachments(data)
                if not found:
                    raise errors.Permanent("the e-mail has no PDF or image attachment")
                source: Literal["folder", "email"] = "email"
            else:
                found, source = [(name, data)], "folder"
            started = []
            for file_name, content in found:
                handle = await self.submit(content, file_name, source=source)
                started.append({"name": file_name, "run_id": handle.id, "created": handle.created})
            return started

        @app.workflow(EMAIL)
        async def intake(ctx: Context, path: str, name: str) -> dict[str, Any]:
            """A dropped file or e-mail: starts one invoice run per document in it."""
            return {"started": await ctx.step(intake_file, path, name)}

        @app.step(name="invoices.extract")
        async def extract(document_id: str, locale: str | None) -> dict[str, Any]:
            return await self._extract(document_id, locale)

        @app.step(name="invoices.lookups")
        async def lookups(fields: dict[str, Any]) -> dict[str, Any]:
            return await self.erp.lookups({k: (v or {}).get("value") for k, v in fields.items()})

        @app.step(name="invoices.validate")
        def check(extraction: dict[str, Any], found: dict[str, Any]) -> list[dict[str, Any]]:
            return _validate(extraction, found)

        @app.step(name="invoices.post", retries=5, retry_delay=0.5)
        async def post(row: dict[str, Any]) -> dict[str, Any]:
            info = current_step()
            assert info is not None
            return await self.erp.post(ApRow.model_validate(row), info.idempotency_key)

        @app.step(name="invoices.learn")
        async def learn(rows: list[dict[str, Any]]) -> int:
            info = current_step()
            assert info is not None
            for row in rows:
                key = f"{info.idempotency_key}:{row['field']}"
                await self.erp.correct(CorrectionRow.model_validate(row), key)
            return len(rows)

        @app.step(name="invoices.reviewer")
        async def reviewer(task_id: str) -> dict[str, Any]:
            task = await app.store.get_task(task_id)
            if task is None:
                raise errors.TaskNotFound(task_id)
            at = task.completed_at
            return {"by": task.completed_by, "at": None if at is None else at.isoformat()}

        @app.step(name="invoices.archive")
        async def archive_record(run_id: str, record: dict[str, Any]) -> str:
            return await asyncio.to_thread(self._write_record, run_id, record)

        @app.workflow(PROCESS)
        async def process(
            ctx: Context,
            document_id: str,
            name: str,
            source: str = "api",
            locale: str | None = None,
            submitted_by: str | None = None,
        ) -> dict[str, Any]:
            arrived = ctx.now()
            read: dict[str, Any] = await ctx.step(extract, document_id, locale)
            record: dict[str, Any] = {
                "document_id": document_id,
                "name": name,
                "source": source,
                "submitted_by": submitted_by,
            }
            if "error" in read:
                fields: dict[str, Any] = {k: None for k in HEADER_FIELDS}
                findings = [
                    {
                        "code": "unreadable",
                        "field": None,
                        "message": read["error"],
                        "severity": "error",
                    }
                ]
                found: dict[str, Any] = {"vendor": None, "purchase_order": None, "known": []}
                risk: dict[str, Any] = {"error": "the document could not be read"}
                extraction: dict[str, Any] = {"fields": fields, "line_items": []}
            else:
                extraction = read["extraction"]
                reread = await self._reread(ctx, read, document_id)
                if reread is not None:
                    record["reread"] = reread
                    extraction = {**extraction, "fields": reread["fields"]}
                fields = extraction["fields"]
                found = await ctx.step(lookups, fields)
                findings = await ctx.step(check, extraction, found)
                risk = await self._risk(ctx, fields, findings, found, document_id)
            decision = (
                Decision(auto=False, reasons=[str(read["error"])])
                if "error" in read
                else decide(self.policy, fields, findings, found, risk)
            )
            record.update(
                timing=read.get("timing"),
                fields={k: (v or {}).get("value") for k, v in fields.items()},
                line_items=extraction.get("line_items", []),
                validation=findings,
                vendor=found.get("vendor"),
                purchase_order=found.get("purchase_order"),
                risk=risk,
                reasons=decision.reasons,
            )
            values = {k: (v or {}).get("value") for k, v in fields.items()}
            if not decision.auto:
                kind = "unreadable" if "error" in read else _reason_kind(decision.reasons)
                ctx.metric(exceptions, 1, kind=kind)
            if decision.auto:
                outcome, approved_by = "approved", None
                final = values
                record.update(decision={"by": "policy", "outcome": "approved", "auto": True})
            else:
                task_seq = ctx.position[0] + 1
                review = await ctx.human_task(
                    "invoices.review",
                    title=_title(name, values),
                    form=InvoiceReview,
                    context=self._review_context(document_id, name, read, fields, decision, risk),
                    candidates=self.reviewers,
                    due=self.review_due,
                    priority=1 if risk.get("label") == "high" else 0,
                    labels=["invoice", str(risk.get("label") or "unknown")],
                    escalation=(
                        tasks.Escalation.reassign(
                            users=self.escalate_to, reason="invoice review overdue"
                        )
                        if self.escalate_to
                        else None
                    ),
                )
                who: dict[str, Any] = await ctx.step(reviewer, f"{ctx.run_id}-t{task_seq}")
                answer = review.model_dump(mode="json")
                corrections = _corrections(document_id, ctx.run_id, fields, answer, who["by"])
                label = "high" if review.decision == "reject" else "low"
                if "features" in risk:
                    corrections.append(
                        CorrectionRow(
                            document_id=document_id,
                            run_id=ctx.run_id,
                            field="risk",
                            extracted=risk["features"],
                            corrected=label,
                            page=None,
                            bbox=None,
                            reviewer=who["by"],
                        ).model_dump()
                    )
                learned: int = 0
                if corrections:
                    learned = await ctx.step(learn, corrections)
                record.update(
                    decision={
                        "by": who["by"],
                        "at": who["at"],
                        "outcome": "approved" if review.decision == "approve" else "rejected",
                        "auto": False,
                        "comment": review.comment,
                    },
                    corrections=[c for c in corrections if c["field"] != "risk"],
                    labelled_examples=learned,
                )
                if review.decision == "reject":
                    outcome, approved_by, final = "rejected", who["by"], {}
                else:
                    outcome, approved_by = "approved", who["by"]
                    final = {k: answer.get(k) for k in HEADER_FIELDS}
            if outcome == "approved":
                row = ApRow.model_validate(
                    {
                        "document_id": document_id,
                        "run_id": ctx.run_id,
                        "vendor_id": (found.get("vendor") or {}).get("id"),
                        "vendor_name": str(final["vendor_name"]),
                        "vendor_tax_id": final.get("vendor_tax_id"),
                        "invoice_number": str(final["invoice_number"]),
                        "invoice_date": final["invoice_date"],
                        "due_date": final.get("due_date"),
                        "currency": str(final["currency"]),
                        "subtotal": _decimal(final.get("subtotal")),
                        "tax": _decimal(final.get("tax")),
                        "total": _decimal(final["total"]) or Decimal(0),
                        "po_number": final.get("po_number"),
                        "iban": final.get("iban"),
                        "approval": "auto" if approved_by is None else "review",
                        "approved_by": approved_by,
                    }
                )
                posted: dict[str, Any] = await ctx.step(post, row.model_dump(mode="json"))
                record["ledger"] = posted
                if "duplicate_of" in posted:
                    outcome = "duplicate"
                    record["reasons"] = [
                        *record["reasons"],
                        f"invoice {row.invoice_number} from {row.vendor_name} is already in the "
                        f"ledger (posted under {posted['duplicate_of']}): not posted again",
                    ]
            record["outcome"] = outcome
            route = "auto" if decision.auto else "review"
            ctx.metric(counted, 1, outcome=outcome, route=route)
            if outcome == "approved" and decision.auto:
                ctx.metric(auto_approved)
            ctx.metric(resolution, (ctx.now() - arrived).total_seconds(), route=route)
            record["archived"] = await ctx.step(archive_record, ctx.run_id, record)
            return record

    async def _risk(
        self,
        ctx: Context,
        fields: dict[str, Any],
        findings: list[dict[str, Any]],
        found: dict[str, Any],
        document_id: str,
    ) -> dict[str, Any]:
        features = risk_features(fields, findings, found)
        if self.app.gateway is None:
            return {"features": features, "error": "no model gateway is configured"}
        try:
            answer = await ctx.model(self.risk_task, features, data="confidential", key=document_id)
        except errors.StepFailed as exc:
            return {"features": features, "error": f"{exc.error_type}: {exc.message}"}
        label = answer.label if answer.label in RISK_LABELS else None
        return {
            "features": features,
            "label": label,
            "confidence": answer.confidence,
            "model": f"{answer.model}:{answer.version}",
            **({} if label else {"error": f"the model answered {answer.label!r}"}),
        }

    async def _reread(
        self, ctx: Context, read: Mapping[str, Any], document_id: str
    ) -> dict[str, Any] | None:
        """Fields read with less confidence than the policy asks for get a second reading
        from the gateway's ``reread_task`` (a language model route), when one is configured.

        The model sees the document's text and answers a JSON object. A value it gives counts
        only when the document's text holds it (a model cannot invent a vendor or a
        number), and the date, amount and currency parse: a value the model confirms gets
        confidence 0.9; a different or new one replaces the reading with confidence 0.7,
        still below the auto-approval bar, so a person checks it with the suggestion filled
        in. Without such a route, or when the model fails, nothing changes."""
        fields: dict[str, Any] = read["extraction"]["fields"]
        unsure = [
            name
            for name in REREAD_FIELDS
            if float((fields.get(name) or {}).get("confidence") or 0.0)
            < self.policy.min_field_confidence
        ]
        if not unsure or not _gateway_has(self.app.gateway, self.reread_task):
            return None
        prompt = (
            "Read the invoice below and answer with one JSON object and nothing else, with "
            f"these keys: {', '.join(unsure)}. Use null for a value the invoice does not "
            "show. Dates as YYYY-MM-DD, amounts as plain decimals (1234.56), the currency as "
            "an ISO 4217 code.\n\nINVOICE:\n" + str(read.get("text") or "")
        )
        try:
            answer = await ctx.model(
                self.reread_task, prompt, data="internal", key=document_id, max_tokens=300
            )
        except errors.StepFailed as exc:
            return {"asked": unsure, "error": f"{exc.error_type}: {exc.message}", "fields": fields}
        said = _json_object(str(answer.text or ""))
        text = str(read.get("text") or "")
        changed: dict[str, Any] = {}
        out = dict(fields)
        for name in unsure:
            value = _checked_value(name, said.get(name), text)
            if value is None:
                continue
            before = dict(fields.get(name) or {})
            confirmed = _same(before.get("value"), value)
            out[name] = {
                **before,
                "value": value,
                "confidence": max(0.9, float(before.get("confidence") or 0.0))
                if confirmed
                else 0.7,
                "source": "model",
            }
            changed[name] = {"was": before.get("value"), "now": value, "confirmed": confirmed}
        return {"asked": unsure, "model": f"{answer.model}:{answer.version}", "changed": changed,
                "fields": out}  # fmt: skip

    async def _extract(self, document_id: str, locale: str | None) -> dict[str, Any]:
        """Read the document in a reader process (`read_invoice`), so OCR and parsing never
        hold this process's interpreter: the API and the other runs stay responsive. A reader
        that dies on a file (killed, out of memory) is replaced, and the file is tried once
        more before it is called unreadable."""
        try:
            path = str(self.archive.path(document_id))
        except archive_mod.UnknownDocument as exc:
            return {"error": str(exc)}
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = reader_pool(self.reader_processes)
            try:
                return await loop.run_in_executor(pool, read_invoice, path, locale)
            except concurrent.futures.process.BrokenProcessPool:
                drop_reader_pool(pool)
                if attempt == 2:
                    return {
                        "error": "the document reader stopped while reading this file "
                        "(killed, or out of memory), twice"
                    }
        raise AssertionError("unreachable")

    def _review_context(
        self,
        document_id: str,
        name: str,
        read: Mapping[str, Any],
        fields: Mapping[str, Any],
        decision: Decision,
        risk: Mapping[str, Any],
    ) -> dict[str, Any]:
        values = {k: (v or {}).get("value") for k, v in fields.items()}
        label = risk.get("label")
        return {
            "summary": _title(name, values),
            "reasons": decision.reasons,
            "suggestion": {
                "decision": "reject" if label == "high" else "review",
                "risk": label or "unknown",
                "confidence": float(risk.get("confidence") or 0.0),
            },
            "document": {
                "id": document_id,
                "name": name,
                "media_type": self.archive.media_type(document_id),
                "pages": list(read.get("pages") or []),
            },
            "fields": {
                k: {
                    "value": (v or {}).get("value"),
                    "confidence": float((v or {}).get("confidence") or 0.0),
                    "page": (v or {}).get("page"),
                    "bbox": (v or {}).get("bbox"),
                }
                for k, v in fields.items()
            },
            "line_items": (read.get("extraction") or {}).get("line_items", []),
        }

    def _write_record(self, run_id: str, record: Mapping[str, Any]) -> str:
        self.records.mkdir(parents=True, exist_ok=True)
        target = self.records / f"{run_id}.json"
        fd, tmp = tempfile.mkstemp(dir=self.records, prefix=".record-")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out, indent=2, ensure_ascii=False, default=str)
        os.replace(tmp, target)
        return str(target)


# -- the reader processes ------------------------------------------------------------------------
_POOL: concurrent.futures.ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_OCR_SECONDS = [0.0]


def reader_pool(processes: int = 1) -> concurrent.futures.ProcessPoolExecutor:
    """The process's pool of document readers (started on first use, ``processes`` big)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ProcessPoolExecutor(
                max_workers=max(1, processes),
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_reader,
            )
        return _POOL


def drop_reader_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Forget a broken pool; the next `reader_pool` starts a new one."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is pool:
            _POOL = None
    pool.shutdown(wait=False, cancel_futures=True)


def _start_reader() -> None:
    """In a reader process: load the readers once, and time OCR as it happens. Ctrl-C on
    the terminal reaches the whole process group: the server decides when its readers stop
    (it shuts the pool down), so a reader ignores it rather than fail the file it reads."""
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from flowdesk.documents import ocr

    page = ocr.ocr_page

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return page(*args, **kwargs)
        finally:
            _OCR_SECONDS[0] += time.perf_counter() - started

    ocr.ocr_page = timed
    import flowdesk.documents.extract
    import flowdesk.documents.load  # noqa: F401


def read_invoice(path: str, locale: str | None) -> dict[str, Any]:
    """Read and extract one invoice file (runs in a reader process): the extraction, the
    pages' sizes, the text (for a second reading), and how long OCR and the whole took;
    ``{"error": reason}`` when the file cannot be read or is not an invoice."""
    import time

    from flowdesk import documents

    started, ocr_before = time.perf_counter(), _OCR_SECONDS[0]
    try:
        doc = documents.load_document(path)
        extraction = documents.extract_invoice(doc, locale=locale)
    except errors.DocumentError as exc:
        return {"error": str(exc)}
    timing = {
        "ocr_s": round(_OCR_SECONDS[0] - ocr_before, 4),
        "extract_s": round(time.perf_counter() - started, 4),
    }
    pages = [{"width": p.width, "height": p.height} for p in doc.pages]
    out = extraction.model_dump()
    issues = [i for i in out.get("validation", []) if i.get("code") == "not_an_invoice"]
    if issues:
        return {"error": str(issues[0]["message"]), "pages": pages, "timing": timing}
    text = doc.text()[:MAX_REREAD_CHARS]
    return {"extraction": out, "pages": pages, "text": text, "timing": timing}


def _reason_kind(reasons: Sequence[str]) -> str:
    """A short label for the first reason a person was asked (for the exceptions metric)."""
    first = (reasons[0] if reasons else "").lower()
    for words, kind in (
        ("vendor master", "unknown_vendor"),
        ("purchase order", "purchase_order"),
        ("auto-approval limit", "over_limit"),
        ("low confidence", "low_confidence"),
        ("risk", "risk"),
        ("asks for payment", "bank_account"),
        ("duplicate", "duplicate"),
        ("already", "duplicate"),
    ):
        if words in first:
            return kind
    return "other"


def _gateway_has(gateway: Any, task: str) -> bool:
    config = getattr(gateway, "config", None)
    return task in (getattr(config, "tasks", None) or {})


def _json_object(text: str) -> dict[str, Any]:
    """The first JSON object in a model's answer (fenced or not); {} when there is none."""
    start = text.find("{")
    while start >= 0:
        try:
            found, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            start = text.find("{", start + 1)
            continue
        return found if isinstance(found, dict) else {}
    return {}


def _checked_value(name: str, value: Any, text: str) -> str | None:
    """``value`` for field ``name`` when it parses and the document backs it, else None."""
    if value is None or isinstance(value, bool | dict | list):
        return None
    raw = str(value).strip()
    if not raw:
        return None
    if name in ("invoice_date", "due_date"):
        try:
            return date.fromisoformat(raw).isoformat()
        except ValueError:
            return None
    if name in ("total", "subtotal", "tax"):
        amount = _decimal(raw)
        if amount is None:
            return None
        whole = f"{int(abs(amount)):,}".replace(",", "")
        digits = re.sub(r"\D", "", text)
        return str(amount) if whole in digits else None
    if name == "currency":
        return raw.upper() if re.fullmatch(r"[A-Za-z]{3}", raw) else None
    return raw if _compact(raw) in _compact(text) else None


def _title(name: str, values: Mapping[str, Any]) -> str:
    vendor = values.get("vendor_name") or "unknown vendor"
    number = values.get("invoice_number") or "?"
    total = values.get("total")
    money = f", {values.get('currency') or ''} {total}".rstrip() if total else ""
    return f"Invoice {number} from {vendor}{money} ({name})"


def _validate(extraction: Mapping[str, Any], found: Mapping[str, Any]) -> list[dict[str, Any]]:
    from flowdesk.documents.validate import (
        Checks,
        KnownInvoice,
        PurchaseOrder,
        Vendor,
        validate,
    )

    vendor = found.get("vendor")
    po = found.get("purchase_order")
    known = [
        KnownInvoice(
            id=str(k["idempotency_key"]),
            invoice_number=k.get("invoice_number"),
            invoice_date=date.fromisoformat(str(k["invoice_date"])[:10])
            if k.get("invoice_date")
            else None,
            total=_decimal(k.get("total")),
            currency=k.get("currency"),
        )
        for k in found.get("known") or []
    ]
    checks = Checks(
        duplicates=lambda _key: known,
        vendors=lambda _name, _tax: (
            None
            if vendor is None
            else Vendor(
                id=str(vendor["id"]),
                name=vendor["name"],
                tax_id=vendor["tax_id"],
                iban=vendor["iban"],
            )
        ),
        purchase_orders=lambda _number: (
            None
            if po is None
            else PurchaseOrder(
                number=str(po["number"]),
                amount=Decimal(str(po["amount"])),
                currency=po.get("currency"),
                vendor_id=po.get("vendor_id"),
            )
        ),
    )
    return [dict(i) for i in validate(extraction, checks)]


def _corrections(
    document_id: str,
    run_id: str,
    fields: Mapping[str, Any],
    answer: Mapping[str, Any],
    reviewer: str | None,
) -> list[dict[str, Any]]:
    out = []
    for name in HEADER_FIELDS:
        read = fields.get(name) or {}
        before, after = read.get("value"), answer.get(name)
        if answer.get("decision") == "reject" or _same(before, after):
            continue
        bbox = read.get("bbox")
        out.append(
            CorrectionRow(
                document_id=document_id,
                run_id=run_id,
                field=name,
                extracted=_text(before),
                corrected=_text(after),
                page=read.get("page"),
                bbox=None if bbox is None else json.dumps(bbox),
                reviewer=reviewer,
            ).model_dump()
        )
    return out


def _same(before: Any, after: Any) -> bool:
    if before in (None, "") and after in (None, ""):
        return True
    a, b = _decimal(before), _decimal(after)
    if a is not None and b is not None:
        return a == b
    return str(before).strip() == str(after).strip()


# -- the risk model's sample data and training ----------------------------------------------------
_FACTS: tuple[tuple[tuple[str, float], ...], ...] = (
    (("vendor_known", 0.8), ("vendor_unknown", 0.2)),
    (("iban_ok", 0.82), ("iban_missing", 0.1), ("iban_changed", 0.05), ("iban_invalid", 0.03)),
    (("po_match", 0.6), ("po_none", 0.25), ("po_mismatch", 0.1), ("po_not_found", 0.05)),
    (("sums_ok", 0.93), ("sums_off", 0.07)),
    (("dates_ok", 0.94), ("dates_odd", 0.06)),
    (("no_duplicate", 0.95), ("duplicate", 0.05)),
    (
        ("amount_lt_1k", 0.35),
        ("amount_1k_10k", 0.4),
        ("amount_10k_50k", 0.18),
        ("amount_ge_50k", 0.07),
    ),
    (("conf_high", 0.75), ("conf_mid", 0.17), ("conf_low", 0.08)),
    (("history_some", 0.7), ("history_none", 0.3)),
)


def _judge(facts: set[str]) -> str:
    """How the sample's accounts-payable team labelled a case (the rule the data encodes)."""
    if facts & {"iban_changed", "iban_invalid", "duplicate", "po_not_found"}:
        return "high"
    if "sums_off" in facts and facts & {"amount_10k_50k", "amount_ge_50k"}:
        return "high"
    if {"vendor_unknown", "history_none", "amount_ge_50k"} <= facts:
        return "high"
    if facts & {"vendor_unknown", "po_mismatch", "dates_odd", "conf_low", "sums_off"}:
        return "medium"
    if facts & {"amount_ge_50k"} or {"po_none", "amount_10k_50k"} <= facts:
        return "medium"
    return "low"


def sample_risk_examples(
    n: int = 3000, seed: int = 7, noise: float = 0.03
) -> list[tuple[str, str]]:
    """``n`` past invoices as the risk model sees them (`risk_features` tokens) with the
    label the sample team gave; ``noise`` of the labels are another reviewer's judgement
    (a random other label), as in real decision logs. Same seed, same data."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens = [rng.choices([t for t, _ in g], [w for _, w in g])[0] for g in _FACTS]
        label = _judge(set(tokens))
        if rng.random() < noise:
            label = rng.choice([other for other in RISK_LABELS if other != label])
        out.append((" ".join(tokens), label))
    return out


def write_risk_examples(path: str | Path, n: int = 3000, seed: int = 7) -> Path:
    """Write `sample_risk_examples` as a CSV (``text,label``) for `train_risk_model`."""
    import csv

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(sample_risk_examples(n, seed))
    return target


def train_risk_model(examples_csv: str | Path, models_dir: str | Path) -> str:
    """Train the risk classifier on ``examples_csv`` (TF-IDF; a second or two), register it
    in ``models_dir`` and return the gateway TOML that serves it as task ``invoice_risk``."""
    from flowdesk.models import registry, training

    examples = training.load_examples(examples_csv)
    result = training.train(examples, features="tfidf")
    registry.Registry(Path(models_dir)).register(RISK_TASK, result.classifier, result.meta)
    labels = ", ".join(f'"{label}"' for label in RISK_LABELS)
    return (
        f'[providers.risk]\ntype = "local"\ntask = "{RISK_TASK}"\n'
        f'models_dir = "{Path(models_dir).as_posix()}"\n\n'
        f'[models.risk]\nprovider = "risk"\nmodel = "{RISK_TASK}"\n'
        'capabilities = ["classify"]\n\n'
        f'[tasks.{RISK_TASK}]\ncapability = "classify"\nlabels = [{labels}]\n'
        'chain = ["risk"]\n'
    )
