"""PII redaction: what the gateway does to text before it leaves for an external provider.

`Redactor.redact` finds personal data and replaces each distinct value with a numbered
placeholder (``<EMAIL_1>``, ``<PHONE_2>``, ``<IBAN_1>``...); the returned `Redaction`
keeps the placeholder -> value map in memory only, restores placeholders that come back
in a model's answer (`Redaction.restore`), and counts what it replaced by kind (the only
trace of it the gateway records: never the values).

What is found, and how it is validated (a candidate that fails validation stays):

==============  ============================================================================
kind            detection
==============  ============================================================================
``email``       an address ``local@domain.tld`` (RFC 5322 atext local part, DNS labels)
``iban``        2 letters, 2 check digits, up to 30 letters/digits (spaces allowed between
                groups), validated by ``stdnum.iban`` (country length and mod-97 checksum)
``card``        13 to 19 digits (single spaces or dashes between them), Luhn-valid
                (``stdnum.luhn``)
``us_ssn``      ``NNN-NN-NNNN``, validated by ``stdnum.us.ssn``
``phone``       numbers ``phonenumbers`` finds and judges valid for one of the configured
                regions (``+`` international numbers in any region)
``fr_nir``      French social security number (15 digits), ``stdnum.fr.nir``
``de_idnr``     German tax id (11 digits), ``stdnum.de.idnr``
``gb_nhs``      British NHS number (10 digits), ``stdnum.gb.nhs``
``nl_bsn``      Dutch citizen service number (9 digits), ``stdnum.nl.bsn``
==============  ============================================================================

Detectors run in that order, and a span that overlaps one already found is left to the
earlier detector. Digit-based ids are checksums, so an unrelated number sometimes passes
one (about 1 in 10 for Luhn and the 11-tests): redaction errs on the side of hiding.
A detector never uses a language model or an NLP pipeline; nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import phonenumbers
from stdnum import iban as std_iban
from stdnum import luhn
from stdnum.de import idnr
from stdnum.fr import nir
from stdnum.gb import nhs
from stdnum.nl import bsn
from stdnum.us import ssn

from flowdesk import errors

KINDS = (
    "email",
    "iban",
    "card",
    "us_ssn",
    "phone",
    "fr_nir",
    "de_idnr",
    "gb_nhs",
    "nl_bsn",
)

_DIGITS = frozenset("0123456789")
_ALNUM = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~.-"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_EMAIL = re.compile(rf"(?<![{_ATEXT}])[{_ATEXT}]+@{_LABEL}(?:\.{_LABEL})+")
_SSN = re.compile(r"(?<![0-9-])\d{3}-\d{2}-\d{4}(?![0-9-])")
_MASK = "\x00"
_PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*_[0-9]+>")


@dataclass(frozen=True, slots=True)
class Span:
    """``text[start:end]`` is personal data of ``kind``."""

    start: int
    end: int
    kind: str


@dataclass(frozen=True, slots=True)
class Redaction:
    """A redacted text, and what is needed to put the values back (kept in memory only)."""

    text: str
    placeholders: dict[str, str]  # placeholder -> original value
    counts: dict[str, int]  # kind -> number of values replaced (occurrences)

    def restore(self, text: str) -> str:
        """``text`` with every placeholder of this redaction replaced by its value; any
        other ``<...>`` token is left as it is."""
        if not self.placeholders or "<" not in text:
            return text
        return _PLACEHOLDER.sub(lambda m: self.placeholders.get(m.group(0), m.group(0)), text)


def _digit_spans(
    text: str, seps: str, lengths: range, valid: Callable[[str], bool]
) -> Iterator[tuple[int, int]]:
    """Spans of ``lengths`` ASCII digits (single ``seps`` characters allowed between two
    digits) that ``valid`` accepts. A span starts at a digit no digit precedes and ends at
    a digit no digit follows; from each start, the longest valid span wins."""
    n = len(text)
    i = 0
    while i < n:
        if text[i] not in _DIGITS or (i > 0 and text[i - 1] in _DIGITS):
            i += 1
            continue
        ends: list[tuple[int, str]] = []
        digits: list[str] = []
        j = i
        while j < n and len(digits) < lengths.stop - 1:
            c = text[j]
            if c in _DIGITS:
                digits.append(c)
                j += 1
                if (j >= n or text[j] not in _DIGITS) and len(digits) in lengths:
                    ends.append((j, "".join(digits)))
            elif c in seps and j + 1 < n and text[j + 1] in _DIGITS and text[j - 1] in _DIGITS:
                j += 1
            else:
                break
        for end, number in reversed(ends):
            if valid(number):
                yield i, end
                i = end
                break
        else:
            i += 1


def _iban_spans(text: str) -> Iterator[tuple[int, int]]:
    n = len(text)
    i = 0
    while i + 4 <= n:
        if not (
            text[i].isascii()
            and text[i].isalpha()
            and text[i + 1].isascii()
            and text[i + 1].isalpha()
            and text[i + 2] in _DIGITS
            and text[i + 3] in _DIGITS
            and (i == 0 or text[i - 1] not in _ALNUM)
        ):
            i += 1
            continue
        ends: list[tuple[int, str]] = []
        chars: list[str] = []
        j = i
        while j < n and len(chars) < 34:
            c = text[j]
            if c in _ALNUM:
                chars.append(c)
                j += 1
                if (j >= n or text[j] not in _ALNUM) and len(chars) >= 15:
                    ends.append((j, "".join(chars)))
            elif c == " " and j + 1 < n and text[j + 1] in _ALNUM:
                j += 1
            else:
                break
        for end, number in reversed(ends):
            if std_iban.is_valid(number):
                yield i, end
                i = end
                break
        else:
            i += 1


def _card_valid(number: str) -> bool:
    return number[0] != "0" and luhn.is_valid(number)


class Redactor:
    """Finds personal data in text and replaces it with placeholders.

    ``phone_regions`` are the ISO 3166 regions whose national phone formats count (numbers
    written with ``+`` and a country code are found whatever the region). ``kinds`` limits
    what is looked for (default: every kind in `KINDS`). Safe to share between tasks."""

    def __init__(
        self, *, phone_regions: Sequence[str] = ("US",), kinds: Sequence[str] | None = None
    ) -> None:
        unknown = sorted(set(kinds or ()) - set(KINDS))
        if unknown:
            raise errors.ConfigurationError(
                f"Unknown PII kinds {unknown}: use some of {', '.join(KINDS)}."
            )
        self.kinds = tuple(k for k in KINDS if kinds is None or k in kinds)
        self.phone_regions = tuple(r.upper() for r in phone_regions) or ("ZZ",)

    def _phone_spans(self, text: str) -> Iterator[tuple[int, int]]:
        for region in self.phone_regions:
            for match in phonenumbers.PhoneNumberMatcher(
                text, region, leniency=phonenumbers.Leniency.VALID
            ):
                yield match.start, match.end

    def _candidates(self, kind: str, text: str) -> Iterator[tuple[int, int]]:
        if kind == "email":
            if "@" in text:
                yield from (m.span() for m in _EMAIL.finditer(text))
        elif kind == "iban":
            yield from _iban_spans(text)
        elif kind == "card":
            yield from _digit_spans(text, " -", range(13, 20), _card_valid)
        elif kind == "us_ssn":
            yield from (m.span() for m in _SSN.finditer(text) if ssn.is_valid(m.group(0)))
        elif kind == "phone":
            yield from self._phone_spans(text)
        elif kind == "fr_nir":
            yield from _digit_spans(text, " ", range(15, 16), nir.is_valid)
        elif kind == "de_idnr":
            yield from _digit_spans(text, " ", range(11, 12), idnr.is_valid)
        elif kind == "gb_nhs":
            yield from _digit_spans(text, " -", range(10, 11), nhs.is_valid)
        elif kind == "nl_bsn":
            yield from _digit_spans(text, ".", range(9, 10), bsn.is_valid)

    def find(self, text: str) -> list[Span]:
        """Every span of personal data in ``text``, in text order, none overlapping."""
        taken: list[Span] = []
        scan = text
        for kind in self.kinds:
            found = [
                Span(start, end, kind)
                for start, end in self._candidates(kind, scan)
                if all(end <= s.start or start >= s.end for s in taken)
            ]
            for span in found:
                if all(span.end <= s.start or span.start >= s.end for s in taken):
                    taken.append(span)
                    # Later detectors see the span blanked out: a number next to it is
                    # then scanned on its own, not swallowed into a rejected overlap.
                    scan = scan[: span.start] + _MASK * (span.end - span.start) + scan[span.end :]
        return sorted(taken, key=lambda s: s.start)

    def redact(self, text: str) -> Redaction:
        """``text`` with each distinct value replaced by a placeholder of its kind.

        A placeholder that already occurs in ``text`` is never issued, so `restore` gives
        back exactly ``text``."""
        spans = self.find(text)
        if not spans:
            return Redaction(text, {}, {})
        by_value: dict[tuple[str, str], str] = {}
        placeholders: dict[str, str] = {}
        counts: dict[str, int] = {}
        numbers: dict[str, int] = {}
        parts: list[str] = []
        pos = 0
        for span in spans:
            value = text[span.start : span.end]
            token = by_value.get((span.kind, value))
            if token is None:
                n = numbers.get(span.kind, 0)
                while True:
                    n += 1
                    token = f"<{span.kind.upper()}_{n}>"
                    if token not in text:
                        break
                numbers[span.kind] = n
                by_value[(span.kind, value)] = token
                placeholders[token] = value
            counts[span.kind] = counts.get(span.kind, 0) + 1
            parts.append(text[pos : span.start])
            parts.append(token)
            pos = span.end
        parts.append(text[pos:])
        return Redaction("".join(parts), placeholders, counts)
