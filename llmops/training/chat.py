"""Conversations through the base model's own chat template: token ids, and which of them are trained.

One rendering for training, evaluation and serving: `tokenizer.apply_chat_template` to text,
then the tokenizer on that text with no special tokens added (the template writes its own,
a BOS included). A training conversation's trained tokens are its assistant turns, each with
the template's end-of-turn markup, found by rendering the conversation up to each assistant turn
with and without that turn: the tokens the turn adds are its own. That needs a template whose
rendering of a conversation starts with its rendering of every earlier part of it; one that
rewrites earlier turns is refused, naming the row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmops.core.errors import Refused

Messages = list[dict[str, str]]


class TemplateError(Refused):
    """A tokenizer with no chat template, or a template that fails or cannot mark the answer of a conversation."""


def set_template(tok: Any, template: str | None, source: str) -> Any:
    """`tok` with `template` (Jinja text, or a path to a .jinja file) as its chat template when one is given.

    Raises:
        TemplateError: no template given and the tokenizer has none.
    """
    if template is not None:
        path = Path(template).expanduser()
        tok.chat_template = path.read_text(encoding="utf-8") if template.endswith(".jinja") and path.is_file() \
            else template
    if not getattr(tok, "chat_template", None):
        raise TemplateError(f"{source}: its tokenizer has no chat template, so a conversation cannot be rendered for "
                            "it; set train.finetune.chat_template (Jinja text or a .jinja file)")
    return tok


def _ids(tok: Any, messages: Messages, generation_prompt: bool, where: str) -> list[int]:
    if not getattr(tok, "chat_template", None):
        raise TemplateError(f"{where}: the model's tokenizer has no chat template")
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # a Jinja error, or raise_exception() in the template (e.g. "roles must alternate")
        raise TemplateError(f"{where}: the chat template failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    # verbose=False: a conversation longer than the model's context is counted and handled by the caller, not warned of
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def prompt_ids(tok: Any, messages: Messages, where: str = "prompt") -> list[int]:
    """The ids a model continues from to answer `messages`: rendered with the template's generation prompt."""
    return _ids(tok, messages, True, where)


def training_ids(tok: Any, messages: Messages, where: str) -> tuple[list[int], list[bool]]:
    """The ids of a whole conversation, and for each whether it is trained (an assistant turn's token).

    Raises:
        TemplateError: the template fails on it, or renders a later part of the conversation with another start.
    """
    full = _ids(tok, messages, False, where)
    trained = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _ids(tok, messages[:i], True, where)
        upto = full if i == len(messages) - 1 else _ids(tok, messages[:i + 1], False, where)
        if upto[:len(before)] != before or full[:len(upto)] != upto:
            raise TemplateError(f"{where}: the chat template renders turn {i + 1} with a different start than the "
                                "conversation before it, so its answer tokens cannot be told apart; use a template "
                                "that renders each turn after the ones before (train.finetune.chat_template)")
        if len(upto) == len(before):
            raise TemplateError(f"{where}: the chat template renders assistant turn {i + 1} as nothing")
        trained[len(before):len(upto)] = [True] * (len(upto) - len(before))
    return full, trained
