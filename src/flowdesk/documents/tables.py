"""Line-item tables, found by their header row and read by column alignment.

A header row has at least two column titles (``Description``, ``Qty``, ``Unit price``,
``Amount`` in any of the known wordings, see `labels.COLUMNS`), one of them a number
column. Below it, each number is put in the number column whose title it lines up with
(right edges for right-aligned numbers, left edges or centres otherwise) and text goes to
the description. A row with an amount starts an item; a row with text only, close below
an item, continues its description (wrapped lines). The table ends at a totals label
(``Subtotal``, ``Total``, ``MwSt.``...), at a wide vertical gap, or at the page end; a table
whose header is repeated on the next pages continues there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal

from flowdesk.documents import labels, locale, pages

NUMERIC_COLUMNS = ("qty", "price", "amount", "tax", "pos", "unknown")
CENT = Decimal("0.01")
_STOP_FIELDS = {"subtotal", "total", "tax", "ignore", "rounding", "summary"}
_NUMERIC_CELL = re.compile(
    r"^\s*(?:[A-Z]{3}\s?|[$€£¥]\s?|RM\s?)?[-(]?\d[\d.,'’\s\u00a0\u202f]*\)?\s?"
    r"(?:%|[A-Z]{3}|[$€£¥]|RM|[A-Z])?\s*$"
)


@dataclass(frozen=True)
class Column:
    kind: str
    x0: float
    x1: float

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2


@dataclass(frozen=True)
class Item:
    """One line item as read."""

    description: str | None
    quantity: Decimal | None
    unit_price: Decimal | None
    amount: Decimal | None
    page: int
    bbox: pages.BBox
    confidence: float
    notes: tuple[str, ...] = ()


@dataclass
class _Draft:
    description: list[str]
    numbers: dict[str, tuple[Decimal, str, pages.Segment]]
    page: int
    segments: list[pages.Segment]
    bottom: float

    def bbox(self) -> pages.BBox:
        return pages.union(s.bbox for s in self.segments)


@dataclass
class Tables:
    """Every line item of the document, and where the tables are (not field labels)."""

    items: list[Item] = field(default_factory=list)
    # page -> list of (y0, y1) bands covered by table headers and bodies
    regions: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    header_segments: set[tuple[int, int]] = field(default_factory=set)

    def covers(self, seg: pages.Segment) -> bool:
        if (seg.page, seg.index) in self.header_segments:
            return True
        return any(y0 - 1 <= seg.cy <= y1 + 1 for y0, y1 in self.regions.get(seg.page, []))


def _column_kind(text: str) -> list[tuple[str, int, int]]:
    """Column titles in a header cell: ``[(kind, first token, last token + 1)]``."""
    toks = labels.tokens(text)
    words = [t.text for t in toks]
    # Drop a currency or unit in brackets after the title: "Amount (EUR)", "Betrag €".
    while words and (words[-1].upper() in locale.CURRENCY_CODES or words[-1] in ("rm",)):
        words.pop()
    out: list[tuple[str, int, int]] = []
    i = 0
    while i < len(words):
        best: tuple[str, int] | None = None
        for kind, phrases in labels.COLUMNS.items():
            for phrase in phrases:
                n = len(phrase)
                if (best is None or n > best[1]) and _same(words[i : i + n], phrase):
                    best = (kind, n)
        if best is None:
            return []
        out.append((best[0], i, i + best[1]))
        i += best[1]
    return out


def _same(words: list[str], phrase: tuple[str, ...]) -> bool:
    """The words are the phrase, allowing the OCR slips `labels.similar` allows."""
    return len(words) == len(phrase) and all(
        labels.similar(w, p) for w, p in zip(words, phrase, strict=True)
    )


def column_title(text: str) -> bool:
    """``text`` is one column title (``Amount (RM)``, ``Qty``)."""
    return len(_column_kind(text)) == 1


def column_titles(text: str) -> bool:
    """``text`` is a row of column titles (``QTY  DESCRIPTION  PRICE  AMOUNT``)."""
    words = [t.text for t in labels.tokens(text)]
    if len(words) < 2:
        return False
    covered = 0
    titles = 0
    i = 0
    while i < len(words):
        longest = 0
        for phrases in labels.COLUMNS.values():
            for phrase in phrases:
                n = len(phrase)
                if n > longest and tuple(words[i : i + n]) == phrase:
                    longest = n
        if longest:
            covered += longest
            titles += 1
            i += longest
        else:
            i += 1
    return titles >= 2 and covered >= 0.6 * len(words)


def _header_columns(row: tuple[pages.Segment, ...]) -> list[Column] | None:
    columns: list[Column] = []
    unknown: list[Column] = []
    for seg in row:
        if not seg.text.strip():
            continue
        if any(a.decimals == 2 for a in locale.find_amounts(seg.text)):
            return None
        kinds = _column_kind(seg.text)
        if not kinds:
            # A header row holds titles only; short odd cells (a currency, "RM", or a
            # title the OCR garbled) are kept as columns of unknown kind.
            if len(seg.text.strip()) <= 7:
                unknown.append(Column("unknown", seg.x0, seg.x1))
                continue
            return None
        if len(kinds) == 1:
            columns.append(Column(kinds[0][0], seg.x0, seg.x1))
            continue
        toks = labels.tokens(seg.text)
        words = seg.words
        for kind, first, last in kinds:
            # Map token spans back to the segment's words by character offsets.
            start = toks[first].start
            end = toks[last - 1].end
            boxes = [w.bbox for w in _words_in(seg, start, end)] or [seg.bbox]
            box = pages.union(boxes) if words else seg.bbox
            columns.append(Column(kind, box[0], box[2]))
    titles = {c.kind for c in columns}
    numeric = titles & {"qty", "price", "amount"}
    if len(columns) < 2 or not numeric:
        return None
    if "desc" not in titles and len(numeric) < 2:
        return None
    if len(titles) != len(columns) and not _only_duplicate_amounts(columns):
        return None
    if len(unknown) > 1 or (unknown and len(columns) < 3):
        return None
    for col in unknown:
        columns.append(Column(_guess_kind(columns, col), col.x0, col.x1))
    return sorted(columns, key=lambda c: c.x0)


def _guess_kind(known: list[Column], col: Column) -> str:
    """The kind of a column whose title did not read: the number column the table lacks,
    if its position fits (quantity before the prices, amount last)."""
    kinds = {c.kind for c in known}
    desc = next((c for c in known if c.kind == "desc"), None)
    if desc is None or col.x0 < desc.x0:
        return "unknown"
    right_of = [c for c in known if c.x0 > col.x0]
    if "amount" not in kinds and not right_of:
        return "amount"
    if "qty" not in kinds and all(c.kind in ("price", "amount", "tax", "unit") for c in right_of):
        return "qty"
    if "price" not in kinds and "amount" in kinds and all(c.kind == "amount" for c in right_of):
        return "price"
    return "unknown"


def _only_duplicate_amounts(columns: list[Column]) -> bool:
    """ "Total" can be both a price-like and an amount column; keep the rightmost."""
    seen: dict[str, int] = {}
    for c in columns:
        seen[c.kind] = seen.get(c.kind, 0) + 1
    return all(n == 1 or kind in ("amount", "tax") for kind, n in seen.items())


def _words_in(seg: pages.Segment, start: int, end: int) -> list[pages.Word]:
    out = []
    pos = 0
    for word in seg.words:
        w_start, w_end = pos, pos + len(word.text)
        if w_start < end and start < w_end:
            out.append(word)
        pos = w_end + 1
    return out


def _is_numeric(text: str) -> bool:
    return bool(_NUMERIC_CELL.match(text)) and any(ch.isdigit() for ch in text)


def _nearest_numeric(columns: list[Column], seg: pages.Segment) -> Column | None:
    best: tuple[float, Column] | None = None
    for col in columns:
        if col.kind not in NUMERIC_COLUMNS:
            continue
        distance = min(abs(seg.x1 - col.x1), abs(seg.x0 - col.x0), abs(seg.cx - col.cx))
        overlap = min(seg.x1, col.x1) - max(seg.x0, col.x0)
        if overlap > 0:
            distance *= 0.5
        if best is None or distance < best[0]:
            best = (distance, col)
    return None if best is None else best[1]


def _text_column(columns: list[Column], seg: pages.Segment) -> Column | None:
    """The text column a text cell starts in: between its title's left edge and the next
    title's."""
    ordered = sorted(columns, key=lambda c: c.x0)
    slack = 0.6 * seg.height
    for n, col in enumerate(ordered):
        if col.kind not in ("desc", "code", "unit"):
            continue
        start = col.x0 - (2 * seg.height if n == 0 else slack)
        end = ordered[n + 1].x0 - slack if n + 1 < len(ordered) else float("inf")
        if start <= seg.x0 < end:
            return col
    return None


def _number(text: str, decimal: str | None) -> Decimal | None:
    cleaned = re.sub(r"%", "", text)
    found = locale.find_amounts(cleaned, decimal)
    if not found:
        return None
    return found[-1].value


def find(doc: pages.Document, decimal: str | None) -> Tables:
    """The line items of every table in ``doc``."""
    result = Tables()
    carried: list[Column] | None = None
    for page in doc.pages:
        rows = page.rows
        index = 0
        started_on_page = False
        while index < len(rows):
            header_row: tuple[pages.Segment, ...] = ()
            columns = _header_columns(rows[index])
            if columns is not None:
                header_row = rows[index]
                body_start = index + 1
                prev_bottom: float | None = max(s.y1 for s in header_row)
            elif (
                carried is not None
                and not started_on_page
                and _looks_like_item(rows[index], carried, decimal)
            ):
                # A table continued from the previous page without its header.
                columns = carried
                body_start = index
                prev_bottom = None
            else:
                index += 1
                continue
            for seg in header_row:
                result.header_segments.add((seg.page, seg.index))
            top = min(s.y0 for s in (header_row or rows[body_start]))
            end, drafts, reached_end = _read_body(
                page, rows, body_start, columns, decimal, prev_bottom
            )
            bottom = max((d.bottom for d in drafts), default=prev_bottom or top)
            result.regions.setdefault(page.number, []).append((top, bottom))
            result.items.extend(_finish(d) for d in drafts)
            carried = columns if reached_end or _near_page_end(page, bottom) else None
            started_on_page = True
            index = max(end, index + 1)
        if not started_on_page:
            carried = None
    return result


def _near_page_end(page: pages.Page, bottom: float) -> bool:
    """Only a footer (no totals) follows the table on its page: it may go on overleaf."""
    below = [s for s in page.segments if s.y0 > bottom + 0.5 * page.line_height]
    if len(below) > 12:
        return False
    for seg in below:
        hit = labels.match(seg.text)
        if hit is not None and hit.field in ("subtotal", "total", "tax"):
            return False
    return True


def _looks_like_item(
    row: tuple[pages.Segment, ...], columns: list[Column], decimal: str | None
) -> bool:
    amount_cols = [c for c in columns if c.kind == "amount"]
    if not amount_cols:
        return False
    numbers = [s for s in row if _is_numeric(s.text)]
    texts = [s for s in row if not _is_numeric(s.text)]
    if not numbers or not texts:
        return False
    col = _nearest_numeric(columns, numbers[-1])
    return col is not None and col.kind == "amount" and labels.match(texts[0].text) is None


def _read_body(
    page: pages.Page,
    rows: tuple[tuple[pages.Segment, ...], ...],
    start: int,
    columns: list[Column],
    decimal: str | None,
    prev_bottom: float | None,
) -> tuple[int, list[_Draft], bool]:
    """Items from ``rows[start:]``: ``(index after the table, drafts, ran to page end)``."""
    drafts: list[_Draft] = []
    line_h = page.line_height
    left = min(c.x0 for c in columns) - 3 * line_h
    i = start
    while i < len(rows):
        row = rows[i]
        top = min(s.y0 for s in row)
        if prev_bottom is not None and top - prev_bottom > 3.2 * line_h:
            return i, drafts, False
        inside = _split_cells([s for s in row if s.x1 >= left], columns)
        if not inside:
            i += 1
            continue
        numeric_cells = sum(1 for s in inside if _is_numeric(s.text))
        for seg in inside:
            hit = labels.match(seg.text)
            if hit is None or hit.field not in _STOP_FIELDS or hit.strength < 0.6:
                continue
            if _is_numeric(seg.text):
                continue
            text_col = _text_column(columns, seg)
            if text_col is None or text_col.kind != "desc" or numeric_cells < 2:
                return i, drafts, False
        if _header_columns(row) is not None:
            return i, drafts, False
        numbers: dict[str, tuple[Decimal, str, pages.Segment]] = {}
        texts: list[pages.Segment] = []
        for seg in inside:
            text_col = _text_column(columns, seg)
            in_desc = text_col is not None and text_col.kind == "desc"
            if _is_numeric(seg.text) and text_col is None:
                col = _nearest_numeric(columns, seg)
                value = _number(seg.text, decimal)
                if col is not None and value is not None and col.kind not in numbers:
                    numbers[col.kind] = (value, seg.text, seg)
                    continue
            if in_desc:
                texts.append(seg)
            elif text_col is None and seg.x1 < min(c.x0 for c in columns if c.kind != "desc"):
                texts.append(seg)
        has_amount = "amount" in numbers or "price" in numbers
        if has_amount:
            drafts.append(
                _Draft(
                    description=[" ".join(s.text for s in texts)] if texts else [],
                    numbers=numbers,
                    page=page.number,
                    segments=list(row),
                    bottom=max(s.y1 for s in row),
                )
            )
            prev_bottom = max(s.y1 for s in row)
        elif texts and drafts and top - drafts[-1].bottom < 1.6 * line_h and not numbers:
            drafts[-1].description.append(" ".join(s.text for s in texts))
            drafts[-1].segments.extend(texts)
            drafts[-1].bottom = max(s.y1 for s in texts)
            prev_bottom = drafts[-1].bottom
        elif not drafts and texts and not numbers:
            prev_bottom = max(s.y1 for s in row)  # a note or a group title before the items
        elif drafts and not has_amount and (numbers or texts):
            # Neither an item nor a continuation: the table is over.
            return i, drafts, False
        i += 1
    return i, drafts, True


def _split_cells(row: list[pages.Segment], columns: list[Column]) -> list[pages.Segment]:
    """Cut a segment that runs from a narrow left column (position, code) into the
    description, where the reader did not see the gap (``10 Shipping and handling``)."""
    desc = next((c for c in columns if c.kind == "desc"), None)
    if desc is None:
        return row
    out: list[pages.Segment] = []
    for seg in row:
        limit = desc.x0 - 0.6 * seg.height
        if seg.x0 >= limit or seg.x1 <= desc.x0 or len(seg.words) < 2:
            out.append(seg)
            continue
        head = [w for w in seg.words if w.bbox[2] <= desc.x0]
        tail = [w for w in seg.words if w.bbox[2] > desc.x0]
        if not head or not tail:
            out.append(seg)
            continue
        for part in (head, tail):
            out.append(
                pages.Segment(
                    text=" ".join(w.text for w in part),
                    bbox=pages.union(w.bbox for w in part),
                    words=tuple(part),
                    page=seg.page,
                    index=seg.index,
                )
            )
    return out


def _finish(draft: _Draft) -> Item:
    get = draft.numbers.get
    qty, price, amount = get("qty"), get("price"), get("amount")
    quantity, unit_price, total, confidence, notes = reconcile(
        qty[0] if qty else None,
        price[0] if price else None,
        amount[0] if amount else None,
        (qty[1] if qty else "", price[1] if price else "", amount[1] if amount else ""),
    )
    ocr = min((s.confidence for s in draft.segments), default=1.0)
    description = " ".join(d for d in draft.description if d).strip() or None
    if description is None:
        confidence *= 0.8
    return Item(
        description=description,
        quantity=quantity,
        unit_price=unit_price,
        amount=total,
        page=draft.page,
        bbox=draft.bbox(),
        confidence=round(confidence * (0.5 + 0.5 * ocr), 3),
        notes=tuple(notes),
    )


def _fits(q: Decimal, p: Decimal, a: Decimal) -> bool:
    return abs((q * p).quantize(CENT) - a) <= CENT


def _quantity_from(price: Decimal, amount: Decimal) -> Decimal | None:
    """The quantity with the fewest decimals that gives ``amount`` at ``price``."""
    if price <= 0 or amount <= 0:
        return None
    exact = amount / price
    for places in (0, 1, 2):
        guess = exact.quantize(Decimal(1).scaleb(-places))
        if guess > 0 and _fits(guess, price, amount):
            return guess.normalize()
    return None


def _price_from(quantity: Decimal, amount: Decimal) -> Decimal | None:
    if quantity <= 0:
        return None
    guess = (amount / quantity).quantize(CENT)
    return guess if _fits(quantity, guess, amount) else None


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _distance(a: str, b: str) -> int:
    """Edit distance between two digit strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def reconcile(
    quantity: Decimal | None,
    unit_price: Decimal | None,
    amount: Decimal | None,
    printed: tuple[str, str, str] = ("", "", ""),
) -> tuple[Decimal | None, Decimal | None, Decimal | None, float, list[str]]:
    """Make quantity x unit price = amount hold, changing the one value whose reading is
    most likely wrong (OCR drops a decimal comma, misreads a digit, loses a lone ``1``).

    Returns ``(quantity, unit_price, amount, confidence, notes)``.
    """
    q, p, a = quantity, unit_price, amount
    if q is not None and p is not None and a is not None:
        if _fits(q, p, a):
            return q, p, a, 0.97, []
        options: list[tuple[int, str, Decimal]] = []
        q2 = _quantity_from(p, a)
        if q2 is not None:
            options.append((_distance(_digits(printed[0]), _digits(f"{q2:f}")), "quantity", q2))
        p2 = _price_from(q, a) if q > 0 else None
        if p2 is not None:
            options.append((_distance(_digits(printed[1]), _digits(f"{p2:f}")), "unit_price", p2))
        a2 = (q * p).quantize(CENT)
        options.append((_distance(_digits(printed[2]), _digits(f"{a2:f}")), "amount", a2))
        options.sort(key=lambda o: (o[0], o[1] != "quantity"))
        cost, name, value = options[0]
        if cost > 2 and q2 is not None:
            cost, name, value = 0, "quantity", q2
        if cost > 2:
            return q, p, a, 0.45, ["quantity x unit price does not give the amount"]
        note = f"{name.replace('_', ' ')} read again from the other two columns"
        if name == "quantity":
            return value, p, a, 0.72, [note]
        if name == "unit_price":
            return q, value, a, 0.7, [note]
        return q, p, value, 0.65, [note]
    if q is None and p is not None and a is not None:
        q2 = _quantity_from(p, a)
        if q2 is not None:
            return q2, p, a, 0.8, ["quantity computed: amount / unit price"]
        return None, p, a, 0.6, []
    if p is None and q is not None and a is not None:
        p2 = _price_from(q, a)
        if p2 is not None:
            return q, p2, a, 0.75, ["unit price computed: amount / quantity"]
        return q, None, a, 0.6, []
    if a is None and q is not None and p is not None:
        return q, p, (q * p).quantize(CENT), 0.6, ["amount computed: quantity x unit price"]
    return q, p, a, 0.7 if a is not None else 0.4, []
