"""PDF pages: the text layer with positions (PDFium through pypdfium2), or OCR.

A page with a text layer gives its characters with their boxes; they are joined into
words at spaces and at visible gaps, and a new line starts where the text jumps back
left or to another height. A page with (almost) no text is a scan: it is rendered at
``Limits.ocr_dpi`` (lower when that would exceed ``Limits.max_pixels``) and read by OCR.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from flowdesk import errors
from flowdesk.documents import limits as limits_mod
from flowdesk.documents import ocr, pages

# A page with fewer visible characters than this is treated as a scan.
MIN_TEXT_CHARS = 16
# PDFium must not be called from two threads at once.
PDFIUM_LOCK = threading.RLock()
_SPACES = {0x20, 0x09, 0x0A, 0x0D, 0x00A0, 0x2002, 0x2003, 0x2009, 0x202F, 0xFFFE}


def open_pdf(data: bytes, path: str) -> Any:
    """The PDFium document, or a `DocumentError` saying why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) == pdfium_c.FPDF_ERR_PASSWORD:
            raise errors.EncryptedDocument(
                f"{path}: the PDF is encrypted and needs a password; ask the sender for "
                "a copy without one",
                path=path,
            ) from exc
        if getattr(exc, "err_code", None) == pdfium_c.FPDF_ERR_SECURITY:
            raise errors.EncryptedDocument(
                f"{path}: the PDF uses an encryption scheme that cannot be opened",
                path=path,
            ) from exc
        raise errors.CorruptDocument(
            f"{path}: not a readable PDF ({exc}); the file is damaged or truncated",
            path=path,
        ) from exc


def read_pdf(
    data: bytes, *, path: str, limits: limits_mod.Limits = limits_mod.DEFAULT_LIMITS
) -> pages.Document:
    """Every page of a PDF, from its text layer or by OCR.

    PDFium is not thread-safe, and sync steps run in a thread pool: every PDFium call
    holds `PDFIUM_LOCK`; OCR (a Tesseract process) runs without it.
    """
    with PDFIUM_LOCK:
        pdf = open_pdf(data, path)
    try:
        with PDFIUM_LOCK:
            count = len(pdf)
        if count == 0:
            raise errors.CorruptDocument(f"{path}: the PDF has no pages", path=path)
        if count > limits.max_pages:
            raise errors.TooManyPages(
                f"{path}: {count} pages; the limit is {limits.max_pages}. Split the "
                "document, or raise Limits.max_pages (--max-pages)",
                path=path,
                pages=count,
                limit=limits.max_pages,
            )
        out: list[pages.Page] = []
        scanned = 0
        for index in range(count):
            with PDFIUM_LOCK:
                page = pdf[index]
                try:
                    text_page = _text_layer(page, index + 1)
                    rendered = None if text_page is not None else _render(page, limits, path)
                finally:
                    page.close()
            if text_page is not None:
                out.append(text_page)
            else:
                assert rendered is not None
                scanned += 1
                out.append(_ocr(rendered, index + 1, limits, path))
    except pdfium.PdfiumError as exc:
        raise errors.CorruptDocument(f"{path}: a page could not be read: {exc}", path=path) from exc
    finally:
        with PDFIUM_LOCK:
            pdf.close()
    kind = "pdf" if scanned == 0 else ("scanned-pdf" if scanned == count else "mixed-pdf")
    return pages.Document(pages=tuple(out), path=path, kind=kind)


def _text_layer(page: Any, number: int) -> pages.Page | None:
    width, height = page.get_size()
    textpage = page.get_textpage()
    try:
        count = textpage.count_chars()
        raw = textpage.raw
        visible = 0
        words: list[pages.Word] = []
        chars: list[tuple[str, tuple[float, float, float, float]]] = []
        line = 0
        prev_box: tuple[float, float, float, float] | None = None

        def flush() -> None:
            if chars:
                text = "".join(c for c, _ in chars)
                box = pages.union(b for _, b in chars)
                words.append(pages.Word(text, box, 1.0, line))
                chars.clear()

        for i in range(count):
            code = pdfium_c.FPDFText_GetUnicode(raw, i)
            if code in _SPACES or code == 0 or pdfium_c.FPDFText_IsGenerated(raw, i) == 1:
                flush()
                continue
            left, bottom, right, top = textpage.get_charbox(i, loose=True)
            box = (left, height - top, right, height - bottom)
            if prev_box is not None:
                h = max(prev_box[3] - prev_box[1], box[3] - box[1], 1e-3)
                prev_cy = (prev_box[1] + prev_box[3]) / 2
                cy = (box[1] + box[3]) / 2
                new_line = abs(cy - prev_cy) > 0.5 * h or box[0] < prev_box[0] - 0.5 * h
                if new_line:
                    flush()
                    line += 1
                elif box[0] - prev_box[2] > 0.25 * h:
                    flush()
            chars.append((chr(code), box))
            prev_box = box
            visible += 1
        flush()
    finally:
        textpage.close()
    if visible < MIN_TEXT_CHARS:
        return None
    return pages.Page(number, float(width), float(height), tuple(words), "text")


@dataclass(frozen=True)
class _Rendered:
    image: Image.Image
    scale: float
    notes: tuple[str, ...]


def _render(page: Any, limits: limits_mod.Limits, path: str) -> _Rendered:
    """The page as a grey image at ``ocr_dpi``, or lower to stay within ``max_pixels``."""
    width, height = page.get_size()
    scale = limits.ocr_dpi / 72.0
    notes: list[str] = []
    if width * height * scale * scale > limits.max_pixels:
        scale = (limits.max_pixels / (width * height)) ** 0.5
        notes.append(f"rendered at {scale * 72:.0f} dpi to stay within max_pixels")
    if width * scale < 50 or height * scale < 50:
        raise errors.ImageTooLarge(
            f"{path}: a page is {width:.0f} x {height:.0f} pt; it cannot be rendered "
            "within the pixel limit",
            path=path,
        )
    bitmap = page.render(scale=scale, grayscale=True)
    try:
        image = bitmap.to_pil()
    finally:
        bitmap.close()
    return _Rendered(image, scale, tuple(notes))


def _ocr(rendered: _Rendered, number: int, limits: limits_mod.Limits, path: str) -> pages.Page:
    scale = rendered.scale
    read = ocr.ocr_page(
        rendered.image,
        number=number,
        limits=limits,
        dpi=scale * 72,
        path=path,
        notes=rendered.notes,
    )
    # Back to PDF points, so that every page of a PDF is in the same units.
    factor = 1.0 / scale
    words = tuple(
        pages.Word(
            w.text,
            (w.bbox[0] * factor, w.bbox[1] * factor, w.bbox[2] * factor, w.bbox[3] * factor),
            w.confidence,
            w.line,
        )
        for w in read.words
    )
    return pages.Page(number, read.width * factor, read.height * factor, words, "ocr", read.notes)
