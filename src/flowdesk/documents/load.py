"""Open a document file: PDF, PNG, JPEG or TIFF (several pages: PDF pages, TIFF frames).

The format is told by the file's first bytes, not its name. Everything that can go wrong
is checked before the expensive part: the file's size, then the page count, then each
image's pixel count from its header (before it is decoded), so a 500-page file or a
decompression bomb is refused at once.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from flowdesk import errors
from flowdesk.documents import limits as limits_mod
from flowdesk.documents import ocr, pages

SUFFIXES = {".pdf": "pdf", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff"}
SUFFIXES[".tiff"] = "tiff"


def sniff(data: bytes) -> str | None:
    """``pdf``, ``png``, ``jpeg``, ``tiff`` or None, from the first bytes."""
    head = data[:1024]
    if b"%PDF-" in head:
        return "pdf"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    return None


def load_document(
    source: str | Path | bytes,
    *,
    limits: limits_mod.Limits = limits_mod.DEFAULT_LIMITS,
    name: str | None = None,
) -> pages.Document:
    """Read a document from a path or from bytes (``name`` then labels it in messages)."""
    if isinstance(source, bytes):
        data = source
        path = name or "<bytes>"
        suffix = Path(name).suffix.lower() if name else ""
    else:
        file = Path(source)
        path = str(file)
        suffix = file.suffix.lower()
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise errors.DocumentError(f"{path}: cannot read the file: {exc}", path=path) from exc
        if size > limits.max_bytes:
            raise errors.DocumentTooLarge(
                f"{path}: {size} bytes; the limit is {limits.max_bytes}",
                path=path,
                size=size,
                limit=limits.max_bytes,
            )
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise errors.DocumentError(f"{path}: cannot read the file: {exc}", path=path) from exc
    if not data:
        raise errors.EmptyDocument(f"{path}: the file is empty (0 bytes)", path=path)
    if len(data) > limits.max_bytes:
        raise errors.DocumentTooLarge(
            f"{path}: {len(data)} bytes; the limit is {limits.max_bytes}",
            path=path,
            size=len(data),
            limit=limits.max_bytes,
        )
    kind = sniff(data)
    if kind is None:
        if suffix in SUFFIXES:
            raise errors.CorruptDocument(
                f"{path}: the name says {SUFFIXES[suffix].upper()} but the content is not; "
                "the file is damaged or mislabelled",
                path=path,
            )
        raise errors.UnsupportedDocument(
            f"{path}: not a PDF, PNG, JPEG or TIFF file; convert it to one of those",
            path=path,
        )
    if kind == "pdf":
        from flowdesk.documents import pdf

        return pdf.read_pdf(data, path=path, limits=limits)
    return read_image(data, path=path, limits=limits)


def open_image(data: bytes, path: str, limits: limits_mod.Limits) -> Image.Image:
    """The image, opened lazily (header only), or a `DocumentError`."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (and, above twice its own limit, refuses) on huge images; here
            # both are a refusal, whatever Pillow's process-wide setting.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise errors.ImageTooLarge(
            f"{path}: the image is too large to decode safely ({exc})", path=path
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise errors.CorruptDocument(
            f"{path}: the image does not decode ({exc}); the file is damaged",
            path=path,
        ) from exc


def read_image(
    data: bytes, *, path: str, limits: limits_mod.Limits = limits_mod.DEFAULT_LIMITS
) -> pages.Document:
    """OCR every frame of an image file."""
    image = open_image(data, path, limits)
    with image:
        frames = int(getattr(image, "n_frames", 1) or 1)
        if frames > limits.max_pages:
            raise errors.TooManyPages(
                f"{path}: {frames} pages; the limit is {limits.max_pages}. Split the document, "
                "or raise Limits.max_pages (--max-pages)",
                path=path,
                pages=frames,
                limit=limits.max_pages,
            )
        out: list[pages.Page] = []
        for index in range(frames):
            try:
                image.seek(index)
            except (EOFError, OSError, ValueError) as exc:
                raise errors.CorruptDocument(
                    f"{path}: page {index + 1} cannot be read ({exc})", path=path
                ) from exc
            width, height = image.size
            if width * height > limits.max_pixels:
                raise errors.ImageTooLarge(
                    f"{path}: page {index + 1} is {width} x {height} pixels "
                    f"({width * height:,}); the limit is {limits.max_pixels:,}. A scan at "
                    "300 dpi needs far fewer: rescan at a lower resolution",
                    path=path,
                    page=index + 1,
                    pixels=width * height,
                    limit=limits.max_pixels,
                )
            if width == 0 or height == 0:
                raise errors.CorruptDocument(f"{path}: page {index + 1} is empty", path=path)
            try:
                frame = image.copy()
                frame.load()
            except (OSError, SyntaxError, ValueError) as exc:
                raise errors.CorruptDocument(
                    f"{path}: page {index + 1} does not decode ({exc}); the file is damaged "
                    "or truncated",
                    path=path,
                ) from exc
            if index == 0:
                frame = ocr.exif_upright(frame)
            dpi = _dpi(image)
            out.append(ocr.ocr_page(frame, number=index + 1, limits=limits, dpi=dpi, path=path))
    kind = "image" if frames == 1 else "multipage-image"
    return pages.Document(pages=tuple(out), path=path, kind=kind)


def _dpi(image: Image.Image) -> float | None:
    value: Any = image.info.get("dpi")
    try:
        dpi = float(value[0]) if isinstance(value, tuple) else float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return dpi if 50 <= dpi <= 1200 else None
