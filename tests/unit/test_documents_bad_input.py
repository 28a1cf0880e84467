"""Bad input never crashes or hangs the reader: each gives a `DocumentError` that says
why, or a result that records why. Every bad file is made here, in the test."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageDraw, ImageFont
from reportlab.lib.pdfencrypt import StandardEncryption
from reportlab.pdfgen import canvas

from flowdesk import errors
from flowdesk.documents import Limits, extract_invoice, load_document, ocr

DATA = Path(__file__).resolve().parent.parent / "data" / "invoices"
SAMPLE_PDF = DATA / "inv-2025-0009-L1-en_US.pdf"


def pdf_with_text(lines: list[str], **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, **kwargs)  # type: ignore[arg-type]
    for n, line in enumerate(lines):
        pdf.drawString(72, 760 - 16 * n, line)
    pdf.save()
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side white pixels: a few hundred kB on disk, gigabytes
    once decoded."""
    row = b"\x00" + b"\xff" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = []
    block = row * 1000
    for _ in range(side // 1000):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(row * (side % 1000)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def text_png(text: str = "Invoice No. 4711  Total 99.00") -> bytes:
    image = Image.new("L", (1200, 200), 255)
    font_path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    font = (
        ImageFont.truetype(font_path, 40)
        if os.path.exists(font_path)
        else ImageFont.load_default(40)
    )
    ImageDraw.Draw(image).text((40, 70), text, fill=0, font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pdf"
    path.write_bytes(b"")
    with pytest.raises(errors.EmptyDocument, match="empty") as caught:
        load_document(path)
    assert caught.value.code == "empty_file" and caught.value.path == str(path)


def test_a_file_of_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "invoice.pdf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(errors.CorruptDocument, match="name says PDF"):
        load_document(path)


def test_a_truncated_pdf(tmp_path: Path) -> None:
    data = SAMPLE_PDF.read_bytes()
    path = tmp_path / "cut.pdf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CorruptDocument, match="damaged or truncated"):
        load_document(path)


def test_a_truncated_image(tmp_path: Path) -> None:
    data = text_png()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CorruptDocument, match="does not decode"):
        load_document(path)


def test_a_file_that_is_no_document_format(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("Invoice No. 4711, total 99.00", "utf-8")
    with pytest.raises(errors.UnsupportedDocument, match="not a PDF, PNG, JPEG or TIFF"):
        load_document(path)


def test_an_encrypted_pdf(tmp_path: Path) -> None:
    path = tmp_path / "locked.pdf"
    path.write_bytes(
        pdf_with_text(["Invoice 1"], encrypt=StandardEncryption("secret", ownerPassword="o"))
    )
    with pytest.raises(errors.EncryptedDocument, match="needs a password") as caught:
        extract_invoice(path)
    assert caught.value.code == "encrypted_pdf"


def test_a_pdf_with_only_an_owner_password_opens() -> None:
    data = pdf_with_text(
        ["Invoice No. 4711", "Total 99.00 EUR"],
        encrypt=StandardEncryption("", ownerPassword="owner", canPrint=0),
    )
    doc = load_document(data, name="permissions.pdf")
    assert "4711" in [w.text for w in doc.pages[0].words]


def test_a_500_page_pdf_is_refused_before_reading(tmp_path: Path) -> None:
    pdf = pdfium.PdfDocument.new()
    for _ in range(500):
        pdf.new_page(595, 842)
    path = tmp_path / "long.pdf"
    pdf.save(str(path))
    pdf.close()
    with pytest.raises(errors.TooManyPages, match="500 pages; the limit is 50") as caught:
        load_document(path)
    assert caught.value.details == {"pages": 500, "limit": 50}


def test_the_page_limit_is_the_callers_choice(tmp_path: Path) -> None:
    pdf = pdfium.PdfDocument.new()
    for _ in range(3):
        pdf.new_page(595, 842)
    path = tmp_path / "three.pdf"
    pdf.save(str(path))
    pdf.close()
    with pytest.raises(errors.TooManyPages):
        load_document(path, limits=Limits(max_pages=2))
    doc = load_document(path, limits=Limits(max_pages=3))
    assert len(doc.pages) == 3
    assert all("blank page" in note for page in doc.pages for note in page.notes)


def test_a_tiff_with_too_many_frames(tmp_path: Path) -> None:
    frames = [Image.new("L", (50, 50), 255) for _ in range(3)]
    path = tmp_path / "frames.tiff"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(errors.TooManyPages, match="3 pages; the limit is 2"):
        load_document(path, limits=Limits(max_pages=2))


def test_a_decompression_bomb(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(40_000))  # 1.6 billion pixels
    assert path.stat().st_size < 2_000_000
    with pytest.raises(errors.ImageTooLarge, match="too large"):
        load_document(path)


def test_an_image_just_over_pillows_warning_limit(tmp_path: Path) -> None:
    # 100 million pixels: Pillow only warns; the reader refuses.
    path = tmp_path / "big.png"
    path.write_bytes(bomb_png(10_000))
    with pytest.raises(errors.ImageTooLarge):
        load_document(path)


def test_an_image_over_the_readers_own_pixel_limit() -> None:
    with pytest.raises(errors.ImageTooLarge, match="1200 x 200 pixels") as caught:
        load_document(text_png(), name="wide.png", limits=Limits(max_pixels=100_000))
    assert caught.value.details["limit"] == 100_000


def test_a_file_over_the_size_limit() -> None:
    with pytest.raises(errors.DocumentTooLarge, match="the limit is 1000"):
        load_document(SAMPLE_PDF, limits=Limits(max_bytes=1000))


def test_ocr_gives_up_at_its_time_limit() -> None:
    with pytest.raises(errors.OcrTimeout, match="longer than 0.001 s") as caught:
        load_document(text_png(), name="slow.png", limits=Limits(ocr_timeout=0.001))
    assert isinstance(caught.value, TimeoutError)


def test_no_tesseract_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    ocr.tesseract_path.cache_clear()
    ocr.installed_languages.cache_clear()
    try:
        with pytest.raises(errors.OcrUnavailable, match="make install"):
            load_document(text_png(), name="page.png")
    finally:
        monkeypatch.undo()
        ocr.tesseract_path.cache_clear()
        ocr.installed_languages.cache_clear()
    assert shutil.which("tesseract")


def test_a_document_that_is_not_an_invoice_says_so() -> None:
    letter = pdf_with_text(
        [
            "Dear neighbours,",
            "the summer party in the courtyard is on Saturday at four.",
            "Please bring a chair and something to share.",
            "See you there!",
        ]
    )
    result = extract_invoice(letter)
    codes = [issue["code"] for issue in result["validation"]]
    assert codes[0] == "not_an_invoice"
    assert result["fields"]["total"]["value"] is None
    assert result["fields"]["invoice_number"]["value"] is None
    assert result["line_items"] == []


def test_a_blank_scan_says_there_is_no_text() -> None:
    buffer = io.BytesIO()
    Image.new("L", (800, 1100), 255).save(buffer, format="PNG")
    result = extract_invoice(buffer.getvalue())
    assert result["validation"][0]["code"] == "no_text"


def test_document_errors_survive_pickling() -> None:
    err = errors.TooManyPages("x.pdf: 500 pages", path="x.pdf", pages=500, limit=50)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is errors.TooManyPages
    assert (copy.message, copy.path, copy.details) == (err.message, "x.pdf", err.details)
    assert isinstance(copy, errors.DocumentTooLarge) and isinstance(copy, errors.FlowdeskError)
