from __future__ import annotations

import pytest

from llmops import pii


@pytest.mark.parametrize(
    "text, kind",
    [
        ("mail jane.doe+x@mail.example.co.uk today", "email"),
        ("call +1 415 555 0100", "phone"),
        ("call (415) 555-0100", "phone"),
        ("call 020 7946 0958", "phone"),
        ("card 4111 1111 1111 1111", "card"),
        ("card 5500-0000-0000-0004", "card"),
        ("card 378282246310005", "card"),
        ("host 192.168.0.12 is up", "ip"),
    ],
)
def test_detects_each_kind_and_only_it(text, kind):
    assert {k for k in pii.PATTERNS if pii.contains(k, text)} == {kind}
    assert f"[{kind.upper()}]" in pii.mask(text)


@pytest.mark.parametrize(
    "text",
    [
        "What is 123 - 456?",
        "What is 98765 * 12?",
        "Convert 3 kilometers to meters.",
        "order 4111 1111 1111 1112",  # fails Luhn: not a card
        "version 1.2.3.4.5",
        "999.1.1.1",
        "someone at example dot com",
    ],
)
def test_leaves_ordinary_text_alone(text):
    assert not any(pii.contains(k, text) for k in pii.PATTERNS)
    assert pii.mask(text) == text


def test_luhn():
    assert pii.luhn_valid("79927398713") and not pii.luhn_valid("79927398710")
