"""MkDocs hook: the params reference (docs/params.md) written at build time from llmops/core/config.py.

The root model `Params` is walked: each section (a nested pydantic model) becomes a heading with its docstring and a
table of its fields: params.yaml key, type with bounds, default, description. Nothing lists a key by hand, so a field
added to config.py appears at the next `mkdocs build`.
"""

from __future__ import annotations

import html
import inspect
import json
import types
import typing
from typing import Any, Iterator

from mkdocs.exceptions import PluginError
from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARKER = "<!-- params-reference -->"  # docs/params.md: where the generated sections go
BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "params.md":
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/params.md: no {MARKER} line to put the generated reference at")
    from llmops.core.config import Params

    return markdown.replace(MARKER, "\n".join(section(Params, "", 2)))


def section(model: type[BaseModel], key: str, level: int, variant: str = "") -> Iterator[str]:
    """One model's heading and docstring (none for the root), its table of fields, then its nested sections.
    `variant` tells apart the models of one union (discriminated or not): each gets a section."""
    rows, nested = [], []
    for name, info in model.model_fields.items():
        path = f"{key}.{info.alias or name}" if key else info.alias or name
        subs = list(models_in(info.annotation))
        subs = [(sub, path + suffix, sub.__name__ if len(subs) > 1 else "") for sub, suffix in subs]
        nested += subs
        where = ", ".join(f"[`{p}`{f' ({v})' if v else ''}](#{anchor(p, v)})" for _, p, v in subs)
        about = info.description or " ".join(summary(sub) for sub, _, _ in subs)  # a section: its docstring's
        rows.append(f"| `{path}` | {type_of(info.annotation)}{bounds(info)}{f' ({where})' if where else ''} | "
                    f"{default(info)} | {cell(prose(about))} |")
    if key:  # the root has no table: its fields are the sections
        yield f"{'#' * level} `{key}`{f' ({variant})' if variant else ''} {{#{anchor(key, variant)}}}\n"
        doc = model.__dict__.get("__doc__")
        yield (prose(inspect.cleandoc(doc)) + "\n") if doc else ""
        yield "| key | type | default | description |\n|---|---|---|---|"
        yield from rows
        yield ""
    for sub, path, v in nested:
        yield from section(sub, path, min(level + 1, 6) if key else level, v)


def summary(model: type[BaseModel]) -> str:
    """The first paragraph of a model's docstring."""
    return inspect.cleandoc(model.__dict__.get("__doc__") or "").split("\n\n")[0]


def anchor(key: str, variant: str = "") -> str:
    """A section's id: its key as params.yaml writes it, without [] or <>, and the model's name in a union."""
    return key.replace("[]", "").replace("<name>", "name") + (f"-{variant}" if variant else "")


def models_in(annotation: Any) -> Iterator[tuple[type[BaseModel], str]]:
    """The models a field holds, with how their keys continue: a section, a list's items, a map's values, or each
    member of a union (discriminated or not)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if is_model(annotation):
        yield annotation, ""
    elif origin is list:
        yield from ((m, "[]" + s) for m, s in models_in(args[0]))
    elif origin is dict:
        yield from ((m, ".<name>" + s) for m, s in models_in(args[1]))
    elif origin in (typing.Union, types.UnionType):
        for arg in args:
            yield from models_in(arg)
    elif origin is typing.Annotated:
        yield from models_in(args[0])


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def type_of(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):  # a model in a union is named: its section says which
        return ", or ".join(a.__name__ if is_model(a) else type_of(a) for a in args)
    if origin is typing.Annotated:
        return type_of(args[0])
    if origin is list:
        inner = type_of(args[0])
        return f"list, each {inner}" if inner.startswith("one of") else f"list of {inner}"
    if origin is dict:
        return f"map of {type_of(args[0])} to {type_of(args[1])}"
    if is_model(annotation):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def bounds(info: FieldInfo) -> str:
    said = [f"{sign} {getattr(meta, name)}" for meta in info.metadata for name, sign in BOUNDS.items()
            if getattr(meta, name, None) is not None]
    return f" ({', '.join(said)})" if said else ""


def default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return ""  # a section: its own table gives its defaults
    as_json = json.dumps(value, ensure_ascii=False,
                         default=lambda v: v.model_dump(mode="json", by_alias=True) if isinstance(v, BaseModel) else str(v))
    return f"`{cell(as_json)}`"


def prose(text: str) -> str:
    """A docstring or description as Markdown: outside its `code` spans, <, > and & are text, * is no emphasis and
    | no table cell's end (inside them, Python-Markdown's tables leave | alone)."""
    parts = text.split("`")
    parts[::2] = [html.escape(p, quote=False).replace("*", "\\*").replace("|", "\\|") for p in parts[::2]]
    return "`".join(parts)


def cell(text: str) -> str:
    """Text on one line, as a Markdown table cell needs."""
    return " ".join(text.split())
