"""What the extractor learns about one document as it goes, shared by its parts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from flowdesk.documents import labels, locale, pages, tables


@dataclass(frozen=True)
class Candidate:
    """A possible value for a field, with where it came from and how good it looks."""

    field: str
    value: str
    score: float
    page: int
    bbox: pages.BBox
    source: str
    key: tuple[int, int, str] | None = None  # (page, segment, value): one use only
    number: Decimal | None = None


@dataclass
class Reading:
    """Everything learnt about one document while extracting from it."""

    doc: pages.Document
    info: locale.LocaleInfo
    decimal: str | None = None
    order: locale.DateOrder | None = None
    currency: Candidate | None = None
    tables: tables.Tables = field(default_factory=tables.Tables)
    hits: dict[tuple[int, int], labels.LabelHit] = field(default_factory=dict)
    row_of: dict[tuple[int, int], int] = field(default_factory=dict)
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, cand: Candidate) -> None:
        self.candidates.setdefault(cand.field, []).append(cand)


def all_segments(doc: pages.Document) -> Iterable[pages.Segment]:
    for page in doc.pages:
        yield from page.segments


def with_score(cand: Candidate, score: float) -> Candidate:
    return Candidate(
        cand.field,
        cand.value,
        min(score, 0.99),
        cand.page,
        cand.bbox,
        cand.source,
        cand.key,
        cand.number,
    )
