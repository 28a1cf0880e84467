"""The document model: pages of positioned words, and the layout built from them.

Coordinates are in the page's own units (PDF points for a text layer, pixels for images
and OCR), with the origin at the top left and ``y`` growing downwards. A bounding box is
``(x0, y0, x1, y1)``.

Three levels, each built from the one before:

* `Word`: one token as read (a text layer's characters joined at spaces, one OCR word,
  or one piece of a caller's text line). ``line`` is the reader's line number: words
  with the same number were read as one line.
* `Segment`: words of one line with no wide gap between them: a phrase, a label, a value,
  a table cell.
* rows: segments that share a horizontal band across the page (a label and its value to
  the right, the cells of a table row), left to right.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

BBox = tuple[float, float, float, float]
PageSource = Literal["text", "ocr", "given"]

# A gap wider than this many average character widths splits a line into segments.
_SEGMENT_GAP_CHARS = 1.6
# ...and never a gap narrower than this share of the line's height.
_SEGMENT_GAP_MIN_HEIGHT = 0.45


@dataclass(frozen=True)
class Word:
    """One token with its box and the reader's confidence in it (0..1)."""

    text: str
    bbox: BBox
    confidence: float = 1.0
    line: int = -1


@dataclass(frozen=True)
class Segment:
    """A run of words on one line with no wide gap: a phrase, a label, a value, a cell."""

    text: str
    bbox: BBox
    words: tuple[Word, ...]
    page: int
    index: int

    @property
    def confidence(self) -> float:
        return min((w.confidence for w in self.words), default=1.0)

    @property
    def x0(self) -> float:
        return self.bbox[0]

    @property
    def y0(self) -> float:
        return self.bbox[1]

    @property
    def x1(self) -> float:
        return self.bbox[2]

    @property
    def y1(self) -> float:
        return self.bbox[3]

    @property
    def height(self) -> float:
        return max(self.bbox[3] - self.bbox[1], 1e-6)

    @property
    def cy(self) -> float:
        return (self.bbox[1] + self.bbox[3]) / 2

    @property
    def cx(self) -> float:
        return (self.bbox[0] + self.bbox[2]) / 2


def union(boxes: Iterable[BBox]) -> BBox:
    """The smallest box holding all of ``boxes``."""
    items = list(boxes)
    if not items:
        return (0.0, 0.0, 0.0, 0.0)
    return (
        min(b[0] for b in items),
        min(b[1] for b in items),
        max(b[2] for b in items),
        max(b[3] for b in items),
    )


def _join(words: Sequence[Word]) -> str:
    return " ".join(w.text for w in words)


def _char_width(words: Sequence[Word]) -> float:
    chars = sum(len(w.text) for w in words)
    width = sum(w.bbox[2] - w.bbox[0] for w in words)
    return width / chars if chars else 0.0


@dataclass(frozen=True)
class Page:
    """One page: its size, its words, and where they came from."""

    number: int
    width: float
    height: float
    words: tuple[Word, ...]
    source: PageSource = "text"
    notes: tuple[str, ...] = ()

    @cached_property
    def lines(self) -> tuple[tuple[Word, ...], ...]:
        """Words grouped into lines (the reader's lines when it gave them), each left to
        right, top to bottom."""
        given: dict[int, list[Word]] = {}
        loose: list[Word] = []
        for word in self.words:
            if not word.text.strip():
                continue
            if word.line >= 0:
                given.setdefault(word.line, []).append(word)
            else:
                loose.append(word)
        lines = [sorted(ws, key=lambda w: w.bbox[0]) for ws in given.values()]
        lines.extend(_cluster_lines(loose))
        lines.sort(key=lambda ws: (min(w.bbox[1] for w in ws), min(w.bbox[0] for w in ws)))
        return tuple(tuple(ws) for ws in lines)

    @cached_property
    def segments(self) -> tuple[Segment, ...]:
        """Every segment of the page, top to bottom."""
        out: list[Segment] = []
        for line in self.lines:
            for run in _split_line(line):
                out.append(
                    Segment(
                        text=_join(run),
                        bbox=union(w.bbox for w in run),
                        words=tuple(run),
                        page=self.number,
                        index=len(out),
                    )
                )
        return tuple(out)

    @cached_property
    def rows(self) -> tuple[tuple[Segment, ...], ...]:
        """Segments grouped by shared horizontal band, each row left to right."""
        return group_rows(self.segments)

    @cached_property
    def line_height(self) -> float:
        """The median height of the page's segments (the body text size)."""
        heights = [s.height for s in self.segments]
        return statistics.median(heights) if heights else 10.0

    def text(self) -> str:
        return "\n".join("  ".join(s.text for s in row) for row in self.rows)


def group_rows(segments: Iterable[Segment]) -> tuple[tuple[Segment, ...], ...]:
    """Group segments whose vertical extents overlap by at least half of the smaller one."""
    rows: list[list[Segment]] = []
    bands: list[tuple[float, float]] = []
    for seg in sorted(segments, key=lambda s: (s.cy, s.x0)):
        placed = False
        for i in range(len(rows) - 1, max(-1, len(rows) - 4), -1):
            top, bottom = bands[i]
            overlap = min(bottom, seg.y1) - max(top, seg.y0)
            if overlap >= 0.5 * min(seg.height, bottom - top) and not _collides(rows[i], seg):
                rows[i].append(seg)
                # The band follows the row's median, so a tall segment does not swallow
                # the next line.
                bands[i] = (
                    statistics.median(s.y0 for s in rows[i]),
                    statistics.median(s.y1 for s in rows[i]),
                )
                placed = True
                break
        if not placed:
            rows.append([seg])
            bands.append((seg.y0, seg.y1))
    ordered = sorted(rows, key=lambda r: statistics.median(s.cy for s in r))
    return tuple(tuple(sorted(r, key=lambda s: s.x0)) for r in ordered)


def _collides(row: Sequence[Segment], seg: Segment) -> bool:
    """A segment that overlaps one already in the row horizontally is another line."""
    return any(s.x0 < seg.x1 - 1e-6 and seg.x0 < s.x1 - 1e-6 for s in row)


def _cluster_lines(words: Sequence[Word]) -> list[list[Word]]:
    """Lines from words with no reader line numbers: by vertical overlap."""
    lines: list[list[Word]] = []
    for word in sorted(words, key=lambda w: ((w.bbox[1] + w.bbox[3]) / 2, w.bbox[0])):
        cy = (word.bbox[1] + word.bbox[3]) / 2
        for line in reversed(lines[-3:]):
            top = statistics.median(w.bbox[1] for w in line)
            bottom = statistics.median(w.bbox[3] for w in line)
            if top <= cy <= bottom:
                line.append(word)
                break
        else:
            lines.append([word])
    return [sorted(line, key=lambda w: w.bbox[0]) for line in lines]


def _split_line(line: Sequence[Word]) -> list[list[Word]]:
    """Split one line where the gap between words is wide (label | value, cells)."""
    if not line:
        return []
    char_w = _char_width(line)
    height = statistics.median(w.bbox[3] - w.bbox[1] for w in line)
    limit = max(_SEGMENT_GAP_CHARS * char_w, _SEGMENT_GAP_MIN_HEIGHT * height)
    runs: list[list[Word]] = [[line[0]]]
    for prev, word in zip(line, line[1:], strict=False):
        gap = word.bbox[0] - prev.bbox[2]
        if gap > limit:
            runs.append([word])
        else:
            runs[-1].append(word)
    return runs


BoxLike = Sequence[float]
WordInput = tuple[str, BoxLike] | tuple[str, BoxLike, float]


@dataclass(frozen=True)
class Document:
    """A read document: its pages, where it came from and what the reader noted."""

    pages: tuple[Page, ...]
    path: str | None = None
    kind: str = "words"
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def from_words(
        cls,
        words: Iterable[WordInput],
        width: float,
        height: float,
        *,
        path: str | None = None,
    ) -> Document:
        """A one-page document from text already recognised: ``[(text, (x0, y0, x1, y1)),
        ...]`` with an optional third item, the confidence (0..1).

        Each item is one line (or one phrase) as read; it is split into words, each given
        its share of the box in proportion to its characters.
        """
        out: list[Word] = []
        for number, item in enumerate(words):
            text = str(item[0])
            box = item[1]
            if len(box) != 4:
                raise ValueError(f"word {number}: a box is (x0, y0, x1, y1), got {box!r}")
            confidence = float(item[2]) if len(item) > 2 else 1.0
            x0, y0, x1, y1 = (float(v) for v in box)
            x0, x1 = min(x0, x1), max(x0, x1)
            y0, y1 = min(y0, y1), max(y0, y1)
            out.extend(_spread(text, (x0, y0, x1, y1), confidence, number))
        page = Page(number=1, width=float(width), height=float(height), words=tuple(out))
        return cls(pages=(replace_source(page, "given"),), path=path, kind="words")

    def text(self) -> str:
        return "\n\f".join(p.text() for p in self.pages)


def replace_source(page: Page, source: PageSource) -> Page:
    return Page(page.number, page.width, page.height, page.words, source, page.notes)


def _spread(text: str, box: BBox, confidence: float, line: int) -> list[Word]:
    """Words of ``text`` with boxes spread over ``box`` in proportion to their length."""
    tokens = text.split()
    if not tokens:
        return []
    x0, y0, x1, y1 = box
    total = len(" ".join(tokens))
    per_char = (x1 - x0) / total if total else 0.0
    out: list[Word] = []
    pos = 0
    for token in tokens:
        start = x0 + pos * per_char
        end = start + len(token) * per_char
        out.append(Word(token, (start, y0, end, y1), confidence, line))
        pos += len(token) + 1
    return out
