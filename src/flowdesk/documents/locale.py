"""Amounts, dates and currencies as printed in different locales.

Amounts: ``1,234.56`` and ``1.234,56``, ``1 234,56`` and ``1'234.56``, with or without a
currency symbol or code on either side, negative as ``-12.00``, ``12.00-`` or
``(12.00)``. A single separator followed by two digits is a decimal point; followed by
three digits it groups thousands unless the locale says it is the decimal separator.

Dates: ISO ``2025-03-04``; numeric day, month and year in any order the locale allows
(``04.03.2025``, ``03/04/2025``, ``4-3-25``); month names in English, German and French
(``4 March 2025``, ``March 4, 2025``, ``4. März 2025``, ``4 mars 2025``, ``04-MAR-25``).
``03/04/2025`` is resolved with the order given (from the vendor's locale, or what the
rest of the document shows); without one it is read day first and marked ambiguous.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Literal

DateOrder = Literal["DMY", "MDY", "YMD"]


@dataclass(frozen=True)
class LocaleInfo:
    """What a locale hint says about how numbers and dates are printed."""

    tag: str
    language: str
    decimal: str | None  # "." or ",", None when unknown
    date_order: DateOrder | None
    currency: str | None


_REGION_CURRENCY = {
    "US": "USD",
    "GB": "GBP",
    "UK": "GBP",
    "IE": "EUR",
    "DE": "EUR",
    "AT": "EUR",
    "FR": "EUR",
    "BE": "EUR",
    "NL": "EUR",
    "IT": "EUR",
    "ES": "EUR",
    "PT": "EUR",
    "FI": "EUR",
    "LU": "EUR",
    "CH": "CHF",
    "LI": "CHF",
    "CA": "CAD",
    "AU": "AUD",
    "NZ": "NZD",
    "IN": "INR",
    "JP": "JPY",
    "MY": "MYR",
    "SG": "SGD",
    "SE": "SEK",
    "NO": "NOK",
    "DK": "DKK",
    "PL": "PLN",
    "CZ": "CZK",
}
_MDY_REGIONS = {"US", "PH", "FM", "MH", "PW"}
_YMD_REGIONS = {"CN", "JP", "KR", "TW", "HU", "LT", "SE"}
# Regions that write 1,234.56 although their language may write 1.234,56.
_POINT_REGIONS = {"US", "GB", "UK", "IE", "CA", "AU", "NZ", "IN", "JP", "MY", "SG", "CH", "LI"}
_COMMA_LANGUAGES = {"de", "fr", "es", "it", "pt", "nl", "pl", "cs", "da", "sv", "fi", "nb", "ru"}


def locale_info(tag: str | None) -> LocaleInfo:
    """Read a locale hint such as ``de_DE``, ``en-US``, ``fr`` or ``de_CH``."""
    if not tag:
        return LocaleInfo("", "", None, None, None)
    parts = re.split(r"[-_.@]", tag.strip())
    language = parts[0].lower()
    region = parts[1].upper() if len(parts) > 1 and parts[1] else ""
    if region in _POINT_REGIONS:
        decimal: str | None = "."
    elif language in _COMMA_LANGUAGES or region:
        decimal = "," if language in _COMMA_LANGUAGES else "."
    elif language == "en":
        decimal = "."
    else:
        decimal = None
    if region in _MDY_REGIONS:
        order: DateOrder | None = "MDY"
    elif region in _YMD_REGIONS:
        order = "YMD"
    elif region or language in _COMMA_LANGUAGES:
        order = "DMY"
    else:
        order = None
    return LocaleInfo(tag, language, decimal, order, _REGION_CURRENCY.get(region))


# -- currencies ------------------------------------------------------------------------------
CURRENCY_CODES = frozenset(
    "EUR USD GBP CHF JPY CNY CAD AUD NZD SEK NOK DKK PLN CZK HUF RON BGN HRK INR SGD HKD "
    "MYR THB IDR PHP ZAR BRL MXN TRY RUB AED SAR ILS KRW TWD VND NGN KES EGP".split()
)
# Symbols and local spellings, longest first when matched.
CURRENCY_SYMBOLS: dict[str, str] = {
    "€": "EUR",
    "£": "GBP",
    "US$": "USD",
    "$": "USD",
    "¥": "JPY",
    "₹": "INR",
    "SFr.": "CHF",
    "Fr.": "CHF",
    "RM": "MYR",
    "zł": "PLN",
    "Kč": "CZK",
    "S$": "SGD",
    "A$": "AUD",
    "C$": "CAD",
    "R$": "BRL",
}
_SYMBOLS_SORTED = sorted(CURRENCY_SYMBOLS, key=len, reverse=True)
_CODE_RE = re.compile(r"(?<![A-Za-z])(" + "|".join(sorted(CURRENCY_CODES)) + r")(?![A-Za-z])")
_SYMBOL_RE = re.compile("|".join(re.escape(s) for s in _SYMBOLS_SORTED))


def currencies_in(text: str) -> list[str]:
    """The ISO 4217 codes named in ``text`` by code or symbol, in order of appearance."""
    found: list[tuple[int, str]] = []
    for m in _CODE_RE.finditer(text):
        found.append((m.start(), m.group(1)))
    for m in _SYMBOL_RE.finditer(text):
        symbol = m.group(0)
        before = text[m.start() - 1] if m.start() > 0 else " "
        after = text[m.end()] if m.end() < len(text) else " "
        if symbol[0].isalpha() and before.isalpha():
            continue  # inside a word: "ARMY", "Frage"
        if symbol[-1].isalpha() and after.isalpha():
            continue
        found.append((m.start(), CURRENCY_SYMBOLS[symbol]))
    return [code for _, code in sorted(found)]


# -- amounts ---------------------------------------------------------------------------------
_GROUP_CHARS = ".,'’ \u00a0\u202f"
_NUMBER_RE = re.compile(
    r"(?P<neg1>[-−–(])?\s?"
    r"(?P<num>"
    r"\d{1,3}(?:[.,'’]\d{3})+(?:[.,]\d{1,3})?"  # 1,234.56 1.234,56 1'234.56 1,234
    r"|\d{1,3}(?:[ \u00a0\u202f]\d{3})+,\d{2}"  # 1 234,56 (a space groups before a comma)
    r"|\d{1,3}(?:[\u00a0\u202f]\d{3})+(?:[.,]\d{2})?"  # no-break spaces always group
    r"|\d+(?:[.,]\d{1,3})?"
    r"|(?<![\d.,])[.,]\d{2}(?![\d])"  # .50, -.02
    r")"
    r"(?P<neg2>-|\))?"
)
# Where the comma is the decimal separator, "36 087.76" is 36087.76 read with a point for
# the comma (OCR does that): a space groups thousands before either mark.
_NUMBER_COMMA_RE = re.compile(
    _NUMBER_RE.pattern.replace(
        r"|\d{1,3}(?:[ \u00a0\u202f]\d{3})+,\d{2}", r"|\d{1,3}(?:[ \u00a0\u202f]\d{3})+[.,]\d{2}"
    )
)
_PREFIX_RE = re.compile(r"([A-Za-z$€£¥₹.]+)\s?$")


@dataclass(frozen=True)
class Amount:
    """A number found in text, where it was, and how sure the reading is."""

    value: Decimal
    start: int
    end: int
    decimals: int  # digits after the decimal separator (0 when none)
    grouped: bool  # thousands separators were used
    ambiguous: bool  # one separator and three digits after it, read without a locale


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def read_number(raw: str, decimal: str | None = None) -> tuple[Decimal, int, bool, bool] | None:
    """``(value, decimals, grouped, ambiguous)`` for a printed number, or None."""
    text = raw.strip()
    if not text or not any(ch.isdigit() for ch in text):
        return None
    seps = [(i, ch) for i, ch in enumerate(text) if ch in _GROUP_CHARS]
    if not seps:
        return Decimal(text), 0, False, False
    marks = {ch for _, ch in seps if ch in ".,"}
    ambiguous = False
    if len(marks) == 2:
        dec_pos, dec_char = max((i, ch) for i, ch in seps if ch in ".,")
    elif len(marks) == 1:
        mark = next(iter(marks))
        positions = [i for i, ch in seps if ch == mark]
        after = len(text) - positions[-1] - 1
        others = [i for i, ch in seps if ch != mark]
        if len(positions) > 1:
            dec_pos, dec_char = -1, ""
        elif others:
            # 1 234,56 or 1'234.56: a space or apostrophe groups, the mark is decimal.
            dec_pos, dec_char = positions[-1], mark
        elif after == 3:
            if decimal == mark:
                dec_pos, dec_char = positions[-1], mark
            else:
                dec_pos, dec_char = -1, ""
                ambiguous = decimal is None
        else:
            dec_pos, dec_char = positions[-1], mark
    else:
        dec_pos, dec_char = -1, ""
    if dec_pos >= 0:
        int_part, frac = text[:dec_pos], text[dec_pos + 1 :]
    else:
        int_part, frac = text, ""
    if not re.fullmatch(r"\d*", frac):
        return None
    # Thousands groups must be groups of three.
    groups = re.split(r"[.,'’ \u00a0\u202f]", int_part)
    if len(groups) > 1 and (any(len(g) != 3 for g in groups[1:]) or not 1 <= len(groups[0]) <= 3):
        return None
    grouped = len(groups) > 1
    if dec_char and dec_char in int_part:
        return None
    try:
        value = Decimal((_digits(int_part) or "0") + ("." + frac if frac else ""))
    except InvalidOperation:
        return None
    return value, len(frac), grouped, ambiguous


def find_amounts(text: str, decimal: str | None = None) -> list[Amount]:
    """Every number in ``text`` that reads as an amount, left to right."""
    out: list[Amount] = []
    pattern = _NUMBER_COMMA_RE if decimal == "," else _NUMBER_RE
    for m in pattern.finditer(text):
        num = m.group("num")
        start, end = m.start("num"), m.end("num")
        # A number glued to letters or to more digits (ids, dates, phone numbers) is not
        # an amount.
        before = text[start - 1] if start > 0 else " "
        after = text[end] if end < len(text) else " "
        if before.isalpha() and not _currency_prefix(text[:start]):
            continue
        if after.isalnum() and after not in "xX" and not _currency_suffix(text[end:]):
            continue
        if before in "/:#" or after in "/:":
            continue
        if before in "-." and start > 1 and text[start - 2].isdigit():
            continue
        if after in "-." and end + 1 < len(text) and text[end + 1].isdigit():
            continue
        parsed = read_number(num.strip(), decimal)
        if parsed is None:
            continue
        value, decimals, grouped, ambiguous = parsed
        negative = (m.group("neg1") in ("-", "−", "–") and _sign_attached(text, m)) or (
            m.group("neg1") == "(" and m.group("neg2") == ")"
        )
        if m.group("neg2") == "-" and m.group("neg1") is None:
            negative = True
        if negative:
            value = -value
        out.append(Amount(value, start, end, decimals, grouped, ambiguous))
    return out


def _currency_prefix(head: str) -> bool:
    m = _PREFIX_RE.search(head)
    if m is None:
        return False
    word = m.group(1).rstrip(".")
    return (
        word.upper() in CURRENCY_CODES
        or word in CURRENCY_SYMBOLS
        or word + "." in (CURRENCY_SYMBOLS)
    )


def _currency_suffix(tail: str) -> bool:
    m = re.match(r"[A-Za-z]+", tail)
    return m is not None and (m.group(0).upper() in CURRENCY_CODES or m.group(0) in ("RM",))


def _sign_attached(text: str, m: re.Match[str]) -> bool:
    """A minus counts when nothing but spaces or a currency sits before it."""
    start = m.start()
    return start == 0 or not text[start - 1].isalnum()


def parse_amount(text: str, decimal: str | None = None) -> Decimal | None:
    """The amount in ``text`` (the last one with decimals, else the last one)."""
    amounts = find_amounts(text, decimal)
    if not amounts:
        return None
    with_cents = [a for a in amounts if a.decimals == 2]
    return (with_cents or amounts)[-1].value


def format_amount(value: Decimal, decimal: str = ".", group: str = ",") -> str:
    """``1234.5`` as ``1,234.50`` (or with other separators)."""
    quantized = value.quantize(Decimal("0.01"))
    sign = "-" if quantized < 0 else ""
    whole, _, frac = f"{abs(quantized):f}".partition(".")
    parts: list[str] = []
    while len(whole) > 3:
        parts.insert(0, whole[-3:])
        whole = whole[:-3]
    parts.insert(0, whole)
    return f"{sign}{group.join(parts)}{decimal}{frac}"


# -- dates -----------------------------------------------------------------------------------
def fold(text: str) -> str:
    """Lower case without accents, one character for one: ``März`` -> ``marz``,
    ``Échéance`` -> ``echeance`` (positions in the result are positions in ``text``)."""
    return "".join(_fold_char(ch) for ch in text)


def _fold_char(ch: str) -> str:
    if ch.isascii():
        return ch.lower()
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    low = base.lower()
    return low if len(low) == 1 else ch.lower()[:1] or ch


_MONTHS: dict[str, int] = {}
for _num, _names in enumerate(
    [
        "january jan januar janner janvier janv",
        "february feb februar fevrier fev fevr",
        "march mar marz maerz mrz mars",
        "april apr avril avr",
        "may mai",
        "june jun juni juin",
        "july jul juli juillet juil",
        "august aug aout",
        "september sep sept septembre",
        "october oct okt oktober octobre",
        "november nov novembre",
        "december dec dez dezember decembre",
    ],
    start=1,
):
    for _name in _names.split():
        _MONTHS[_name] = _num

_MONTH_ALT = "|".join(sorted(_MONTHS, key=len, reverse=True))
_NUMERIC_DATE = re.compile(r"(?<![\d.,])(\d{1,4})\s?([./\-])\s?(\d{1,2})\s?\2\s?(\d{2,4})(?![\d])")
_DAY_MONTH_YEAR = re.compile(
    r"(?<!\d)(\d{1,2})(?:er|st|nd|rd|th)?\.?[\s\-/]*("
    + _MONTH_ALT
    + r")\.?,?[\s\-/]*(\d{4}|\d{2})(?!\d)"
)
_MONTH_DAY_YEAR = re.compile(
    r"(?<![a-z])(" + _MONTH_ALT + r")\.?[\s\-]*(\d{1,2})(?:st|nd|rd|th)?,?[\s\-]+(\d{4})(?!\d)"
)


@dataclass(frozen=True)
class FoundDate:
    """A date found in text."""

    value: date
    start: int
    end: int
    ambiguous: bool  # day and month could be swapped and no order said which
    order_evidence: DateOrder | None  # the order this printing proves (13/04: DMY)


def _year(text: str) -> int:
    year = int(text)
    if len(text) == 2:
        year += 2000 if year < 70 else 1900
    return year


def _make(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None


def find_dates(text: str, order: DateOrder | None = None) -> list[FoundDate]:
    """Every date in ``text``, left to right."""
    folded = fold(text)
    out: list[FoundDate] = []
    taken: list[tuple[int, int]] = []

    def add(found: FoundDate) -> None:
        if any(found.start < e and s < found.end for s, e in taken):
            return
        taken.append((found.start, found.end))
        out.append(found)

    for m in _DAY_MONTH_YEAR.finditer(folded):
        made = _make(_year(m.group(3)), _MONTHS[m.group(2)], int(m.group(1)))
        if made:
            add(FoundDate(made, m.start(), m.end(), False, None))
    for m in _MONTH_DAY_YEAR.finditer(folded):
        made = _make(_year(m.group(3)), _MONTHS[m.group(1)], int(m.group(2)))
        if made:
            add(FoundDate(made, m.start(), m.end(), False, None))
    for m in _NUMERIC_DATE.finditer(folded):
        a, sep, b, c = m.group(1), m.group(2), m.group(3), m.group(4)
        if len(a) == 4:  # 2025-03-04, 2025/03/04, 2025.03.04
            made = _make(int(a), int(b), int(c)) if len(c) <= 2 else None
            if made:
                add(FoundDate(made, m.start(), m.end(), False, "YMD"))
            continue
        if len(a) == 3 or len(c) == 3:
            continue
        x, y, year = int(a), int(b), _year(c)
        dmy = _make(year, y, x)
        mdy = _make(year, x, y)
        evidence: DateOrder | None = None
        if dmy and not mdy:
            evidence = "DMY"
        elif mdy and not dmy:
            evidence = "MDY"
        if order is None and sep == "." and evidence is None:
            evidence_order: DateOrder | None = "DMY"  # dotted dates are day first
        else:
            evidence_order = order
        if evidence_order == "MDY" or (order is None and sep == "/" and evidence == "MDY"):
            chosen = mdy or (dmy if evidence else None)
        else:
            chosen = dmy or (mdy if evidence else None)
        if chosen is None:
            continue
        ambiguous = evidence_order is None and dmy is not None and mdy is not None and dmy != mdy
        add(FoundDate(chosen, m.start(), m.end(), ambiguous, evidence))
    out.sort(key=lambda f: f.start)
    return out


def parse_date(text: str, order: DateOrder | None = None) -> date | None:
    """The first date in ``text``, or None."""
    found = find_dates(text, order)
    return found[0].value if found else None
