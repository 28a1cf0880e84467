"""Document intake: read PDFs, scans and photos, extract invoice fields, validate them.

``extract_invoice(path_or_document)`` is the one call most code needs. Reading a file
needs the ``documents`` extra (pypdfium2, Pillow, numpy, python-stdnum) and, for scans,
the ``tesseract`` program; `Document.from_words` needs neither.
"""

from __future__ import annotations

from pathlib import Path

from flowdesk.documents.extract import extract_invoice
from flowdesk.documents.limits import DEFAULT_LIMITS, Limits
from flowdesk.documents.pages import Document, Page, Segment, Word
from flowdesk.documents.result import FIELD_NAMES, Extraction, InvoiceExtraction
from flowdesk.documents.validate import (
    Checks,
    InvoiceKey,
    KnownInvoice,
    PurchaseOrder,
    Vendor,
    validate,
)


def load_document(
    source: str | Path | bytes, *, limits: Limits = DEFAULT_LIMITS, name: str | None = None
) -> Document:
    """Read a PDF, PNG, JPEG or TIFF file (a path or its bytes) into a `Document`.

    Raises a `flowdesk.errors.DocumentError` saying why when it cannot (empty, damaged,
    encrypted, too many pages, too many pixels, OCR failed or timed out).
    """
    from flowdesk.documents import load

    return load.load_document(source, limits=limits, name=name)


__all__ = [
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
]
