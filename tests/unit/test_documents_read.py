"""Reading documents: the PDF text layer with positions, OCR of scans and photos (PNG,
JPEG, multi-frame TIFF, image-only PDF) with straightening, through the real Tesseract."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from flowdesk.documents import Document, Limits, load_document, ocr

DATA = Path(__file__).resolve().parent.parent / "data" / "invoices"
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if FONT.exists():
        return ImageFont.truetype(str(FONT), size)
    return ImageFont.load_default(size=size)


def text_image(lines: list[str], *, angle: float = 0.0, size: tuple[int, int] = (1400, 520)):
    """A small page of black text on white, at roughly 300 dpi for 10 pt type."""
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    for n, line in enumerate(lines):
        draw.text((80, 60 + n * 90), line, fill=0, font=font(42))
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=255)
    return image


def words(doc: Document) -> list[str]:
    return [w.text for page in doc.pages for w in page.words]


LINES = ["Invoice No. 4711", "Total due 1,234.56 EUR", "Thank you for your order"]


def sample(layout: int, kind: str = "pdf") -> Path:
    for truth_path in sorted(DATA.glob(f"*-L{layout}-*.json")):
        truth = json.loads(truth_path.read_text("utf-8"))
        if kind in truth["files"]:
            return DATA / truth["files"][kind]
    raise AssertionError(f"no sample {kind} of layout {layout}")


def test_pdf_text_layer_gives_words_with_positions() -> None:
    path = sample(1)
    truth = json.loads(path.with_suffix(".json").read_text("utf-8"))
    doc = load_document(path)
    assert doc.kind == "pdf" and doc.pages[0].source == "text"
    page = doc.pages[0]
    assert 590 < page.width < 615 and 790 < page.height < 845  # A4 or Letter, in points
    for word in page.words:
        x0, y0, x1, y1 = word.bbox
        assert 0 <= x0 < x1 <= page.width and 0 <= y0 < y1 <= page.height
    # The vendor's name is the first line, at the top left, larger than the body text.
    vendor = truth["fields"]["vendor_name"]
    first = next(s for s in page.segments if s.text == vendor)
    assert first.y0 < 0.1 * page.height and first.x0 < 0.2 * page.width
    assert first.height > 1.4 * page.line_height
    # Rows put a label and its value side by side.
    number = truth["fields"]["invoice_number"]
    row = next(r for r in page.rows if any(s.text == number for s in r))
    assert len(row) >= 2


def test_multi_page_pdf_reads_every_page() -> None:
    long_one = next(
        p for p in sorted(DATA.glob("*.json")) if json.loads(p.read_text("utf-8"))["pages"] > 1
    )
    truth = json.loads(long_one.read_text("utf-8"))
    doc = load_document(DATA / truth["files"]["pdf"])
    assert len(doc.pages) == truth["pages"] >= 2
    assert [p.number for p in doc.pages] == list(range(1, truth["pages"] + 1))
    assert all(p.source == "text" and p.words for p in doc.pages)


def test_png_is_read_by_ocr(tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    text_image(LINES).save(path)
    doc = load_document(path)
    assert doc.kind == "image" and doc.pages[0].source == "ocr"
    found = words(doc)
    for expected in ("Invoice", "4711", "1,234.56", "EUR", "order"):
        assert expected in found
    # OCR words come with boxes and confidences.
    word = next(w for w in doc.pages[0].words if w.text == "4711")
    assert word.bbox[2] > word.bbox[0] and 0.5 < word.confidence <= 1.0


def test_a_turned_photo_is_straightened_first(tmp_path: Path) -> None:
    turned = text_image(LINES, angle=3.0)
    angle = ocr.estimate_skew(turned)
    assert abs(angle + 3.0) < 0.4
    path = tmp_path / "photo.jpg"
    turned.convert("RGB").save(path, quality=80)
    doc = load_document(path)
    assert any("straightened" in note for note in doc.pages[0].notes)
    assert "4711" in words(doc) and "1,234.56" in words(doc)
    # After straightening, each line of text is one row.
    rows = [" ".join(s.text for s in row) for row in doc.pages[0].rows]
    assert any("Total due 1,234.56 EUR" in row for row in rows)


def test_multi_frame_tiff_is_one_page_per_frame(tmp_path: Path) -> None:
    first = text_image(["Page one: Invoice No. 4711"], size=(1400, 300))
    second = text_image(["Page two: Total 99.00"], size=(1400, 300))
    path = tmp_path / "scan.tiff"
    first.save(path, save_all=True, append_images=[second], compression="tiff_deflate")
    doc = load_document(path)
    assert doc.kind == "multipage-image"
    assert len(doc.pages) == 2
    assert "4711" in [w.text for w in doc.pages[0].words]
    assert "99.00" in [w.text for w in doc.pages[1].words]


def test_a_pdf_without_text_layer_is_rendered_and_read(tmp_path: Path) -> None:
    path = tmp_path / "scanned.pdf"
    text_image(LINES).convert("RGB").save(path, format="PDF", resolution=300)
    doc = load_document(path)
    assert doc.kind == "scanned-pdf"
    assert doc.pages[0].source == "ocr"
    assert "4711" in words(doc)
    # Positions are in PDF points like a text layer's (the page is 1400 px at 300 dpi).
    assert 300 < doc.pages[0].width < 370


def test_document_from_bytes(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    text_image(LINES[:1], size=(1400, 200)).save(buffer, format="PNG")
    doc = load_document(buffer.getvalue(), name="upload.png")
    assert doc.path == "upload.png" and "4711" in words(doc)


def test_own_binarisation_on_request(tmp_path: Path) -> None:
    grey = text_image(LINES).convert("L")
    binary = np.asarray(ocr.binarise(grey))
    assert set(np.unique(binary)) <= {0, 255}
    path = tmp_path / "page.png"
    grey.save(path)
    doc = load_document(path, limits=Limits(ocr_binarise=True))
    assert "4711" in words(doc)


def test_from_words_splits_lines_into_positioned_words() -> None:
    doc = Document.from_words(
        [("Invoice No:", (10, 10, 120, 30)), ("4711", (300, 10, 360, 30), 0.8)],
        width=600,
        height=800,
    )
    page = doc.pages[0]
    assert [w.text for w in page.words] == ["Invoice", "No:", "4711"]
    assert page.words[0].bbox[0] == 10 and page.words[1].bbox[2] == pytest.approx(120)
    assert page.words[2].confidence == 0.8
    assert [s.text for s in page.segments] == ["Invoice No:", "4711"]
    assert [[s.text for s in row] for row in page.rows] == [["Invoice No:", "4711"]]
    with pytest.raises(ValueError, match="x0, y0, x1, y1"):
        Document.from_words([("bad", (1, 2, 3))], 10, 10)


def test_pdfs_read_from_many_threads_at_once() -> None:
    """Sync steps run in a thread pool: PDFium is serialised, results do not mix."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for p in sorted(DATA.glob("*.pdf")) if not p.name.endswith(".scan.pdf")][:8]
    alone = [load_document(p).text() for p in paths]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda p: load_document(p).text(), paths * 3))
    assert together == alone * 3
