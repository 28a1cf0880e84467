"""OCR for scans and photos: clean the image up, then Tesseract.

Each page image is turned to grey, enlarged when it is too small to read, straightened
(the skew angle is the one that makes the rows of text line up best: the variance of the
row sums of ink peaks), binarised (Otsu's threshold) and handed to the ``tesseract``
program, which writes one TSV line per word with its box and confidence. Tesseract runs
as a subprocess with a time limit per page, one thread each (``OMP_THREAD_LIMIT=1``), so a
hard page is killed, not waited for.

Word boxes are in the straightened image's pixels, divided by the enlargement factor;
the page notes say how much the page was turned.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from flowdesk import errors
from flowdesk.documents import limits as limits_mod
from flowdesk.documents import pages

# Pages whose long side is below this many pixels are enlarged before OCR.
MIN_LONG_SIDE = 2000
MAX_SKEW_DEGREES = 6.0


@dataclass(frozen=True)
class Prepared:
    """An image ready for Tesseract, and what was done to it."""

    image: Image.Image
    scale: float
    angle: float


@functools.cache
def tesseract_path() -> str:
    path = shutil.which("tesseract")
    if path is None:
        raise errors.OcrUnavailable()
    return path


@functools.cache
def installed_languages() -> frozenset[str]:
    try:
        out = subprocess.run(
            [tesseract_path(), "--list-langs"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.OcrUnavailable(f"tesseract --list-langs failed: {exc}") from exc
    lines = (out.stdout + out.stderr).splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and " " not in line.strip())


def languages(wanted: str) -> str:
    """The ``+``-joined languages of ``wanted`` that are installed (English at least)."""
    have = installed_languages()
    chosen = [lang for lang in wanted.split("+") if lang in have]
    if not chosen:
        raise errors.OcrUnavailable(
            f"none of the Tesseract languages {wanted!r} is installed (installed: "
            f"{', '.join(sorted(have)) or 'none'}); install tesseract-ocr-eng"
        )
    return "+".join(chosen)


# -- image clean-up --------------------------------------------------------------------------
def to_grey(image: Image.Image) -> Image.Image:
    """Grey levels, with transparency flattened onto white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode.startswith(("I", "F")):
        # 16-bit and float scans: stretch to 8 bits (a plain conversion clips them white).
        arr = np.asarray(image, dtype=np.float64)
        low, high = float(arr.min()), float(arr.max())
        span = high - low or 1.0
        return Image.fromarray(((arr - low) / span * 255.0).astype(np.uint8))
    return image.convert("L")


def otsu_threshold(grey: np.ndarray) -> int:
    """The grey level that best splits ink from paper (Otsu's method)."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 128
    levels = np.arange(256, dtype=np.float64)
    weight_bg = np.cumsum(hist)
    weight_fg = total - weight_bg
    sum_bg = np.cumsum(hist * levels)
    mean_bg = np.divide(sum_bg, weight_bg, out=np.zeros(256), where=weight_bg > 0)
    mean_fg = np.divide(sum_bg[-1] - sum_bg, weight_fg, out=np.zeros(256), where=weight_fg > 0)
    between = weight_bg * weight_fg * (mean_bg - mean_fg) ** 2
    return int(np.argmax(between))


def _box_sums(values: np.ndarray, window: int) -> np.ndarray:
    """The sum over a ``window`` x ``window`` square around every pixel (integral image)."""
    pad = window // 2
    padded = np.pad(values, ((pad + 1, pad), (pad + 1, pad)), mode="edge")
    integral = padded.cumsum(axis=0).cumsum(axis=1)
    h, w = values.shape
    sums: np.ndarray = (
        integral[window : window + h, window : window + w]
        - integral[0:h, window : window + w]
        - integral[window : window + h, 0:w]
        + integral[0:h, 0:w]
    )
    return sums


def binarise(grey: Image.Image, k: float = 0.1) -> Image.Image:
    """Black ink on white paper.

    A small median filter removes speckle first. The threshold is local (Sauvola's: the
    mean of the neighbourhood, lowered where the neighbourhood is flat), so light grey
    print next to black print survives, which one global (Otsu) threshold loses.
    """
    smooth = grey.filter(ImageFilter.MedianFilter(3))
    arr = np.asarray(smooth, dtype=np.float64)
    window = max(15, (max(arr.shape) // 60) | 1)
    count = float(window * window)
    mean = _box_sums(arr, window) / count
    sq_mean = _box_sums(arr * arr, window) / count
    std = np.sqrt(np.maximum(sq_mean - mean * mean, 0.0))
    threshold = mean * (1.0 + k * (std / 128.0 - 1.0))
    out = np.where(arr > threshold, 255, 0).astype(np.uint8)
    # Light text on a dark page: invert so that ink is black.
    if (out == 0).mean() > 0.5:
        out = 255 - out
    return Image.fromarray(out)


def _profile_score(ink: Image.Image, angle: float) -> float:
    turned = ink.rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=0)
    rows = np.asarray(turned, dtype=np.float64).sum(axis=1)
    return float(np.var(np.diff(rows)))


def estimate_skew(grey: Image.Image) -> float:
    """The angle (degrees, counter-clockwise) to turn the page by to straighten it."""
    small = grey.copy()
    small.thumbnail((1200, 1200))
    arr = np.asarray(small, dtype=np.uint8)
    ink = Image.fromarray(np.where(arr < otsu_threshold(arr), 255, 0).astype(np.uint8))
    if np.asarray(ink).mean() < 0.5:  # a blank page has no skew to find
        return 0.0
    best = max(
        np.arange(-MAX_SKEW_DEGREES, MAX_SKEW_DEGREES + 0.01, 0.5),
        key=lambda a: _profile_score(ink, float(a)),
    )
    fine = max(np.arange(best - 0.5, best + 0.51, 0.1), key=lambda a: _profile_score(ink, float(a)))
    return round(float(fine), 2)


def flatten(grey: Image.Image) -> Image.Image:
    """Even out the paper: divide by an estimate of the background (the page without its
    ink: a maximum filter, then a wide blur), after a median filter against speckle.
    Shadows and uneven light go; ink keeps its grey levels."""
    smooth = grey.filter(ImageFilter.MedianFilter(3))
    # The background changes slowly: estimate it on a quarter-size copy (much faster).
    small = smooth.reduce(4)
    background = small.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.GaussianBlur(5))
    background = background.resize(smooth.size, Image.Resampling.BILINEAR)
    ink = np.asarray(smooth, dtype=np.float64)
    paper = np.maximum(np.asarray(background, dtype=np.float64), 1.0)
    return Image.fromarray(np.clip(ink / paper * 255.0, 0, 255).astype(np.uint8))


def is_blank(grey: Image.Image) -> bool:
    """No ink at all: an empty page (checked on a small copy)."""
    small = grey.copy()
    small.thumbnail((400, 400))
    arr = np.asarray(small, dtype=np.int16)
    return int(arr.max()) - int(arr.min()) < 40 or float((arr < arr.max() - 60).mean()) < 1e-4


def prepare(image: Image.Image, limits: limits_mod.Limits) -> Prepared:
    """Grey, enlarged if small, straightened, the background evened out; binarised too
    when ``limits.ocr_binarise`` asks for it.

    By default Tesseract gets the cleaned grey image, not a black-and-white one: its
    line recogniser reads grey levels, and on the generated scans feeding it our own
    binarisation lost more than it gained (benchmarks/invoices.py --binarise shows it).
    Tesseract still binarises internally for its page layout analysis, and on a page whose
    background was flattened that global threshold works like a local one.
    """
    grey = to_grey(image)
    scale = 1.0
    long_side = max(grey.size)
    if 0 < long_side < MIN_LONG_SIDE:
        scale = MIN_LONG_SIDE / long_side
        if grey.width * grey.height * scale * scale > limits.max_pixels:
            scale = max(1.0, (limits.max_pixels / (grey.width * grey.height)) ** 0.5)
        if scale > 1.0:
            size = (round(grey.width * scale), round(grey.height * scale))
            grey = grey.resize(size, Image.Resampling.LANCZOS)
    angle = estimate_skew(grey)
    if abs(angle) >= 0.1:
        grey = grey.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=255)
    cleaned = binarise(grey) if limits.ocr_binarise else flatten(grey)
    return Prepared(cleaned, scale, angle)


# -- Tesseract -------------------------------------------------------------------------------
def run_tesseract(
    image: Image.Image,
    *,
    langs: str,
    timeout: float,
    dpi: int = 300,
    psm: int = 3,
    path: str = "",
) -> str:
    """Tesseract's TSV output for ``image``; raises `OcrTimeout` or `OcrFailed`."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    args = [
        tesseract_path(),
        "stdin",
        "stdout",
        "-l",
        langs,
        "--psm",
        str(psm),
        "--dpi",
        str(dpi),
        "tsv",
    ]
    try:
        done = subprocess.run(
            args,
            input=buffer.getvalue(),
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise errors.OcrTimeout(
            f"{path or 'page'}: Tesseract took longer than {timeout:g} s on one page and was "
            "stopped; raise Limits.ocr_timeout or send a cleaner scan",
            path=path,
            timeout=timeout,
        ) from exc
    except OSError as exc:
        raise errors.OcrUnavailable(f"cannot run tesseract: {exc}", path=path) from exc
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip()[-500:]
        raise errors.OcrFailed(
            f"{path or 'page'}: tesseract exited {done.returncode}: {tail}", path=path
        )
    return done.stdout.decode("utf-8", "replace")


def parse_tsv(tsv: str, scale: float = 1.0) -> list[pages.Word]:
    """Words from Tesseract's TSV (level 5 rows), boxes divided by ``scale``."""
    words: list[pages.Word] = []
    line_ids: dict[tuple[str, str, str], int] = {}
    reader = csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE)
    for row in reader:
        if row.get("level") != "5":
            continue
        text = (row.get("text") or "").strip()
        if not text:
            continue
        try:
            left, top = float(row["left"]), float(row["top"])
            width, height = float(row["width"]), float(row["height"])
            conf = float(row["conf"])
        except (KeyError, TypeError, ValueError):
            continue
        key = (row["block_num"], row["par_num"], row["line_num"])
        line = line_ids.setdefault(key, len(line_ids))
        box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        words.append(pages.Word(text, box, max(0.0, min(1.0, conf / 100.0)), line))
    return words


def ocr_page(
    image: Image.Image,
    *,
    number: int,
    limits: limits_mod.Limits = limits_mod.DEFAULT_LIMITS,
    dpi: float | None = None,
    path: str = "",
    notes: Sequence[str] = (),
) -> pages.Page:
    """Read one page image with Tesseract."""
    langs = languages(limits.ocr_languages)
    if is_blank(to_grey(image)):
        return pages.Page(
            number=number,
            width=float(image.width),
            height=float(image.height),
            words=(),
            source="ocr",
            notes=(*notes, "blank page: nothing to read"),
        )
    prepared = prepare(image, limits)
    effective_dpi = int(round((dpi or 300) * prepared.scale))
    tsv = run_tesseract(
        prepared.image,
        langs=langs,
        timeout=limits.ocr_timeout,
        dpi=max(70, min(effective_dpi, 1200)),
        path=path,
    )
    words = parse_tsv(tsv, prepared.scale)
    page_notes = list(notes)
    if prepared.angle:
        page_notes.append(f"straightened by {prepared.angle:+.2f} degrees before OCR")
    if prepared.scale != 1.0:
        page_notes.append(f"enlarged x{prepared.scale:.2f} for OCR")
    return pages.Page(
        number=number,
        width=prepared.image.width / prepared.scale,
        height=prepared.image.height / prepared.scale,
        words=tuple(words),
        source="ocr",
        notes=tuple(page_notes),
    )


def exif_upright(image: Image.Image) -> Image.Image:
    """A photo turned the way its camera recorded (EXIF orientation)."""
    return ImageOps.exif_transpose(image) or image
