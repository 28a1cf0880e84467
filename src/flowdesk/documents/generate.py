"""Synthetic invoices with their ground truth: for demos, tests and the benchmark.

``generate(out_dir, count, seed)`` writes, for each invoice, a digital PDF (reportlab), a
scan-like copy (the PDF rendered to an image, turned up to 3 degrees, blurred, speckled
and JPEG-compressed; saved as JPEG, PNG, TIFF or an image-only PDF) and a JSON file with
the true field values. The same seed gives the same invoices.

Eight layouts (see `LAYOUTS`); vendors in the United States, the United Kingdom, Ireland,
Germany, Switzerland and France, each with its language, currency, number format and date
format; fonts from DejaVu and Liberation when installed (else the PDF base fonts); long
invoices run over several pages with the table header repeated.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowdesk.documents import layouts as layout_mod
from flowdesk.documents import synthetic

LAYOUTS = layout_mod.LAYOUTS
HELD_OUT_LAYOUTS = synthetic.HELD_OUT_LAYOUTS
LOCALES = synthetic.LOCALES

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")
FONT_FAMILIES: dict[str, tuple[str, str]] = {
    "DejaVuSans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"),
    "DejaVuSerif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"),
    "DejaVuSansCondensed": ("DejaVuSansCondensed.ttf", "DejaVuSansCondensed-Bold.ttf"),
    "LiberationSans": ("LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf"),
    "LiberationSerif": ("LiberationSerif-Regular.ttf", "LiberationSerif-Bold.ttf"),
    "LiberationSansNarrow": ("LiberationSansNarrow-Regular.ttf", "LiberationSansNarrow-Bold.ttf"),
}
BASE_FONTS = {"Helvetica": "Helvetica-Bold", "Times-Roman": "Times-Bold"}


# -- fonts -----------------------------------------------------------------------------------
def available_fonts() -> list[str]:
    """Font families installed on this machine (TrueType), else the PDF base fonts."""
    found = []
    for family, (regular, bold) in FONT_FAMILIES.items():
        if _font_file(regular) and _font_file(bold):
            found.append(family)
    return found or list(BASE_FONTS)


def _font_file(name: str) -> Path | None:
    for folder in FONT_DIRS:
        path = Path(folder) / name
        if path.exists():
            return path
    return None


def _register(family: str) -> tuple[str, str]:
    if family in BASE_FONTS:
        return family, BASE_FONTS[family]
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    regular, bold = FONT_FAMILIES[family]
    names = (family, family + "-Bold")
    registered = set(pdfmetrics.getRegisteredFontNames())
    for name, file in zip(names, (regular, bold), strict=True):
        if name not in registered:
            path = _font_file(file)
            if path is None:
                return "Helvetica", "Helvetica-Bold"
            pdfmetrics.registerFont(TTFont(name, str(path)))
    return names


# -- output ----------------------------------------------------------------------------------
def render_pdf(inv: synthetic.Invoice, rng: random.Random) -> bytes:
    """The digital PDF of an invoice (reproducible: no dates or ids inside)."""
    from reportlab.pdfgen import canvas as rl_canvas

    size = synthetic.STYLES[inv.locale].paper
    buffer = io.BytesIO()
    canvas = rl_canvas.Canvas(buffer, pagesize=size, invariant=1, pageCompression=1)
    canvas.setTitle(f"Invoice {inv.number}")
    regular, bold = _register(inv.font)
    pen = layout_mod.Pen(canvas, size, regular, bold)
    layout_mod.DRAW[inv.layout](pen, synthetic.Fmt(inv, rng))
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()


def scan_images(pdf_bytes: bytes, rng: random.Random, dpi: int = 200) -> list[Any]:
    """The pages of a PDF as if printed and scanned: turned, blurred, noisy, grey."""
    import numpy as np
    import pypdfium2 as pdfium
    from PIL import Image, ImageFilter

    from flowdesk.documents.pdf import PDFIUM_LOCK

    rendered = []
    with PDFIUM_LOCK:
        pdf = pdfium.PdfDocument(pdf_bytes)
        try:
            for index in range(len(pdf)):
                page = pdf[index]
                bitmap = page.render(scale=dpi / 72, grayscale=True)
                rendered.append(bitmap.to_pil().convert("L"))
                bitmap.close()
                page.close()
        finally:
            pdf.close()
    images = []
    for image in rendered:
        angle = rng.uniform(-3.0, 3.0)
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=255)
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
        arr = np.asarray(image, dtype=np.float32)
        noise_rng = np.random.default_rng(rng.randrange(2**32))
        arr = arr * rng.uniform(0.85, 1.0) + rng.uniform(0, 20)
        arr += noise_rng.normal(0, rng.uniform(4, 12), arr.shape)
        speckle = noise_rng.random(arr.shape) < 0.0008
        arr[speckle] = 0
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(45, 75))
        buffer.seek(0)
        images.append(Image.open(buffer).convert("L"))
    return images


def save_scan(images: Sequence[Any], path_stem: Path, fmt_name: str, dpi: int) -> Path:
    """Write scan pages as ``jpg``, ``png`` (black and white), ``tiff`` (multi-frame) or
    ``pdf`` (images only, no text layer)."""
    if len(images) > 1 and fmt_name in ("jpg", "png"):
        fmt_name = "tiff"
    path = path_stem.with_suffix(f".scan.{fmt_name}" if fmt_name != "pdf" else ".scan.pdf")
    first, rest = images[0], list(images[1:])
    if fmt_name == "jpg":
        first.save(path, format="JPEG", quality=70, dpi=(dpi, dpi))
    elif fmt_name == "png":
        # A black-and-white scan, as office scanners make in "text" mode: a pixel is ink
        # when it is clearly darker than the paper around it (an adaptive threshold).
        import numpy as np
        from PIL import Image, ImageFilter

        smooth = first.filter(ImageFilter.MedianFilter(3))
        around = np.asarray(smooth.filter(ImageFilter.BoxBlur(25)), dtype=np.int16)
        ink = np.asarray(smooth, dtype=np.int16) < around - 40
        bilevel = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8))
        bilevel.convert("1").save(path, format="PNG", optimize=True, dpi=(dpi, dpi))
    elif fmt_name == "tiff":
        first.save(
            path,
            format="TIFF",
            save_all=True,
            append_images=rest,
            compression="jpeg",
            quality=70,
            dpi=(dpi, dpi),
        )
    else:
        first.save(path, format="PDF", save_all=True, append_images=rest, resolution=dpi)
    return path


@dataclass(frozen=True)
class Generated:
    """The files written for one invoice."""

    key: str
    layout: int
    pdf: Path
    scan: Path | None
    truth: Path


def plan(count: int, seed: int, only: Sequence[int] | None = None) -> list[tuple[str, int, str]]:
    """``(key, layout, locale)`` for each invoice: layouts in turn, locales drawn."""
    rng = random.Random(f"plan:{seed}")
    chosen = list(only or sorted(layout_mod.DRAW))
    out = []
    for n in range(count):
        layout = chosen[n % len(chosen)]
        locale = rng.choice(LOCALES)
        out.append((f"inv-{seed}-{n + 1:04d}", layout, locale))
    return out


def generate(
    out_dir: str | Path,
    *,
    count: int = 16,
    seed: int = 7,
    layouts: Sequence[int] | None = None,
    scans: bool = True,
    scan_dpi: int = 200,
    scan_formats: Sequence[str] = ("jpg", "png", "tiff", "pdf"),
    scan_only: Collection[str] | None = None,
) -> list[Generated]:
    """Write ``count`` invoices (PDF, scan, truth JSON) to ``out_dir``; with
    ``scan_only``, only the invoices with those keys get a scan."""
    if count < 0:
        raise ValueError("count must be 0 or more")
    unknown = [n for n in (layouts or ()) if n not in layout_mod.DRAW]
    if unknown:
        raise ValueError(f"unknown layouts {unknown}; there are {sorted(layout_mod.DRAW)}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fonts = available_fonts()
    out: list[Generated] = []
    for n, (key, layout, locale) in enumerate(plan(count, seed, layouts)):
        rng = random.Random(f"{seed}:{key}")
        inv = synthetic.make_invoice(key, layout, locale, rng, fonts)
        stem = folder / f"{key}-L{layout}-{locale}"
        pdf_bytes = render_pdf(inv, random.Random(f"{seed}:{key}:draw"))
        pdf_path = stem.with_suffix(".pdf")
        pdf_path.write_bytes(pdf_bytes)
        scan_path = None
        truth = inv.truth()
        truth["files"] = {"pdf": pdf_path.name}
        if scans and (scan_only is None or key in scan_only):
            scan_rng = random.Random(f"{seed}:{key}:scan")
            images = scan_images(pdf_bytes, scan_rng, scan_dpi)
            scan_path = save_scan(images, stem, scan_formats[n % len(scan_formats)], scan_dpi)
            truth["files"]["scan"] = scan_path.name
        truth["pages"] = _page_count(pdf_bytes)
        truth_path = stem.with_suffix(".json")
        truth_path.write_text(json.dumps(truth, indent=2, ensure_ascii=False) + "\n", "utf-8")
        out.append(Generated(key, layout, pdf_path, scan_path, truth_path))
    return out


def _page_count(pdf_bytes: bytes) -> int:
    import pypdfium2 as pdfium

    from flowdesk.documents.pdf import PDFIUM_LOCK

    with PDFIUM_LOCK:
        pdf = pdfium.PdfDocument(pdf_bytes)
        try:
            return len(pdf)
        finally:
            pdf.close()
