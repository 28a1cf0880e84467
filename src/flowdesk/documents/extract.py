"""Invoice fields from a read document: layout-aware, multilingual, with confidences.

How a value is found, in order of trust:

1. **Labels.** Each segment that starts with a field's label (see `labels`) looks for its
   value in the rest of the segment (``Invoice No.: 4711``), then in the next segment to
   its right on the same row, then in the segment just below it (labels above values).
   A segment that is itself a label is never a value.
2. **Patterns.** The IBAN (checked with its checksum; common OCR confusions are tried
   when it fails) and the currency (ISO codes and symbols, counted over the document)
   need no label.
3. **Arithmetic.** Subtotal, tax and total are chosen together: of the labelled amounts,
   the combination where subtotal + tax = total (and the line items add up to the
   subtotal) wins, so a ``Total`` that is really a column header or a ``Net total``
   that means the pre-tax sum is put right.
4. **Layout.** The vendor is the most prominent name-like line at the top of the first
   page (a legal form such as GmbH, Ltd, SARL, Sdn Bhd helps; so does being printed
   again in the footer), never one in the customer's address block (see `vendor`).
   Line items come from tables read by column alignment (see `tables`).

Numbers and dates are read in the document's locale: the hint given, else what the
document shows (which decimal separator its amounts use; whether any date such as
``13/04/2025`` proves the day comes first; USD suggests month first).

Every field carries a confidence in 0..1; below `result.LOW_CONFIDENCE` it is flagged.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from stdnum import iban as stdnum_iban

from flowdesk.documents import labels, locale, pages, tables, vendor
from flowdesk.documents import limits as limits_mod
from flowdesk.documents import reading as rd
from flowdesk.documents import result as result_mod
from flowdesk.documents import validate as validate_mod

ID_FIELDS = ("invoice_number", "po_number", "vendor_tax_id")
DATE_FIELDS = ("invoice_date", "due_date")
AMOUNT_FIELDS = ("subtotal", "tax", "total")
CENT = Decimal("0.01")

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-/._]*[A-Za-z0-9]|[0-9]")
_TAX_ID_RE = re.compile(
    r"(?:[A-Z]{2,3}[-\s]?)?\d[\d\s.\-/]{4,18}\d(?:\s?[A-Z]{1,2}\b)?(?:\s?(?:MWST|TVA|IVA|VAT))?"
)
_IBAN_RE = re.compile(r"(?<![A-Z0-9])([A-Z]{2}\s?[0-9OISZBGDQ]{2}(?:\s?[A-Z0-9)|]){10,32})")
_PERCENT_RE = re.compile(r"[-+]?\d+(?:[.,]\d+)?\s?%")
_PUNCT_ONLY = re.compile(r"^[\W_]+$")


@dataclass(frozen=True)
class Options:
    locale: str | None = None
    checks: validate_mod.Checks | None = None


def extract_invoice(
    source: pages.Document | str | Path | bytes,
    *,
    locale: str | None = None,
    limits: limits_mod.Limits | None = None,
    checks: validate_mod.Checks | None = None,
) -> result_mod.Extraction:
    """Extract the invoice fields, line items and validation findings.

    ``source`` is a `Document` (e.g. from `Document.from_words`), a path, or the file's
    bytes. ``locale`` is the vendor's locale when known (``de_DE``, ``en_US``...): it
    decides ``03/04/2025`` and ``1.234``, and puts its language first for OCR. ``checks``
    adds the lookups of `validate` (duplicates, vendor master, purchase orders).

    Raises a `flowdesk.errors.DocumentError` when the file cannot be read; a document
    that reads but is not an invoice gives a result whose validation says so.
    """
    hint = locale  # the parameter's name hides the locale module in this function
    if isinstance(source, pages.Document):
        doc = source
    else:
        from flowdesk.documents import load

        limits = _languages_for(limits or limits_mod.DEFAULT_LIMITS, hint)
        doc = load.load_document(source, limits=limits)
    return extract_from(doc, Options(locale=hint, checks=checks))


_TESSERACT_LANGUAGE = {"en": "eng", "de": "deu", "fr": "fra"}


def _languages_for(limits: limits_mod.Limits, hint: str | None) -> limits_mod.Limits:
    """Tesseract reads accents best when the document's language comes first: put the
    hinted locale's language first in ``ocr_languages``."""
    wanted = _TESSERACT_LANGUAGE.get(locale.locale_info(hint).language)
    langs = limits.ocr_languages.split("+")
    if wanted is None or wanted not in langs or langs[0] == wanted:
        return limits
    ordered = [wanted, *(lang for lang in langs if lang != wanted)]
    return dataclasses.replace(limits, ocr_languages="+".join(ordered))


def extract_from(doc: pages.Document, options: Options) -> result_mod.Extraction:
    reading = rd.Reading(doc=doc, info=locale.locale_info(options.locale))
    reading.decimal = reading.info.decimal or _infer_decimal(doc)
    reading.tables = tables.find(doc, reading.decimal)
    reading.currency = _find_currency(reading)
    reading.order = reading.info.date_order or _infer_order(reading)
    _index(reading)
    _labelled(reading)
    _iban(reading)
    chosen: dict[str, rd.Candidate | None] = {name: None for name in result_mod.FIELD_NAMES}
    chosen.update(_assign(reading))
    chosen.update(_amounts(reading))
    chosen["currency"] = reading.currency
    chosen["vendor_name"] = vendor.find_vendor(reading)
    if chosen["invoice_date"] is None:
        chosen["invoice_date"] = _first_date(reading, chosen)
    if chosen["due_date"] is None:
        chosen["due_date"] = _unlabelled_due_date(reading, chosen)
    if chosen["total"] is None:
        chosen["total"] = _largest_amount(reading)
    ibans = reading.candidates.get("iban", [])
    chosen["iban"] = max(ibans, key=lambda c: c.score) if ibans else None
    return _result(reading, chosen, options)


# -- document-level conventions ----------------------------------------------------------------
def _infer_decimal(doc: pages.Document) -> str | None:
    comma = point = 0
    for seg in rd.all_segments(doc):
        comma += len(re.findall(r"\d,\d{2}(?![\d.,])", seg.text))
        point += len(re.findall(r"\d\.\d{2}(?![\d.,])", seg.text))
    if comma > point:
        return ","
    if point > 0:
        return "."
    return None


def _infer_order(reading: rd.Reading) -> locale.DateOrder:
    votes: Counter[str] = Counter()
    for seg in rd.all_segments(reading.doc):
        for found in locale.find_dates(seg.text):
            if found.order_evidence in ("DMY", "MDY"):
                votes[found.order_evidence] += 1
    if votes["DMY"] != votes["MDY"]:
        return "DMY" if votes["DMY"] > votes["MDY"] else "MDY"
    if reading.currency is not None and reading.currency.value == "USD":
        return "MDY"
    return "DMY"


def _find_currency(reading: rd.Reading) -> rd.Candidate | None:
    weights: dict[str, float] = {}
    where: dict[str, pages.Segment] = {}
    explicit: set[str] = set()
    for seg in rd.all_segments(reading.doc):
        found = locale.currencies_in(seg.text)
        if not found:
            continue
        has_amount = any(a.decimals == 2 for a in locale.find_amounts(seg.text, reading.decimal))
        for code in found:
            weight = 4.0 if has_amount else 1.0
            if reading.tables.covers(seg):
                weight *= 0.25
            if re.search(rf"(?<![A-Za-z]){code}(?![A-Za-z])", seg.text):
                explicit.add(code)
            weights[code] = weights.get(code, 0.0) + weight
            where.setdefault(code, seg)
    hinted = reading.info.currency
    if not weights:
        if hinted:
            return rd.Candidate("currency", hinted, 0.5, 1, (0, 0, 0, 0), "locale")
        return None
    code = max(weights, key=lambda c: weights[c])
    # "$" alone says dollars, not which: the locale decides when it names a dollar.
    if code == "USD" and "USD" not in explicit and hinted and hinted.endswith("D"):
        code = hinted
    seg = where.get(code) or next(iter(where.values()))
    confidence = 0.95 if code in explicit else 0.85
    return rd.Candidate("currency", code, confidence, seg.page, seg.bbox, "pattern")


# -- labels and their values -------------------------------------------------------------------
def _index(reading: rd.Reading) -> None:
    for page in reading.doc.pages:
        for r, row in enumerate(page.rows):
            for seg in row:
                reading.row_of[(page.number, seg.index)] = r
        for seg in page.segments:
            if reading.tables.covers(seg):
                continue
            hit = labels.match(seg.text)
            if hit is not None:
                reading.hits[(page.number, seg.index)] = hit


def _is_label(reading: rd.Reading, seg: pages.Segment) -> bool:
    hit = reading.hits.get((seg.page, seg.index))
    if hit is None:
        return False
    rest = _rest(seg.text, hit)
    return hit.strength >= 0.7 or not rest


def _rest(text: str, hit: labels.LabelHit) -> str:
    return text[hit.end :].strip(" :.-#=/\t|")


def _right_of(reading: rd.Reading, page: pages.Page, seg: pages.Segment) -> list[pages.Segment]:
    row = page.rows[reading.row_of[(page.number, seg.index)]]
    out = []
    for other in row:
        if other.x0 < seg.x1 - 0.5 * seg.height or other is seg:
            continue
        if _PUNCT_ONLY.match(other.text):
            continue
        if _is_label(reading, other) or reading.tables.covers(other):
            break
        out.append(other)
        if len(out) == 2:
            break
    return out


def _below(reading: rd.Reading, page: pages.Page, seg: pages.Segment) -> pages.Segment | None:
    h = seg.height
    best: tuple[float, pages.Segment] | None = None
    for other in page.segments:
        if other is seg or other.y0 < seg.y1 - 0.3 * h:
            continue
        gap = other.y0 - seg.y1
        if gap > 1.6 * max(h, other.height):
            continue
        if min(other.x1, seg.x1 + h) - max(other.x0, seg.x0 - h) <= 0:
            continue
        distance = gap + 0.2 * abs(other.x0 - seg.x0)
        if best is None or distance < best[0]:
            best = (distance, other)
    if best is None:
        return None
    found = best[1]
    if _is_label(reading, found) or reading.tables.covers(found):
        return None
    return found


def _in_title_row(reading: rd.Reading, page: pages.Page, seg: pages.Segment) -> bool:
    row = page.rows[reading.row_of[(page.number, seg.index)]]
    titles = sum(1 for s in row if tables.column_titles(s.text) or tables.column_title(s.text))
    return titles >= 2


def _labelled(reading: rd.Reading) -> None:
    for page in reading.doc.pages:
        width = page.width or 1.0
        for seg in page.segments:
            hit = reading.hits.get((page.number, seg.index))
            if hit is None or hit.field in ("ignore", "iban", "summary"):
                continue
            rest = _rest(seg.text, hit)
            options: list[tuple[str, float, pages.Segment, str]] = []
            if rest:
                options.append((rest, 1.0, seg, "label"))
            if hit.strength >= 0.6:
                for n, right in enumerate(_right_of(reading, page, seg)):
                    gap = max(0.0, right.x0 - seg.x1)
                    score = 0.95 - 0.15 * min(1.0, gap / (0.5 * width)) - 0.1 * n
                    options.append((right.text, score, right, "label"))
            # The value is beside its label or, when nothing there reads as one, below it.
            if hit.strength >= 0.6 and not any(
                _parse(reading, hit.field, text, value_seg) for text, _, value_seg, _ in options
            ):
                below = _below(reading, page, seg)
                if below is not None:
                    # Under a column title in a row of titles, the value is a table cell.
                    position = 0.45 if _in_title_row(reading, page, seg) else 0.88
                    options.append((below.text, position, below, "label"))
            for text, position, value_seg, source in options:
                cand = _parse(reading, hit.field, text, value_seg)
                if cand is None:
                    continue
                value, quality, number = cand
                ocr = value_seg.confidence
                score = hit.strength * position * quality * (0.3 + 0.7 * ocr)
                reading.add(
                    rd.Candidate(
                        field=hit.field,
                        value=value,
                        score=score,
                        page=page.number,
                        bbox=value_seg.bbox if value_seg is not seg or not rest else seg.bbox,
                        source=source,
                        key=(page.number, value_seg.index, value),
                        number=number,
                    )
                )


def _parse(
    reading: rd.Reading, name: str, text: str, seg: pages.Segment
) -> tuple[str, float, Decimal | None] | None:
    """``(value, quality 0..1, number)`` of ``text`` read as field ``name``."""
    if name in ("invoice_number", "po_number"):
        return _parse_id(text)
    if name in DATE_FIELDS:
        found = locale.find_dates(text, reading.order)
        if not found:
            return None
        first = found[0]
        quality = 0.8 if first.ambiguous and reading.info.date_order is None else 1.0
        return first.value.isoformat(), quality, None
    if name in AMOUNT_FIELDS or name == "rounding":
        cleaned = _PERCENT_RE.sub(" ", text)
        amounts = locale.find_amounts(cleaned, reading.decimal)
        if not amounts:
            return None
        cents = [a for a in amounts if a.decimals == 2]
        chosen = (cents or amounts)[-1]
        if chosen.decimals == 0 and abs(chosen.value) >= 10_000_000:
            return None  # an id or a phone number, not an amount
        quality = 1.0 if chosen.decimals == 2 else 0.55
        if re.search(r"[A-Za-z]{4,}", cleaned[: chosen.start]) and name != "tax":
            quality *= 0.8
        value = chosen.value.quantize(CENT)
        return str(value), quality, value
    if name == "vendor_tax_id":
        return _parse_tax_id(text)
    return None


# VAT number prefixes (EU member states, the UK, Switzerland, Norway).
_VAT_PREFIXES = frozenset(
    "AT BE BG CY CZ DE DK EE EL ES FI FR GB HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK "
    "XI CH NO".split()
)
_LETTERS_FOR_DIGITS = {"0": "O", "1": "I", "5": "S", "8": "B", "2": "Z", "6": "G"}


def _parse_tax_id(text: str) -> tuple[str, float, Decimal | None] | None:
    upper = text.upper()
    m = _TAX_ID_RE.search(upper)
    if m is None:
        return None
    start, end = m.start(), m.end()
    value = upper[start:end]
    quality = 1.0
    # OCR reads the country prefix's letters as digits (1E for IE, DE0 for DEO...).
    before = upper[max(0, start - 2) : start]
    if len(before) == 2 and before.isalnum() and not before.isalpha():
        head = "".join(_LETTERS_FOR_DIGITS.get(ch, ch) for ch in before)
        if head in _VAT_PREFIXES:
            value = head + value
            quality = 0.8
    elif not value[:2].isalpha() and value[2:3].isalnum():
        head = "".join(_LETTERS_FOR_DIGITS.get(ch, ch) for ch in value[:2])
        if head in _VAT_PREFIXES:
            value = head + value[2:]
            quality = 0.8
    if value[:2] in _VAT_PREFIXES and len(value) > 2:
        # DEO74479912: a letter O among the digits is a zero.
        body = "".join("0" if ch == "O" else ch for ch in value[2:])
        if body != value[2:]:
            quality = min(quality, 0.85)
        value = value[:2] + body
    value = re.sub(r"\s+", " ", value).strip(" .-/")
    if sum(ch.isdigit() for ch in value) < 6:
        return None
    return value, quality, None


def _parse_id(text: str) -> tuple[str, float, Decimal | None] | None:
    text = text.strip().lstrip("#:").strip()
    for m in _ID_RE.finditer(text):
        token = m.group(0)
        if not any(ch.isdigit() for ch in token):
            if len(token) > 2 and labels.match(token) is None and token.isupper():
                continue
            continue
        if locale.find_dates(token):
            return None
        if re.fullmatch(r"\d{1,3}(?:[.,]\d{3})*[.,]\d{2}", token):
            return None  # an amount
        quality = 1.0 if len(token) >= 3 else 0.6
        return token, quality, None
    return None


def _assign(reading: rd.Reading) -> dict[str, rd.Candidate | None]:
    """Dates and identifiers: the best candidate each, one value used once."""
    names = (*ID_FIELDS, *DATE_FIELDS)
    pool = [c for name in names for c in reading.candidates.get(name, [])]
    pool.sort(key=lambda c: -c.score)
    chosen: dict[str, rd.Candidate | None] = {name: None for name in names}
    used: set[tuple[int, int, str]] = set()
    for cand in pool:
        if chosen[cand.field] is not None:
            continue
        if cand.key is not None and cand.key in used:
            continue
        chosen[cand.field] = cand
        if cand.key is not None:
            used.add(cand.key)
    # A PO number equal to the invoice number is the invoice number read twice.
    inv, po = chosen["invoice_number"], chosen["po_number"]
    if inv is not None and po is not None and inv.value == po.value:
        chosen["po_number"] = None
    return chosen


def _amounts(reading: rd.Reading) -> dict[str, rd.Candidate | None]:
    """Subtotal, tax and total, chosen together so that they add up."""
    items_sum = None
    items = reading.tables.items
    if items and all(i.amount is not None for i in items):
        items_sum = sum((i.amount for i in items if i.amount is not None), Decimal("0"))
    pools: dict[str, list[rd.Candidate | None]] = {}
    # "ROUNDED 177.20": a rounding label on a full amount is the rounded total.
    rounded_totals = [
        rd.Candidate("total", c.value, c.score * 0.7, c.page, c.bbox, c.source, c.key, c.number)
        for c in reading.candidates.get("rounding", [])
        if c.number is not None and abs(c.number) >= 1
    ]
    for name in AMOUNT_FIELDS:
        best: dict[Decimal | None, rd.Candidate] = {}
        extra = rounded_totals if name == "total" else []
        for cand in [*reading.candidates.get(name, []), *extra]:
            if cand.number is None:
                continue
            if cand.number not in best or cand.score > best[cand.number].score:
                best[cand.number] = cand
        ranked = sorted(best.values(), key=lambda c: -c.score)[:6]
        pools[name] = [*ranked, None]
    summaries = _summary_tops(reading)

    def after_summary(cand: rd.Candidate) -> bool:
        top = summaries.get(cand.page)
        return top is not None and cand.bbox[1] > top

    for name in AMOUNT_FIELDS:
        pools[name] = [
            rd.with_score(c, c.score * 0.5) if c is not None and after_summary(c) else c
            for c in pools[name]
        ]
    totals = [c for c in pools["total"] if c is not None and c.number is not None]
    top_total = max((c.number for c in totals if c.number is not None), default=None)
    main = [
        c
        for c in totals
        if not after_summary(c)
        and c.number is not None
        and top_total is not None
        and c.number >= top_total / 2
    ]
    last_total = max(main, key=lambda c: (c.page, c.bbox[1])) if main else None
    roundings = sorted(
        (c for c in reading.candidates.get("rounding", []) if c.number is not None),
        key=lambda c: -c.score,
    )
    small = [c for c in roundings if c.number is not None and abs(c.number) < 1]
    adjustment = small[0].number if small else None
    best_combo: tuple[float, tuple[rd.Candidate | None, ...]] | None = None
    for combo in itertools.product(pools["subtotal"], pools["tax"], pools["total"]):
        sub, tax, total = combo
        keys = [c.key for c in combo if c is not None]
        if len(keys) != len(set(keys)):
            continue
        score = sum(c.score for c in combo if c is not None)
        s = sub.number if sub is not None else None
        t = tax.number if tax is not None else None
        g = total.number if total is not None else None
        if s is not None and g is not None:
            adjusted = s + (t or Decimal(0)) + (adjustment or Decimal(0))
            # The adjustment's sign is often lost ("-RM0.02", "(0.02)"): either will do.
            flipped = adjusted - 2 * (adjustment or Decimal(0))
            if adjustment and min(abs(adjusted - g), abs(flipped - g)) <= Decimal("0.005"):
                score += 2.4  # the total after rounding is the amount to pay
            elif t is not None and abs(s + t - g) <= CENT:
                score += 2.0
            elif t is not None and abs(s + t - g) <= Decimal("0.05"):
                score += 1.0  # a rounding adjustment between them
            elif t is None and s == g:
                score += 0.3
            elif s > g:
                score -= 0.4  # a discount after the subtotal, or the wrong pair
        if t is not None and g is not None and t >= g and g > 0:
            score -= 0.6
        if items_sum is not None:
            if s is not None and abs(items_sum - s) <= Decimal("0.05"):
                score += 1.0
            elif s is None and t is None and g is not None and abs(items_sum - g) <= CENT:
                score += 0.5
        # Of several totals, the amount to pay is usually the last one printed (after
        # any rounding) and the largest.
        if g is not None and top_total is not None and g == top_total:
            score += 0.2
        if total is not None and last_total is not None and total.key == last_total.key:
            score += 0.3
        if best_combo is None or score > best_combo[0]:
            best_combo = (score, combo)
    chosen: dict[str, rd.Candidate | None] = {name: None for name in AMOUNT_FIELDS}
    if best_combo is None:
        return chosen
    sub, tax, total = best_combo[1]
    consistent = (
        sub is not None
        and total is not None
        and sub.number is not None
        and total.number is not None
        and abs(sub.number + (tax.number if tax and tax.number else Decimal(0)) - total.number)
        <= Decimal("0.05")
    )
    for name, picked in zip(AMOUNT_FIELDS, (sub, tax, total), strict=True):
        if picked is None:
            continue
        if consistent:
            picked = rd.with_score(picked, max(picked.score, 0.9) + 0.05)
        chosen[name] = picked
    return chosen


def _summary_tops(reading: rd.Reading) -> dict[int, float]:
    """Per page, where a tax summary table starts (its totals are per rate)."""
    tops: dict[int, float] = {}
    for (page_no, index), hit in reading.hits.items():
        if hit.field == "summary":
            seg = reading.doc.pages[page_no - 1].segments[index]
            tops[page_no] = min(tops.get(page_no, seg.y0), seg.y0)
    return tops


# -- patterns ----------------------------------------------------------------------------------
_OCR_DIGITS = {
    "O": "0",
    "D": "0",
    "Q": "0",
    "I": "1",
    "L": "1",
    "Z": "2",
    "S": "5",
    "B": "8",
    "G": "6",
    "T": "7",
}


def _iban(reading: rd.Reading) -> None:
    for seg in rd.all_segments(reading.doc):
        upper = seg.text.upper()
        for m in _IBAN_RE.finditer(upper):
            compact = re.sub(r"\s", "", m.group(1)).replace(")", "J").replace("|", "I")
            labelled = "IBAN" in upper[: m.start()] or _near_iban_label(reading, seg)
            found = _valid_prefix(compact)
            score = 0.97 if found else 0.0
            if found is None:
                found = _repair_iban(compact)
                score = 0.8 if found else 0.0
            if found is None and labelled:
                found = compact[:34]
                score = 0.35
            if found is None:
                continue
            if not labelled:
                score *= 0.9
            reading.add(
                rd.Candidate(
                    "iban",
                    found,
                    score * (0.6 + 0.4 * seg.confidence),
                    seg.page,
                    seg.bbox,
                    "pattern",
                )
            )


def _near_iban_label(reading: rd.Reading, seg: pages.Segment) -> bool:
    page = reading.doc.pages[seg.page - 1]
    row = page.rows[reading.row_of[(seg.page, seg.index)]]
    return any("IBAN" in other.text.upper() for other in row)


def _valid_prefix(compact: str) -> str | None:
    for length in range(min(34, len(compact)), 14, -1):
        candidate = compact[:length]
        if stdnum_iban.is_valid(candidate):
            return candidate
    return None


def _repair_iban(compact: str) -> str | None:
    """Try the usual OCR confusions (O for 0, I for 1, S for 5...) in the check digits and
    the numeric part, one or two at a time."""
    if len(compact) < 15:
        return None
    fixed_head = compact[:2] + "".join(_OCR_DIGITS.get(ch, ch) for ch in compact[2:4])
    body = compact[4:]
    spots = [i for i, ch in enumerate(body) if ch in _OCR_DIGITS]
    attempts: list[str] = [fixed_head + body]
    for i in spots:
        attempts.append(fixed_head + body[:i] + _OCR_DIGITS[body[i]] + body[i + 1 :])
    attempts.append(fixed_head + "".join(_OCR_DIGITS.get(ch, ch) for ch in body))
    for attempt in attempts:
        found = _valid_prefix(attempt)
        if found is not None:
            return found
    return None


# -- fallbacks ---------------------------------------------------------------------------------
def _first_date(reading: rd.Reading, chosen: dict[str, rd.Candidate | None]) -> rd.Candidate | None:
    taken = {c.value for c in chosen.values() if c is not None}
    for page in reading.doc.pages:
        for row in page.rows:
            for seg in row:
                if reading.tables.covers(seg):
                    continue
                for found in locale.find_dates(seg.text, reading.order):
                    value = found.value.isoformat()
                    if value in taken:
                        continue
                    return rd.Candidate(
                        "invoice_date",
                        value,
                        0.5 * (0.6 + 0.4 * seg.confidence),
                        page.number,
                        seg.bbox,
                        "pattern",
                    )
    return None


def _unlabelled_due_date(
    reading: rd.Reading, chosen: dict[str, rd.Candidate | None]
) -> rd.Candidate | None:
    """When the due date's label was unreadable: the one other date on the first page
    that falls after the invoice date by no more than 120 days (flagged for checking)."""
    issued = chosen.get("invoice_date")
    if issued is None or not reading.doc.pages:
        return None
    start = date.fromisoformat(issued.value)
    page = reading.doc.pages[0]
    found: dict[str, pages.Segment] = {}
    for seg in page.segments:
        if reading.tables.covers(seg):
            continue
        for hit in locale.find_dates(seg.text, reading.order):
            if start < hit.value <= start + timedelta(days=120):
                found.setdefault(hit.value.isoformat(), seg)
    if len(found) != 1:
        return None
    value, seg = next(iter(found.items()))
    return rd.Candidate(
        "due_date", value, 0.45 * (0.6 + 0.4 * seg.confidence), page.number, seg.bbox, "inferred"
    )


def _largest_amount(reading: rd.Reading) -> rd.Candidate | None:
    best: rd.Candidate | None = None
    for seg in rd.all_segments(reading.doc):
        if reading.tables.covers(seg):
            continue
        if not locale.currencies_in(seg.text):
            continue
        for amount in locale.find_amounts(_PERCENT_RE.sub(" ", seg.text), reading.decimal):
            if amount.decimals != 2:
                continue
            if best is None or (best.number is not None and amount.value > best.number):
                value = amount.value.quantize(CENT)
                best = rd.Candidate(
                    "total", str(value), 0.35, seg.page, seg.bbox, "pattern", number=value
                )
    return best


# -- output ------------------------------------------------------------------------------------
def _bbox(box: pages.BBox) -> list[float]:
    return [round(v, 1) for v in box]


def _field(cand: rd.Candidate | None) -> dict[str, Any]:
    if cand is None:
        return {
            "value": None,
            "confidence": 0.0,
            "page": None,
            "bbox": None,
            "low_confidence": False,
            "source": None,
        }
    confidence = round(max(0.0, min(1.0, cand.score)), 3)
    return {
        "value": cand.value,
        "confidence": confidence,
        "page": cand.page,
        "bbox": _bbox(cand.bbox),
        "low_confidence": confidence < result_mod.LOW_CONFIDENCE,
        "source": cand.source,
    }


def _plain(value: Decimal | None, cents: bool) -> str | None:
    if value is None:
        return None
    if cents:
        return str(value.quantize(CENT))
    text = f"{value.normalize():f}"
    return text


def _result(
    reading: rd.Reading, chosen: dict[str, rd.Candidate | None], options: Options
) -> result_mod.Extraction:
    doc = reading.doc
    items = [
        {
            "description": item.description,
            "quantity": _plain(item.quantity, cents=False),
            "unit_price": _plain(item.unit_price, cents=True),
            "amount": _plain(item.amount, cents=True),
            "confidence": item.confidence,
            "page": item.page,
            "bbox": _bbox(item.bbox),
            "low_confidence": item.confidence < result_mod.LOW_CONFIDENCE,
            "notes": list(item.notes),
        }
        for item in reading.tables.items
    ]
    notes = [*doc.notes]
    for page in doc.pages:
        notes.extend(f"page {page.number}: {note}" for note in page.notes)
    body: dict[str, Any] = {
        "fields": {name: _field(chosen.get(name)) for name in result_mod.FIELD_NAMES},
        "line_items": items,
        "validation": [],
        "document": {
            "path": doc.path,
            "kind": doc.kind,
            "pages": len(doc.pages),
            "ocr_pages": sum(1 for p in doc.pages if p.source == "ocr"),
            "locale": options.locale,
            "decimal_separator": reading.decimal,
            "date_order": reading.order,
            "notes": notes,
        },
    }
    issues: list[dict[str, str | None]] = []
    words = sum(len(p.words) for p in doc.pages)
    if words == 0:
        issues.append(
            validate_mod.issue(
                "no_text",
                None,
                "no text was found on any page (a blank page, or a scan too faint to read)",
                "error",
            )
        )
    elif _not_an_invoice(reading, chosen):
        issues.append(
            validate_mod.issue(
                "not_an_invoice",
                None,
                "no invoice number, no total and no line items were found: this does not "
                "look like an invoice",
                "error",
            )
        )
    issues.extend(validate_mod.validate(body, options.checks))
    body["validation"] = issues
    # Validate the shape once, at the boundary.
    model = result_mod.InvoiceExtraction.model_validate(body)
    return result_mod.Extraction(model.model_dump(mode="json"))


def _not_an_invoice(reading: rd.Reading, chosen: dict[str, rd.Candidate | None]) -> bool:
    total = chosen.get("total")
    labelled_total = total is not None and total.source != "pattern"
    strong = chosen.get("invoice_number") is not None or chosen.get("subtotal") is not None
    return not strong and not labelled_total and not reading.tables.items
