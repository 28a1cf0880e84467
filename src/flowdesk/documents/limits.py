"""What the document reader refuses, so that no input can crash or hang it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Limits and settings for reading one document.

    Attributes:
        max_bytes: the largest file read at all.
        max_pages: the most pages (PDF pages, TIFF frames) a document may have; a longer
            one is refused before any page is read.
        max_pixels: the most pixels one page image may have, checked from the image
            header before anything is decoded (a decompression bomb is refused without
            being expanded). PDF pages are rendered at a lower resolution when
            ``ocr_dpi`` would exceed it.
        ocr_timeout: seconds Tesseract may spend on one page.
        ocr_dpi: the resolution scanned PDF pages are rendered at for OCR.
        ocr_languages: Tesseract languages, ``+``-joined; the ones not installed are
            dropped (English must be there).
        ocr_binarise: hand Tesseract a black-and-white image (Sauvola's local threshold)
            instead of the cleaned grey one.
    """

    max_bytes: int = 100 * 1024 * 1024
    max_pages: int = 50
    max_pixels: int = 40_000_000
    ocr_timeout: float = 60.0
    ocr_dpi: int = 300
    ocr_languages: str = "eng+deu+fra"
    ocr_binarise: bool = False

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pages", "max_pixels", "ocr_dpi"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive")
        if self.ocr_timeout <= 0:
            raise ValueError("Limits.ocr_timeout must be positive")


DEFAULT_LIMITS = Limits()
