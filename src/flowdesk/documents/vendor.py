"""The vendor's name: the most prominent name-like line at the top of the first page.

A legal form (GmbH, Ltd, SARL, Sdn Bhd...) or a trade word (Trading, Restaurant...)
helps, so do a larger type and being printed again elsewhere (the footer, the sender
line); lines of the customer's address block, labels, titles, greetings and column
headers never count. A name printed over two lines is joined; a registration number or
a branch after the legal form is cut off. The lists are generic wording, not vendors.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

from flowdesk.documents import labels, locale, pages, tables
from flowdesk.documents import reading as rd

_LEGAL_FORMS = re.compile(
    r"(?<![\w])(gmbh|ag|kg|ohg|gbr|ug|e\.\s?k\.?|ltd\.?|limited|llc|llp|plc|inc\.?|corp\.?|"
    r"corporation|co\.|company|sarl|sas|s\.a\.?|sa|eurl|sasu|bv|b\.v\.|nv|n\.v\.|"
    r"sdn\.?\s?bhd\.?|bhd\.?|s/b|pty|oy|ab|a/s|srl|s\.r\.l\.|spa|s\.p\.a\.|teoranta|dac|"
    r"gmbh\s?&\s?co\.?\s?kg)(?![\w])",
    re.IGNORECASE,
)
_TRADE_WORDS = re.compile(
    r"(?<![\w])(enterprise|enterprises|trading|restaurant|restoran|store|stores|mart|"
    r"supermarket|hardware|pharmacy|bakery|cafe|services|consulting|industries|holdings|"
    r"group|shop|kedai|stationery|bookstore|electrical|motor|marketing|solutions|systems|"
    r"supplies|logistics|engineering)(?![\w])",
    re.IGNORECASE,
)
_ADDRESS_HINT = re.compile(
    r"(?<![\w])(street|st\.|road|rd\.?|avenue|ave\.?|lane|way|jalan|jln|taman|lot|no\.|"
    r"strasse|straße|str\.|weg|allee|platz|rue|avenue|boulevard|chemin|quai|place|"
    r"floor|flr|suite|p\.?o\.? box|tel|fax|phone|email|e-mail|www|http)(?![\w])",
    re.IGNORECASE,
)


def _bill_to_block(reading: rd.Reading, page: pages.Page) -> set[int]:
    """Segments of the customer's address block(s) on ``page``."""
    blocked: set[int] = set()
    h = page.line_height
    for seg in page.segments:
        size = labels.starts_with(seg.text, labels.BILL_TO)
        if not size:
            continue
        toks = labels.tokens(seg.text)
        if len(toks) > size + 6:
            continue
        blocked.add(seg.index)
        for other in page.segments:
            if other.index == seg.index:
                continue
            same_row = abs(other.cy - seg.cy) < 0.6 * max(h, seg.height) and other.x0 > seg.x1
            below = 0 <= other.y0 - seg.y1 <= 7 * h
            column = seg.x0 - 2 * h <= other.x0 <= seg.x0 + max(12 * h, seg.x1 - seg.x0)
            if (same_row and other.x0 - seg.x1 < 0.4 * page.width) or (below and column):
                blocked.add(other.index)
    return blocked


_REG_NUMBER_END = re.compile(
    r"(?:\s*\([^()]*\d[^()]*\)|[\s:]+\(?\d{4,}-?[A-Z]\)?|\s*\(\s*[0-9][0-9A-Za-z\-/ ]*)\s*$"
)


def _clean_name(text: str) -> str:
    """A name without what follows it on the line: a company registration number
    (``(65351-M)``, ``862725-U``, ``(CO. NO: 20154-T)``), a branch after the legal form."""
    text = text.strip()
    while True:
        cut = _REG_NUMBER_END.sub("", text)
        if cut == text:
            break
        text = cut
    forms = _legal_forms(text)
    if forms:
        rest = text[forms[-1].end() :].strip()
        if len(rest.split()) >= 2 and not _LEGAL_FORMS.search(rest):
            text = text[: forms[-1].end()]
    return text.strip(" :;,*|-·•")


def _legal_forms(name: str) -> list[re.Match[str]]:
    """Legal forms after the first word (``COMPANY NO: 123`` does not name a company)."""
    return [m for m in _LEGAL_FORMS.finditer(name) if name[: m.start()].strip()]


def _name_parts(seg: pages.Segment) -> list[str]:
    parts = re.split(r"\s+[·•|]\s+|\s+-\s+(?=\d)", seg.text)
    return [p for p in (part.strip() for part in parts) if p]


def find_vendor(reading: rd.Reading) -> rd.Candidate | None:
    if not reading.doc.pages:
        return None
    page = reading.doc.pages[0]
    segs = [s for s in page.segments if not reading.tables.covers(s)]
    if not segs:
        return None
    blocked = _bill_to_block(reading, page)
    used_values = {
        c.key[1]
        for name, cands in reading.candidates.items()
        if name != "vendor_name"
        for c in cands
        if c.key is not None and c.key[0] == page.number and c.score > 0.5
    }
    median_h = statistics.median(s.height for s in segs)
    rows = page.rows
    texts = Counter(_norm_name(p) for s in rd.all_segments(reading.doc) for p in _name_parts(s))
    excluded = blocked | used_values
    best: tuple[float, str, pages.Segment] | None = None
    for seg in segs:
        if seg.index in excluded or not _may_name(reading, seg):
            continue
        row_rank = reading.row_of.get((page.number, seg.index), len(rows))
        for n, part in enumerate(_name_parts(seg)):
            name = _clean_name(part)
            score = _name_score(name, seg, page, median_h, row_rank)
            if score is None:
                continue
            if n > 0:
                score -= 0.4
            if texts[_norm_name(name)] > 1:
                score += 0.35
            if best is None or score > best[0]:
                best = (score, name, seg)
    if best is None:
        return None
    score, name, seg = best
    name, box = _extend_name(reading, page, seg, name, excluded)
    confidence = max(0.2, min(0.95, 0.3 + 0.35 * score)) * (0.6 + 0.4 * seg.confidence)
    return rd.Candidate("vendor_name", name, confidence, seg.page, box, "layout")


def _may_name(reading: rd.Reading, seg: pages.Segment) -> bool:
    """Not a label, a greeting, a title or a row of column headers."""
    hit = reading.hits.get((seg.page, seg.index))
    if hit is not None and (hit.strength >= 0.6 or hit.field in ("ignore", "summary")):
        return False
    if labels.starts_with(seg.text, labels.CLOSINGS):
        return False
    return not tables.column_titles(seg.text)


def _unbalanced(name: str) -> bool:
    return name.count("(") != name.count(")")


def _extend_name(
    reading: rd.Reading, page: pages.Page, seg: pages.Segment, name: str, excluded: set[int]
) -> tuple[str, pages.BBox]:
    """Join a name printed over two lines: ``LIAN CHI PU TIAN VEGETARIAN`` above
    ``RESTAURANT SDN BHD``, or ``HOME MASTER HARDWARE &`` above ``ELECTRICAL``."""
    box = seg.bbox
    top = seg
    for _ in range(2):
        if not _fragment(name):
            break
        above = _neighbour_line(reading, page, top, excluded, above=True)
        if above is None:
            break
        name = f"{_clean_name(above.text)} {name}"
        box = pages.union((box, above.bbox))
        top = above
    open_end = name.rstrip().endswith(("&", "(", ",", "-")) or (_unbalanced(name) and "(" in name)
    if open_end or not _legal_forms(name):
        below = _neighbour_line(reading, page, seg, excluded, above=False)
        # A line below that holds the legal form (``SDN BHD``, ``GmbH``) finishes the name.
        if below is not None and (open_end or _fragment(_clean_name(below.text))):
            name = _clean_name(f"{name} {below.text}")
            box = pages.union((box, below.bbox))
    return name, box


def _fragment(name: str) -> bool:
    """The end of a name whose start is on the line above: a legal form with at most one
    word or a trade word before it, an opening ``&``, or a closing bracket."""
    stripped = name.lstrip()
    if stripped.startswith((")", "&")) or stripped[:1].islower():
        return True
    if _unbalanced(name) and ")" in name:
        return True
    if not _LEGAL_FORMS.search(name):
        return False
    core = _LEGAL_FORMS.sub(" ", name).replace("(M)", " ")
    words = [w for w in core.split() if any(ch.isalpha() for ch in w)]
    return len(words) <= 1 or bool(_TRADE_WORDS.fullmatch(words[0].strip("()")))


def _neighbour_line(
    reading: rd.Reading, page: pages.Page, seg: pages.Segment, excluded: set[int], *, above: bool
) -> pages.Segment | None:
    h = seg.height
    best: tuple[float, pages.Segment] | None = None
    for other in page.segments:
        if other is seg or other.index in excluded or not _may_name(reading, other):
            continue
        gap = seg.y0 - other.y1 if above else other.y0 - seg.y1
        if not -0.3 * h <= gap <= 0.9 * h:
            continue
        if not 0.65 <= other.height / h <= 1.5:
            continue
        overlap = min(other.x1, seg.x1) - max(other.x0, seg.x0)
        if overlap < 0.3 * min(other.x1 - other.x0, seg.x1 - seg.x0):
            continue
        digits = sum(ch.isdigit() for ch in other.text)
        if digits > 0.3 * max(1, len(other.text)) or _ADDRESS_HINT.search(other.text):
            continue
        if above and _LEGAL_FORMS.search(other.text):
            continue
        if best is None or gap < best[0]:
            best = (gap, other)
    return None if best is None else best[1]


def _norm_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", locale.fold(text))


def _name_score(
    name: str, seg: pages.Segment, page: pages.Page, median_h: float, row_rank: int
) -> float | None:
    letters = sum(ch.isalpha() for ch in name)
    if letters < 3 or len(name) > 80:
        return None
    digits = sum(ch.isdigit() for ch in name)
    if digits > 0.3 * len(name.replace(" ", "")):
        return None
    lowered = name.lower()
    if "@" in name or "www." in lowered or "http" in lowered or ".com" in lowered:
        return None
    if labels.is_exactly(name, labels.TITLES):
        return None
    hit = labels.match(name)
    if hit is not None and len(labels.tokens(name)) <= 3:
        return None
    lower_half = seg.y0 > 0.5 * page.height
    score = 0.0
    if _legal_forms(name):
        score += 0.5 if lower_half else 1.0
    elif _TRADE_WORDS.search(name):
        score += 0.45
    ratio = seg.height / median_h if median_h else 1.0
    score += min(0.8, max(0.0, (ratio - 1.0) * 0.8))
    score += max(0.0, 0.45 - 0.07 * row_rank)
    if seg.y0 < 0.2 * page.height:
        score += 0.2
    elif seg.y0 > 0.8 * page.height:
        score -= 0.1
    else:
        score -= 0.3
    if _ADDRESS_HINT.search(name) or re.search(r"\b\d{4,6}\b", name):
        score -= 0.6
    if sum(ch.isupper() for ch in name) > 0.8 * letters and letters > 30:
        score -= 0.2
    words = name.split()
    if len(words) == 1:
        score -= 0.2
    if words and words[0].lower().strip(".,:*") in _NOT_NAME_START:
        score -= 0.5
    return score


# A line that starts with one of these is a sentence, not a name.
_NOT_NAME_START = frozenset(
    "for to with from please our your all no not if when this these thank goods items "
    "pour avec merci bitte vielen wir sie".split()
)
