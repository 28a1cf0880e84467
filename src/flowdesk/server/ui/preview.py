"""Page previews of archived documents, as PNG: PDF pages rendered with pdfium, image
pages (PNG, JPEG, each frame of a TIFF) scaled with Pillow.

A preview is about `WIDTH` pixels wide, whatever the page size; the UI places highlight
boxes over it in percentages of the page, so the picture's own size never matters. The
latest previews are kept in memory (a review page asks for the same page again when the
person comes back to it). Needs the ``documents`` extra (pypdfium2, Pillow).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import io

from flowdesk import errors
from flowdesk.documents import archive as archive_mod

WIDTH = 1100
MAX_PAGES = 200


# Rendering has threads of its own, so previews never queue behind slow work (OCR) that
# others sent to the event loop's default executor.
_rendering = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="flowdesk-previews")


class NoPreview(errors.NotFound):
    """The document has no such page, or it is not a PDF or an image."""


async def render_async(archive: archive_mod.Archive, doc_id: str, page: int) -> bytes:
    """`render`, in a rendering thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_rendering, render, archive, doc_id, page)


def render(archive: archive_mod.Archive, doc_id: str, page: int) -> bytes:
    """Page ``page`` (1-based) of document ``doc_id`` as a PNG."""
    if not 1 <= page <= MAX_PAGES:
        raise NoPreview(f"Page {page}: pages are numbered from 1 to {MAX_PAGES}.")
    return _cached(archive, doc_id, page)


@functools.lru_cache(maxsize=48)
def _cached(archive: archive_mod.Archive, doc_id: str, page: int) -> bytes:
    try:
        kind = archive.media_type(doc_id)
        data = archive.read(doc_id)
    except archive_mod.UnknownDocument as exc:
        raise NoPreview(str(exc)) from None
    except ValueError as exc:  # not an id of the archive's form
        raise NoPreview(f"No document {doc_id!r}: {exc}") from None
    if kind == "application/pdf":
        return _pdf_page(data, page, doc_id)
    if kind.startswith("image/"):
        return _image_page(data, page, doc_id)
    raise NoPreview(f"Document {doc_id} is {kind}: only PDFs and images have a preview.")


def _png(image: object) -> bytes:
    from PIL import Image

    assert isinstance(image, Image.Image)
    out = io.BytesIO()
    image.save(out, "PNG", optimize=False)
    return out.getvalue()


def _pdf_page(data: bytes, page: int, doc_id: str) -> bytes:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    try:
        if page > len(pdf):
            raise NoPreview(f"Document {doc_id} has {len(pdf)} page(s), not {page}.")
        sheet = pdf[page - 1]
        try:
            bitmap = sheet.render(scale=WIDTH / max(1.0, float(sheet.get_width())))
            return _png(bitmap.to_pil().convert("RGB"))
        finally:
            sheet.close()
    finally:
        pdf.close()


def _image_page(data: bytes, page: int, doc_id: str) -> bytes:
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as image:
        frames = getattr(image, "n_frames", 1)
        if page > frames:
            raise NoPreview(f"Document {doc_id} has {frames} page(s), not {page}.")
        frame = next(f for i, f in enumerate(ImageSequence.Iterator(image), 1) if i == page)
        picture = frame.convert("RGB")
        if picture.width > WIDTH:
            height = max(1, round(picture.height * WIDTH / picture.width))
            picture = picture.resize((WIDTH, height), Image.Resampling.LANCZOS)
        return _png(picture)
