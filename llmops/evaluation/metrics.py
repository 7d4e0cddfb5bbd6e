"""Answer metrics, registered by name (evaluate.metrics picks them): each scores an answer against its reference.

- exact_match: equal after normalisation (case, whitespace, punctuation, articles: SQuAD's rule), 0 or 1.
- numeric: the answer's final number equals the reference's (GSM8K's convention: the number after the
  reference's last `####`, else its last number; the answer's after its `####` if it writes one, else its
  last number; commas, currency signs and a trailing `.0` ignored), 0 or 1.
- chrf: chrF, the character n-gram F-score (sacrebleu, WMT's reference implementation), scaled to 0-1: partial
  credit for free text, where exact match is almost never met.

A binary metric's interval is Wilson's; chrF's a seeded percentile bootstrap of the mean.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?")


def normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def final_number(text: str) -> Decimal | None:
    """The number an answer or reference ends on: after its last `####` if it has one, else its last number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return Decimal(found[-1 if "####" not in text else 0].replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def _exact(answer: str, reference: str) -> float:
    return float(normalise(answer) == normalise(reference))


def _numeric(answer: str, reference: str) -> float:
    expected = final_number(reference)
    return float(expected is not None and final_number(answer) == expected)


def _chrf(answer: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(answer, [reference]).score / 100


@dataclass(frozen=True)
class Metric:
    score: Callable[[str, str], float]  # (answer, reference) -> [0, 1]
    binary: bool  # 0/1 per example: a Wilson interval; else a bootstrap of the mean
    what: str


METRICS: dict[str, Metric] = {
    "exact_match": Metric(_exact, True, "equal after normalisation (case, spaces, punctuation, articles)"),
    "numeric": Metric(_numeric, True, "the final number equals the reference's (GSM8K's #### N)"),
    "chrf": Metric(_chrf, False, "chrF character n-gram F-score (sacrebleu), 0-1"),
}


def scores(name: str, answers: list[str], references: list[str]) -> list[float]:
    """Each answer's score against its reference, by the metric `name`."""
    metric = METRICS[name].score
    return [metric(a, r) for a, r in zip(answers, references, strict=True)]
