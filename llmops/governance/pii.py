"""Detectors for personal data in free text: email, phone, payment card, IP address, IBAN, US social security number.

One set of detectors for training data (validate_data, through Great Expectations) and for
inference (the server's privacy policy, the request log). Email and IP are regexes that feed Great
Expectations' regex expectations directly. Card numbers and phone numbers are found by a regex and
then decided by a check: the Luhn checksum for cards, Google's libphonenumber metadata (the
`phonenumbers` package: real numbering plans, not a hand regex) for phones, python-stdnum for
IBANs (ISO 13616's mod-97 checksum and each country's length and format) and US social security
numbers (the SSA's unassigned areas, groups and serials), so the integers of arithmetic data and
order numbers are not flagged. validate_data runs those as a custom expectation. Email addresses may be
internationalised (RFC 6531: `jürgen@bücher.de`, a punycode `xn--` domain).
"""

from __future__ import annotations

import functools
import re

# No input may hang the pipeline: every pattern runs in time linear in the text.
# re.search tries a match at each position, so each try must do bounded work: no
# unbounded repetition that runs to the end of a long separator-free run (the old
# email `[...]+@` did: quadratic, 40k characters took seconds, a 50 MB row days)
# and no overlapping quantifiers to backtrack through. phone, ip and card were
# already bounded ({2,4}, {3}, {12,18}, ...); the Luhn post-filter only sees card
# matches of at most 37 characters.
#
# email, bounded by the standards (RFC 5321, RFC 1035):
# - local part at most 64 characters. A longer one is still flagged: the match
#   starts 64 characters before the "@" (the rest of it stays unmasked);
# - domain labels at most 63 characters, the TLD 2 to 63 letters;
# - at most 10 labels. The match ends at the last label that starts with 2 letters,
#   so this only misses a domain whose 2nd to 10th labels all start with a digit or
#   are 1 letter; it caps how far each of the (up to 64) starts before an "@"
#   rescans the domain. The RFC's cap, 127 labels, is 4x slower on adversarial text.
# The possessive `{m,n}+` (Python >= 3.11) never gives characters back: "@" cannot
# follow a shorter local part, nor "." a shorter label, so backtracking into them
# could only fail again, up to 63 times per label.
PATTERNS: dict[str, str] = {
    # (\w is Unicode's letters and digits: internationalised addresses; a TLD of letters, or punycode's xn--)
    "email": r"[\w.%+-]{1,64}+@[\w-]{1,63}+(?:\.[\w-]{1,63}+){0,8}\.(?:xn--[A-Za-z0-9-]{1,59}|[^\W\d_]{2,63})",
    # candidates only (2 to 5 digit groups, an optional +country code and (area code)); phonenumbers decides.
    # Digits after a currency sign, before an arithmetic one or right after a sum's "=" are money or arithmetic, not a
    # number to dial: GSM8K's "<<20700-20100=600>>" reads as a valid London number (020 7002 0100), "$2920000000" and
    # "8000000=2920000000" as US ones ("phone=4155550100" is still a phone). A full stop ends a number ("call 020
    # 7946 0958."); one before a digit makes it a decimal or a version.
    "phone": r"(?<![\w.+$])(?<!\d[ -])(?<![\d)]=)(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]?\d{2,5}){1,4}"
             r"(?!\w|\.\d|[ -]\d| ?[=+*/])",
    "ip": r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])",
    # 13 to 19 digits, optionally grouped by single spaces or dashes; Luhn decides.
    "card": r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])",
    # a country code, 2 check digits, then the account: compact, or in groups of 4 as printed; stdnum decides
    "iban": r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)(?![A-Za-z0-9])",
    # area-group-serial, with dashes or spaces (9 bare digits are too often something else); stdnum decides
    "ssn": r"(?<![\d-])\d{3}([- ])\d{2}\1\d{4}(?![\d-])",
}
_COMPILED = {kind: re.compile(pattern) for kind, pattern in PATTERNS.items()}
CHECKED = ("card", "phone", "iban", "ssn")  # kinds a regex alone cannot decide: validate_data runs them as a custom
# expectation
# where a phone number written without its +country code is read as national (validate_data.phone_regions);
# a number with one is recognised whatever the list
PHONE_REGIONS = ("US", "GB")


def luhn_valid(digits: str) -> bool:
    """True if the digit string passes the Luhn checksum used by payment cards."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# candidates repeat (a number quoted twice, a template): each distinct one is parsed once per process
@functools.lru_cache(maxsize=65536)
def is_phone(candidate: str, regions: tuple[str, ...] = PHONE_REGIONS) -> bool:
    """Whether `candidate` is a valid phone number in libphonenumber's numbering plans (international, or national
    in one of `regions`)."""
    import phonenumbers

    for region in regions if not candidate.startswith("+") else (None,):
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(candidate, region)):
                return True
        except phonenumbers.NumberParseException:
            continue
    return False


def find(kind: str, text: str, regions: tuple[str, ...] = PHONE_REGIONS) -> list[tuple[int, int]]:
    """Spans of `kind` PII in `text` (`regions`: where a national phone number is read)."""
    matches = _COMPILED[kind].finditer(text)
    if kind == "card":
        return [m.span() for m in matches if luhn_valid(re.sub(r"\D", "", m.group()))]
    if kind == "phone":
        return [m.span() for m in matches if is_phone(m.group(), tuple(regions))]
    if kind == "iban":
        return [span for m in matches if (span := _iban(m))]
    if kind == "ssn":
        from stdnum.us import ssn

        return [m.span() for m in matches if ssn.is_valid(m.group().replace(" ", "-"))]  # stdnum reads dashes
    return [m.span() for m in matches]


def _iban(match: re.Match) -> tuple[int, int] | None:
    """The span of the valid IBAN that `match` starts with: the match itself, or without its last groups of 4 (a
    word in capitals after the number, "... 0130 00 NOW", joins the match)."""
    from stdnum import iban

    text, start = match.group(), match.start()
    while len(text) >= 15:
        if iban.is_valid(text):
            return start, start + len(text)
        if " " not in text:
            return None
        text = text.rsplit(" ", 1)[0]
    return None


def contains(kind: str, text: object, regions: tuple[str, ...] = PHONE_REGIONS) -> bool:
    """True if `text` holds PII of this kind (non-strings hold none)."""
    return isinstance(text, str) and bool(find(kind, text, regions))


def kinds_in(text: str, kinds: tuple[str, ...] | list[str] = tuple(PATTERNS),
             regions: tuple[str, ...] = PHONE_REGIONS) -> list[str]:
    """The kinds of PII `text` holds, of `kinds`."""
    return [kind for kind in kinds if find(kind, text, regions)]


def mask(text: str, kinds: tuple[str, ...] | list[str] = tuple(PATTERNS),
         regions: tuple[str, ...] = PHONE_REGIONS) -> str:
    """`text` with every PII match of `kinds` replaced by [EMAIL], [PHONE], [CARD], [IP], [IBAN] or [SSN], safe to
    print."""
    spans = sorted((s, -e, kind) for kind in kinds for s, e in find(kind, text, tuple(regions)))
    out, pos = [], 0
    for start, neg_end, kind in spans:  # longest match first at each start
        end = -neg_end
        if start < pos:  # overlapping matches (a card number also looks like a phone)
            continue
        out += [text[pos:start], f"[{kind.upper()}]"]
        pos = end
    out.append(text[pos:])
    return "".join(out)
