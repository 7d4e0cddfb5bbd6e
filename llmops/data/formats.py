"""The instruction-data formats people have, read into one kind of row.

Each format is detected from a row's keys (or declared in `data.format`):

    messages         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (OpenAI chat)
    alpaca           {"instruction": "...", "input": "...", "output": "..."}  (`input` optional)
    prompt_response  {"prompt": "...", "response": "..."}

Every row becomes a prepared row with `prompt` (the last user turn) and `response` (the final
assistant turn): the two columns validation checks, evaluation scores and monitoring compares.
A conversation that is more than one user turn and its answer (a system message, earlier turns)
also keeps its whole `messages`, which training renders through the base's chat template. Other
keys (a `task` label, say) are kept. A single-turn row needs no `messages`: it is the
conversation [user: prompt, assistant: response].
"""

from __future__ import annotations

from typing import Any, Literal

from llmops.data.datasets import DataRefused

Format = Literal["messages", "alpaca", "prompt_response"]
FORMATS: dict[str, tuple[str, ...]] = {  # the keys that say a row is of this format, in the order they are tried
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
}
ROLES = ("system", "user", "assistant")


class FormatError(DataRefused):
    """A row that is not of its file's format; the message names the file, the line and the fix."""


def detect(row: dict[str, Any]) -> str | None:
    """The format a row's keys say it is in, or None."""
    return next((name for name, keys in FORMATS.items() if all(k in row for k in keys)), None)


def normalize(rows: list[tuple[int, dict[str, Any]]], name: str, declared: str = "auto") -> list[dict[str, Any]]:
    """Prepared rows (see the module's docstring) from a file's (line, row) pairs, all of one format.

    Args:
        rows: each row with the line it starts on, as `datasets.parse_rows` gives them.
        name: the file, for messages.
        declared: a format name, or "auto": the first row's keys decide.

    Raises:
        FormatError: a row of another format than the file's, or not a well-formed conversation.
    """
    fmt = declared if declared != "auto" else (detect(rows[0][1]) if rows else None)
    if fmt is None:
        keys = ", ".join(sorted(rows[0][1])) or "none"
        raise FormatError(f"{name}: line {rows[0][0]}: no known format in its keys ({keys}); expected "
                          + "; ".join(f"{f} ({', '.join(k)})" for f, k in FORMATS.items()))
    out = []
    for line, row in rows:
        found = detect(row)
        if found != fmt:
            what = f"is {found}" if found else f"lacks the keys of {fmt} ({', '.join(FORMATS[fmt])})"
            raise FormatError(f"{name}: line {line}: the row {what}, but the file is {fmt}"
                              + (" (data.format)" if declared != "auto" else " (its first row)")
                              + "; a file holds one format: convert the row or split the file")
        out.append(_READERS[fmt](row, f"{name}: line {line}"))
    return out


def _messages(row: dict[str, Any], where: str) -> dict[str, Any]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise FormatError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise FormatError(f"{where}: messages[{i}]: expected an object with role and content (got "
                              f"{sorted(m) if isinstance(m, dict) else type(m).__name__})")
        if m["role"] not in ROLES:
            raise FormatError(f"{where}: messages[{i}]: unknown role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise FormatError(f"{where}: messages[{i}]: content must be a string (got {type(m['content']).__name__})")
        if m["role"] == "system" and i != 0:
            raise FormatError(f"{where}: messages[{i}]: a system message can only come first")
        clean.append({"role": m["role"], "content": m["content"]})
    turns = [m["role"] for m in clean if m["role"] != "system"]
    for i, role in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise FormatError(f"{where}: turns must alternate user, assistant, ... starting with user (got "
                              f"{', '.join(turns)})")
    if not turns or turns[-1] != "assistant":
        raise FormatError(f"{where}: the conversation must end with an assistant turn (the answer to train on); "
                          f"got {', '.join(turns) or 'no turns'}")
    rest = {k: v for k, v in row.items() if k != "messages"}
    single = [m["role"] for m in clean] == ["user", "assistant"]
    return {**rest, "prompt": clean[-2]["content"], "response": clean[-1]["content"],
            **({} if single else {"messages": clean})}


def _alpaca(row: dict[str, Any], where: str) -> dict[str, Any]:
    for key in ("instruction", "input", "output"):
        if key in row and not isinstance(row[key], str):
            raise FormatError(f"{where}: {key} must be a string (got {type(row[key]).__name__})")
    extra = row.get("input") or ""
    rest = {k: v for k, v in row.items() if k not in ("instruction", "input", "output")}
    # Alpaca's own prompt puts the input after the instruction; the chat template then frames both as the user turn
    prompt = row["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    return {**rest, "prompt": prompt, "response": row["output"]}


def _prompt_response(row: dict[str, Any], where: str) -> dict[str, Any]:
    return dict(row)  # kept exactly as read: validate_data's suite judges types, blanks and lengths


_READERS = {"messages": _messages, "alpaca": _alpaca, "prompt_response": _prompt_response}


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """A prepared row as the chat it is: its `messages`, or [user: prompt, assistant: response]."""
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def context(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation up to the final answer: what a model is asked, to be scored against `response`."""
    return conversation(row)[:-1]
