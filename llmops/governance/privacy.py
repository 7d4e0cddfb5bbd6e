"""Privacy at inference: what a server does with personal data in prompts and answers (deploy.privacy).

The detectors are validate_data's (llmops.governance.pii: the same kinds, validate_data.pii, and phone
regions, validate_data.phone_regions). A deployment picks one mode:

    mask     the model sees the prompt with each match replaced ([EMAIL], [PHONE], ...), and the caller
             gets the answer masked the same way (the default)
    refuse   a prompt holding personal data is refused (400 `pii_in_prompt`, naming the kinds, never the
             values); an answer holding some is masked, since it cannot be taken back
    log      prompts and answers pass unchanged (the model needs them, e.g. a CRM assistant)

Whatever the mode, the request log and the feedback store only ever get masked text, of every kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmops.governance import pii

Mode = Literal["mask", "refuse", "log"]
# A streamed answer is held back this many characters, so a number or an address split across pieces is masked
# whole (an email's local part is at most 64 characters, a card or phone number under 40)
HOLD_CHARS = 128


@dataclass(frozen=True)
class Privacy:
    mode: Mode = "mask"
    kinds: tuple[str, ...] = tuple(pii.PATTERNS)
    regions: tuple[str, ...] = pii.PHONE_REGIONS

    def found(self, text: str) -> list[str]:
        """The kinds of personal data `text` holds."""
        return pii.kinds_in(text, self.kinds, self.regions)

    def prompt(self, text: str) -> str:
        """What the model sees."""
        return pii.mask(text, self.kinds, self.regions) if self.mode == "mask" else text

    def answer(self, text: str) -> str:
        """What the caller gets."""
        return text if self.mode == "log" else pii.mask(text, self.kinds, self.regions)

    def for_log(self, text: str) -> str:
        """What the request log and the feedback store keep: masked, every kind, whatever the mode."""
        return pii.mask(text, tuple(pii.PATTERNS), self.regions)

    def stream(self) -> AnswerStream:
        return AnswerStream(self)


class AnswerStream:
    """Masks a streamed answer piece by piece: the last HOLD_CHARS characters wait for what follows them."""

    def __init__(self, privacy: Privacy) -> None:
        self.privacy, self.raw, self.sent = privacy, "", 0

    def push(self, piece: str) -> str:
        """The text that can go to the caller now ("" while it is held back)."""
        self.raw += piece
        if self.privacy.mode == "log":
            self.sent = len(self.raw)
            return piece
        cut = max(self.sent, len(self.raw) - HOLD_CHARS)
        for kind in self.privacy.kinds:  # never cut through a match: it waits, whole
            for start, end in pii.find(kind, self.raw[self.sent:], self.privacy.regions):
                if self.sent + start < cut < self.sent + end:
                    cut = self.sent + start
        return self._release(cut)

    def finish(self) -> str:
        """The rest, when the answer is complete."""
        return self._release(len(self.raw))

    def _release(self, cut: int) -> str:
        out, self.sent = self.raw[self.sent:cut], max(self.sent, cut)
        return self.privacy.answer(out) if out else ""
