from __future__ import annotations

import functools
import multiprocessing
import re

import pytest

from llmops.governance import pii


@pytest.mark.parametrize(
    "text, kind",
    [
        ("mail jane.doe+x@mail.example.co.uk today", "email"),
        ("call +1 415 555 0100", "phone"),
        ("call (415) 555-0100", "phone"),
        ("call 020 7946 0958", "phone"),
        ("call 020 7946 0958.", "phone"),  # at a sentence's end
        ("GET /callback?phone=4155550100", "phone"),
        ("card 4111 1111 1111 1111", "card"),
        ("card 5500-0000-0000-0004", "card"),
        ("card 378282246310005", "card"),
        ("host 192.168.0.12 is up", "ip"),
        # internationalised addresses (RFC 6531), and a punycode domain
        ("mail jürgen.müller@bücher.de today", "email"),
        ("mail 用户@例子.广告", "email"),
        ("mail info@xn--bcher-kva.xn--tckwe now", "email"),
        ("pay to DE89 3704 0044 0532 0130 00 NOW", "iban"),  # a capitalised word after it joins the match: trimmed
        ("IBAN GB82WEST12345698765432.", "iban"),
        ("my SSN is 123-45-6789", "ssn"),
        ("my SSN is 123 45 6789", "ssn"),
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
        "The total is 134 * 150 = <<134*150=20100>>20100, so 20700 - 20100 = <<20700-20100=600>>600.",  # GSM8K
        "His profit is 14400-10800=$<<14400-10800=3600>>3600.",
        "The garden has 20000-12000 = <<20000-12000=8000>>8000 left.",
        "A profit of $2920000000 - $360,000.",
        "365 days * $8,000,000 = $<<365*8000000=2920000000>>2,920,000,000",
        "Convert 3 kilometers to meters.",
        "order 4111 1111 1111 1112",  # fails Luhn: not a card
        "version 1.2.3.4.5",
        "999.1.1.1",
        "someone at example dot com",
        "account DE00 3704 0044 0532 0130 00",  # a wrong IBAN check digit
        "the part number is AB12CDEF34567890",  # IBAN-shaped, no country's IBAN
        "ticket 000-12-3456, room 666-12-3456, lot 123-00-4567",  # never assigned as SSNs
        "batch 123-45-678",
    ],
)
def test_leaves_ordinary_text_alone(text):
    assert not any(pii.contains(k, text) for k in pii.PATTERNS)
    assert pii.mask(text) == text


def test_luhn():
    assert pii.luhn_valid("79927398713") and not pii.luhn_valid("79927398710")


def test_overlong_local_part_is_still_flagged():
    # the pattern bounds the local part at 64 characters (RFC 5321): a longer one
    # matches from 64 characters before the "@", so the address is still caught
    text = "mail " + "x" * 200 + "@example.com now"
    assert pii.contains("email", text)
    assert re.search(pii.PATTERNS["email"], text)
    assert "@example.com" not in pii.mask(text)


# No input can hang the pipeline. Each generator below makes about 2 MB of text
# aimed at a detector's weak spot: long runs of what a pattern repeats, with what
# it needs next missing, so a backtracking pattern retries the run from every
# start. Linear detectors take under a second on each; the old email pattern
# (`[...]+@...`) was quadratic: 40k characters of "a" took 4.5 s, 2 MB hours.
ADVERSARIAL_CHARS = 2_000_000
TIME_LIMIT_S = 5.0  # generous for a loaded 2-core CI machine, hours below quadratic


def _repeat(unit: str):
    return lambda n: (unit * (n // len(unit) + 1))[:n]


ADVERSARIAL = {
    "letters": _repeat("a"),  # one local-part run with no "@" (the case)
    "digits": _repeat("1"),  # a run for card, phone and ip, and a local part too
    "a_dot": _repeat("a."),  # local part or dotted labels, no "@"
    "a_at": _repeat("a@"),  # an "@" everywhere, never a domain with a TLD
    "at_a_dot": _repeat("@a."),
    "a_dot_at": _repeat("a.a.a.a@"),  # several starts reach each "@"
    # up to 64 starts reach each "@", each rescans a domain that has no TLD
    "local_at_short_labels": _repeat("a" * 64 + "@" + "1." * 200),
    "local_at_long_labels": _repeat("a" * 64 + "@" + ("1" * 63 + ".") * 12 + " "),
    "digit_space": _repeat("1 "),  # card matches back to back, each Luhn-checked
    "digit_dash": _repeat("1-"),
    "paren_digits": lambda n: "(" + "1" * (n - 1),  # an area code that never closes
    "phone_near_miss": _repeat("+123 (1234) 123 "),
    "ip_prefix": _repeat("255.255.255."),  # three octets, and the fourth never ends
    "cards": _repeat("4111 1111 1111 1111 "),  # every match passes Luhn: many spans to mask
    "iban_groups": _repeat("DE89 3704 0044 0532 0130 00 "),  # valid IBANs back to back
    "iban_near_miss": _repeat("DE00 1234 5678 9012 3456 7890 1234 "),  # each candidate trimmed group by group
    "ssn_like": _repeat("123-45-6789-"),
}


@functools.cache
def _adversarial(name: str) -> str:
    return ADVERSARIAL[name](ADVERSARIAL_CHARS)


def _finishes_in_time(work) -> None:
    """Run `work` in a forked child and fail if it is still running at the limit.

    A regex scan seldom lets Python handle signals (an alarm at 1 s stopped the old
    email scan after 23 s) and a thread cannot stop it: a regression would hang the
    test run instead of failing it.
    """
    child = multiprocessing.get_context("fork").Process(target=work)
    child.start()
    child.join(TIME_LIMIT_S)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail(f"still running after {TIME_LIMIT_S} s on {ADVERSARIAL_CHARS} characters")
    assert child.exitcode == 0


@pytest.mark.parametrize("name", list(ADVERSARIAL))
@pytest.mark.parametrize("kind", list(pii.PATTERNS))
def test_detector_runs_in_linear_time(kind, name):
    text = _adversarial(name)
    _finishes_in_time(lambda: pii.find(kind, text))
    # the raw pattern as Great Expectations runs it (pandas str.contains: re.search)
    _finishes_in_time(lambda: re.search(pii.PATTERNS[kind], text))


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_mask_runs_in_linear_time(name):
    text = _adversarial(name)
    _finishes_in_time(lambda: pii.mask(text))
