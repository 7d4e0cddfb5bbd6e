"""Privacy at inference: the detectors validate_data uses, applied to prompts and answers as deploy.privacy says."""

from __future__ import annotations

import pytest

from llmops.governance import pii
from llmops.governance.privacy import HOLD_CHARS, Privacy

PHONE = "+44 20 7946 0958"
EMAIL = "jane.doe@example.com"


@pytest.mark.parametrize("text, regions, found", [
    ("call 020 7946 0958", ("GB",), True),  # national format: read in the regions given
    ("call 020 7946 0958", ("US",), False),
    ("call (415) 555-0100", ("US",), True),
    (f"call {PHONE}", ("US",), True),  # international format: recognised whatever the regions
    ("call +49 30 901820", ("US", "GB"), True),
    ("What is 12345 + 67890?", ("DE", "FR"), False),
    ("What is 98765 * 12?", ("US", "GB"), False),
    ("order 555-0100-99 shipped", ("US", "GB"), False),
])
def test_phone_numbers_are_decided_by_libphonenumber(text, regions, found):
    assert pii.contains("phone", text, regions) is found


def test_modes():
    text = f"mail {EMAIL} or call {PHONE}"
    mask, refuse, log = Privacy("mask"), Privacy("refuse"), Privacy("log")
    assert mask.found(text) == ["email", "phone"]
    assert mask.prompt(text) == "mail [EMAIL] or call [PHONE]" and mask.answer(text) == "mail [EMAIL] or call [PHONE]"
    assert refuse.prompt(text) == text and refuse.answer(text) == "mail [EMAIL] or call [PHONE]"
    assert log.prompt(text) == text and log.answer(text) == text
    assert {p.for_log(text) for p in (mask, refuse, log)} == {"mail [EMAIL] or call [PHONE]"}
    only_email = Privacy("mask", kinds=("email",))
    assert only_email.answer(text) == f"mail [EMAIL] or call {PHONE}"
    assert only_email.for_log(text) == "mail [EMAIL] or call [PHONE]"  # the log masks every kind, always


@pytest.mark.parametrize("size", [1, 3, 7, 50])
def test_a_streamed_answer_is_masked_whole_however_it_is_split(size):
    text = ("Sure. " + "x" * 150 + f" Reach Jane at {EMAIL}, or by phone on {PHONE}; card 4111 1111 1111 1111. "
            + "y" * 300 + " Bye.")
    stream = Privacy("mask").stream()
    out, released_early = [], 0
    for i in range(0, len(text), size):
        piece = stream.push(text[i:i + size])
        out.append(piece)
        released_early += len(piece)
    out.append(stream.finish())
    assert "".join(out) == Privacy("mask").answer(text)
    assert EMAIL not in "".join(out) and "7946" not in "".join(out) and "1111" not in "".join(out)
    assert released_early >= len(Privacy("mask").answer(text)) - HOLD_CHARS - 10  # held back, not buffered whole
    assert stream.raw == text  # what the log gets, to mask again


def test_a_streamed_answer_passes_unchanged_when_the_policy_logs_only():
    stream = Privacy("log").stream()
    assert stream.push(f"call {PHONE}") == f"call {PHONE}" and stream.finish() == ""
