"""Where received documents are kept: a folder addressed by content.

A document's id is the SHA-256 of its bytes, so storing the same file twice keeps one copy,
and an id names exactly one content forever (a review task can point at it, an auditor can
recompute it). Files are written to a temporary name and renamed into place, so a crash
never leaves half a document under a valid id.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from flowdesk.errors import FlowdeskError

_ID = re.compile(r"[0-9a-f]{64}")

MEDIA_TYPES = {
    ".pdf": "application/pdf",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".tiff": "image/tiff",
    ".bin": "application/octet-stream",
}

_SNIFF = (
    (b"%PDF", ".pdf"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"II*\x00", ".tiff"),
    (b"MM\x00*", ".tiff"),
)


class UnknownDocument(FlowdeskError):
    """No document with this id is in the archive."""


def suffix_of(data: bytes) -> str:
    """The file suffix that the bytes' signature names (``.bin`` when none does)."""
    head = data[:1024].lstrip()
    for magic, suffix in _SNIFF:
        if head.startswith(magic):
            return suffix
    return ".bin"


class Archive:
    """Documents by content id under ``root`` (created on first use)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def put(self, data: bytes) -> str:
        """Keep ``data``; returns its id (the same id for the same bytes)."""
        doc_id = hashlib.sha256(data).hexdigest()
        target = self._folder(doc_id) / (doc_id + suffix_of(data))
        if target.exists():
            return doc_id
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return doc_id

    def path(self, doc_id: str) -> Path:
        """The file holding document ``doc_id``; `UnknownDocument` when there is none."""
        if not _ID.fullmatch(doc_id):
            raise UnknownDocument(f"{doc_id!r} is not a document id (64 hex digits)")
        for found in self._folder(doc_id).glob(doc_id + ".*"):
            return found
        raise UnknownDocument(f"no document {doc_id} in the archive at {self.root}")

    def read(self, doc_id: str) -> bytes:
        return self.path(doc_id).read_bytes()

    def media_type(self, doc_id: str) -> str:
        return MEDIA_TYPES.get(self.path(doc_id).suffix, "application/octet-stream")

    def _folder(self, doc_id: str) -> Path:
        return self.root / doc_id[:2]
