"""Amounts, dates and currencies in several locales (flowdesk.documents.locale)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowdesk.documents import locale


def amounts(text: str, decimal: str | None = None) -> list[str]:
    return [str(a.value) for a in locale.find_amounts(text, decimal)]


@pytest.mark.parametrize(
    ("text", "decimal", "expected"),
    [
        ("1.234,56", None, ["1234.56"]),
        ("1,234.56", None, ["1234.56"]),
        ("1 234,56 €", None, ["1234.56"]),
        ("1\u00a0234,56 €", None, ["1234.56"]),
        ("CHF 1'234.50", None, ["1234.50"]),
        ("$12,345,678.90", None, ["12345678.90"]),
        ("RM31.00", None, ["31.00"]),
        ("31.00RM", None, ["31.00"]),
        ("EUR 1.234,56", None, ["1234.56"]),
        ("(12.50)", None, ["-12.50"]),
        ("12.00-", None, ["-12.00"]),
        ("-5,00", None, ["-5.00"]),
        ("-.02", None, ["-0.02"]),
        ("1.234", None, ["1234"]),
        ("1.234", ".", ["1.234"]),
        ("1.234", ",", ["1234"]),
        ("1,5", None, ["1.5"]),
        # A comma-decimal document where the OCR read the comma as a point.
        ("36 087.76 €", ",", ["36087.76"]),
        ("36 087.76", ".", ["36", "87.76"]),
        # Dates, phone numbers and ids are not amounts.
        ("2025-03-04", None, []),
        ("07-355 2616", None, ["2616"]),
        ("INV2025", None, []),
    ],
)
def test_amounts_in_several_locales(text: str, decimal: str | None, expected: list[str]) -> None:
    assert amounts(text, decimal) == expected


def test_a_lone_three_digit_group_is_ambiguous_without_a_locale() -> None:
    (found,) = locale.find_amounts("1,234")
    assert found.value == Decimal("1234") and found.ambiguous
    (found,) = locale.find_amounts("1,234", ".")
    assert not found.ambiguous


@pytest.mark.parametrize(
    ("text", "order", "expected", "ambiguous"),
    [
        ("04.03.2025", None, date(2025, 3, 4), False),  # dotted dates are day first
        ("03/04/2025", None, date(2025, 4, 3), True),
        ("03/04/2025", "MDY", date(2025, 3, 4), False),
        ("03/04/2025", "DMY", date(2025, 4, 3), False),
        ("13/04/2025", "MDY", date(2025, 4, 13), False),  # 13 cannot be a month
        ("2025-03-04", None, date(2025, 3, 4), False),
        ("4 March 2025", None, date(2025, 3, 4), False),
        ("March 4, 2025", None, date(2025, 3, 4), False),
        ("4. März 2025", None, date(2025, 3, 4), False),
        ("1er mars 2025", None, date(2025, 3, 1), False),
        ("15 février 2024", None, date(2024, 2, 15), False),
        ("04-MAR-25", None, date(2025, 3, 4), False),
        ("25 DEC 2018", None, date(2018, 12, 25), False),
        ("Date: 12-01-18 10:00", "DMY", date(2018, 1, 12), False),
        ("Fällig am 15.04.2025", None, date(2025, 4, 15), False),
    ],
)
def test_dates_in_several_locales(
    text: str, order: locale.DateOrder | None, expected: date, ambiguous: bool
) -> None:
    (found,) = locale.find_dates(text, order)
    assert found.value == expected
    assert found.ambiguous is ambiguous


def test_a_date_that_proves_its_order() -> None:
    assert locale.find_dates("13/04/2025")[0].order_evidence == "DMY"
    assert locale.find_dates("04/13/2025")[0].order_evidence == "MDY"
    assert locale.find_dates("04/03/2025")[0].order_evidence is None
    assert locale.parse_date("31/02/2025") is None


@pytest.mark.parametrize(
    ("tag", "decimal", "order", "currency"),
    [
        ("en_US", ".", "MDY", "USD"),
        ("en-GB", ".", "DMY", "GBP"),
        ("de_DE", ",", "DMY", "EUR"),
        ("de_CH", ".", "DMY", "CHF"),
        ("fr", ",", "DMY", None),
        ("en_MY", ".", "DMY", "MYR"),
        (None, None, None, None),
    ],
)
def test_locale_hints(
    tag: str | None, decimal: str | None, order: str | None, currency: str | None
) -> None:
    info = locale.locale_info(tag)
    assert (info.decimal, info.date_order, info.currency) == (decimal, order, currency)


def test_currencies_by_code_and_symbol() -> None:
    text = "Total 12.00 € and USD 5 and RM 3 and Fr. 12, 1 234,56 EUR, £4"
    assert locale.currencies_in(text) == ["EUR", "USD", "MYR", "CHF", "EUR", "GBP"]
    assert locale.currencies_in("ARMY FORM") == []
    assert locale.currencies_in("Frage 12") == []


def test_fold_keeps_positions() -> None:
    text = "Fällig am Échéance"
    folded = locale.fold(text)
    assert folded == "fallig am echeance"
    assert len(folded) == len(text)


SEPARATORS = [(".", ","), (",", "."), (",", " "), (",", "\u00a0"), (".", "'")]


@settings(max_examples=300, deadline=None)
@given(
    cents=st.integers(min_value=0, max_value=10**11),
    separators=st.sampled_from(SEPARATORS),
    negative=st.booleans(),
)
def test_any_printed_amount_reads_back(
    cents: int, separators: tuple[str, str], negative: bool
) -> None:
    """An amount printed with any locale's separators reads back as itself, with the
    locale's decimal separator as the hint."""
    value = Decimal(cents) / 100 * (-1 if negative else 1)
    decimal, group = separators
    text = locale.format_amount(value, decimal=decimal, group=group)
    found = locale.find_amounts(f"Total: {text} EUR", decimal)
    assert [a.value for a in found] == [value.quantize(Decimal("0.01"))], text


@settings(max_examples=200, deadline=None)
@given(day=st.dates(min_value=date(1990, 1, 1), max_value=date(2060, 12, 31)))
def test_any_printed_date_reads_back(day: date) -> None:
    assert locale.parse_date(day.strftime("%d.%m.%Y")) == day
    assert locale.parse_date(day.strftime("%m/%d/%Y"), "MDY") == day
    assert locale.parse_date(day.strftime("%d/%m/%Y"), "DMY") == day
    assert locale.parse_date(day.isoformat()) == day
    assert locale.parse_date(f"{day.day} {day.strftime('%B')} {day.year}") == day
