"""PII redaction: what is found, placeholders, restoring, and properties (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stdnum import iban, luhn

from flowdesk import errors
from flowdesk.models import pii

REDACTOR = pii.Redactor(phone_regions=["US", "DE", "GB"])

SAMPLES = {
    "email": "jane.doe+billing@example.co.uk",
    "iban": "DE89 3704 0044 0532 0130 00",
    "card": "4111 1111 1111 1111",
    "us_ssn": "536-90-4399",
    "phone": "+1 415-555-2671",
    "fr_nir": "2 95 10 99 126 111 93",
    "de_idnr": "36 574 261 809",
    "nl_bsn": "111222333",
}


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_each_kind_is_found_replaced_counted_and_restored(kind):
    value = SAMPLES[kind]
    text = f"Customer wrote: {value}. Please help."
    red = REDACTOR.redact(text)
    assert value not in red.text
    token = f"<{kind.upper()}_1>"
    assert red.text == f"Customer wrote: {token}. Please help."
    assert red.counts == {kind: 1}
    assert red.placeholders == {token: value}
    assert red.restore(red.text) == text


def test_invalid_lookalikes_are_left_alone():
    text = (
        "order 4111 1111 1111 1112, ref DE00 3704 0044 0532 0130 00, code 000-12-3456, "
        "tax 36 574 261 808, call 12, mail me@localhost"
    )
    red = REDACTOR.redact(text)
    assert red.text == text
    assert red.counts == {}


def test_same_value_gets_the_same_placeholder_and_counts_every_occurrence():
    text = "a@x.org wrote to b@x.org, then a@x.org again"
    red = REDACTOR.redact(text)
    assert red.text == "<EMAIL_1> wrote to <EMAIL_2>, then <EMAIL_1> again"
    assert red.counts == {"email": 3}


def test_placeholders_already_in_the_text_are_never_issued_or_restored():
    text = "literal <EMAIL_1> and <PHONE_9> stay; real: x@y.io"
    red = REDACTOR.redact(text)
    assert red.text == "literal <EMAIL_1> and <PHONE_9> stay; real: <EMAIL_2>"
    assert red.restore(red.text) == text
    # A model answer that mentions only the literal token gets nothing restored into it.
    assert red.restore("see <EMAIL_1>") == "see <EMAIL_1>"
    assert red.restore("reply to <EMAIL_2> (<CARD_1>)") == "reply to x@y.io (<CARD_1>)"


def test_restore_puts_values_back_only_where_placeholders_appear():
    red = REDACTOR.redact("Refund IBAN DE89370400440532013000 for 536-90-4399")
    assert red.text == "Refund IBAN <IBAN_1> for <US_SSN_1>"
    answer = "I will refund <IBAN_1>."
    assert red.restore(answer) == "I will refund DE89370400440532013000."


def test_kinds_can_be_limited_and_unknown_kinds_are_refused():
    only_email = pii.Redactor(kinds=["email"])
    red = only_email.redact("x@y.io 4111111111111111")
    assert red.text == "<EMAIL_1> 4111111111111111"
    with pytest.raises(errors.ConfigurationError, match="Unknown PII kinds"):
        pii.Redactor(kinds=["emails"])


# -- properties ---------------------------------------------------------------------------

FILLER = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40
)  # any text, surrogates excluded (not encodable)


@st.composite
def valid_ibans(draw: st.DrawFn) -> str:
    country, length = draw(
        st.sampled_from([("DE", 18), ("NL", 14), ("GB", 18), ("FR", 23), ("ES", 20)])
    )
    if country == "NL":
        bban = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=4, max_size=4)) + draw(
            st.text("0123456789", min_size=10, max_size=10)
        )
    elif country == "GB":
        bban = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=4, max_size=4)) + draw(
            st.text("0123456789", min_size=14, max_size=14)
        )
    else:
        bban = draw(st.text("0123456789", min_size=length, max_size=length))
    number = country + iban.calc_check_digits(country + "00" + bban) + bban
    if not iban.is_valid(number):  # a BBAN with a national checksum (FR, ES) may fail
        number = "DE89370400440532013000"
    if draw(st.booleans()):
        number = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    return number


@st.composite
def valid_cards(draw: st.DrawFn) -> str:
    body = draw(st.sampled_from("3456")) + draw(st.text("0123456789", min_size=11, max_size=17))
    number = body + luhn.calc_check_digit(body)
    sep = draw(st.sampled_from(["", " ", "-"]))
    if sep:
        number = sep.join(number[i : i + 4] for i in range(0, len(number), 4))
    return number


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(FILLER, st.emails(), valid_ibans(), valid_cards()), max_size=6))
def test_redact_then_restore_gives_back_the_text(parts):
    text = " ".join(parts)
    red = REDACTOR.redact(text)
    assert red.restore(red.text) == text
    assert sum(red.counts.values()) >= len(red.placeholders)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(FILLER, min_size=1, max_size=4),
    st.lists(st.one_of(st.emails(), valid_ibans(), valid_cards()), min_size=1, max_size=4),
    st.randoms(use_true_random=False),
)
def test_no_valid_email_iban_or_card_survives(fillers, secrets, rnd):
    parts = fillers + secrets
    rnd.shuffle(parts)
    text = " ".join(parts)
    red = REDACTOR.redact(text)
    for secret in secrets:
        assert secret not in red.text
        compact = secret.replace(" ", "").replace("-", "")
        if "@" not in secret:
            assert compact not in red.text
    assert red.restore(red.text) == text
