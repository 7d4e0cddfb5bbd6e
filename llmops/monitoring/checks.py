"""What the monitor judges each production answer with: checkers of verifiable answers and harmful-content detectors.

Both are registries (name -> function), as the fine-tuning methods are. A checker takes a
prompt and returns (task family, the exact answer) when it can verify it, else None; a user
registers their own in params as `module:function` (monitor.checkers). A detector takes a
list of texts and returns one verdict per text; `wordlist` uses glin-profanity's maintained
word lists (spaced-out letters and accents included), `classifier` a local text-classification
model the user points to (monitor.harmful.classifier), run on this machine, never downloaded.
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable

from llmops.core.config import ConfigError, HarmfulParams
from llmops.data.sample_data import check as sample_check

Checker = Callable[[str], "tuple[str, str] | None"]
Detector = Callable[[list[str]], list[bool]]

CHECKERS: dict[str, Checker] = {"sample_tasks": sample_check}


def checker(names: list[str]) -> Checker:
    """One checker trying each named one in order (the first that knows a prompt answers for it).

    Raises:
        ConfigError: a name that is neither registered nor an importable module:function.
    """
    found = [_load(name) for name in names]

    def first(prompt: str) -> tuple[str, str] | None:
        for check in found:
            verdict = check(prompt)
            if verdict is not None:
                return verdict
        return None

    return first


def _load(name: str) -> Checker:
    if name in CHECKERS:
        return CHECKERS[name]
    module, _, function = name.partition(":")
    try:
        found = getattr(import_module(module), function) if function else None
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"monitor.checkers: {name!r}: {exc}") from None
    if not callable(found):
        raise ConfigError(f"monitor.checkers: {name!r} is not registered ({', '.join(CHECKERS)}) nor a "
                          "module:function")
    return found


def is_correct(answer: str, expected: str) -> bool:
    """Exact match after trimming, as the evaluate stage scores."""
    return answer.strip() == expected.strip()


def _wordlist(params: HarmfulParams) -> Detector:
    from glin_profanity import Filter

    # leetspeak off: it reads digits as letters, so an answer of "85" was "bs"; spaced-out letters and accents are
    # still caught ("f u c k", "fück"), and so are the list's own spelled variants ("sh1t")
    profanity = Filter({"languages": ["english"], "detect_leetspeak": False, "normalize_unicode": True})
    return lambda texts: [bool(t) and profanity.is_profane(t) for t in texts]


def _classifier(params: HarmfulParams) -> Detector:
    from pathlib import Path

    from transformers import pipeline

    if not (Path(params.classifier).expanduser() / "config.json").is_file():
        raise ConfigError(f"monitor.harmful.classifier: {params.classifier}: not a local model directory "
                          "(config.json missing)")
    classify = pipeline("text-classification", model=str(Path(params.classifier).expanduser()), top_k=None,
                        truncation=True)
    harmful = set(params.classifier_labels)

    def detect(texts: list[str]) -> list[bool]:
        scores = classify([t or " " for t in texts], batch_size=32)
        return [any(s["label"] in harmful and s["score"] >= params.classifier_threshold for s in row)
                for row in scores]

    return detect


DETECTORS: dict[str, Callable[[HarmfulParams], Detector]] = {"wordlist": _wordlist, "classifier": _classifier}


def detectors(params: HarmfulParams) -> dict[str, Detector]:
    """The configured detectors, ready to run.

    Raises:
        ConfigError: an unknown detector, or a classifier directory that is not a model.
    """
    unknown = [d for d in params.detectors if d not in DETECTORS]
    if unknown:
        raise ConfigError(f"monitor.harmful.detectors: unknown {', '.join(unknown)}; registered: "
                          f"{', '.join(DETECTORS)}")
    return {name: DETECTORS[name](params) for name in params.detectors}
