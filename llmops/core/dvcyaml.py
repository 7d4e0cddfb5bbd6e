"""dvc.yaml read as data: the one place the pipeline's stages and their paths are declared.

The CLI, the flow, the gate, the model card, erasure and monitoring read a stage's deps, outs and metrics here rather
than repeating them, so a path changed in dvc.yaml is changed for all of them. Read as YAML (not through DVC's API):
cheap enough for `llmops --help`. A foreach stage (train) is one entry per key (train@pretrain, train@finetune), its
`${key}` and `${item.<name>}` filled in as DVC fills them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llmops.core.errors import LlmopsError

DVC_YAML = "dvc.yaml"
_TEMPLATE = re.compile(r"\$\{\s*(key|item(?:\.[A-Za-z_]\w*)?)\s*\}")


@dataclass(frozen=True)
class Declared:
    name: str  # the DVC stage: evaluate, train@pretrain
    desc: str
    keys: tuple[str, ...]  # a foreach stage's keys (the same for each of its entries); () for a plain stage
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]  # metrics files, in dvc.yaml's order: the first is the stage's verdict
    plots: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # the outs annotated `type: model` (weights, not data)

    @property
    def data(self) -> tuple[str, ...]:
        """Every output but the models: what may hold rows of the data (erasure scans these)."""
        return tuple(p for p in self.outs + self.metrics + self.plots if p not in self.models)

    @property
    def verdict(self) -> Path:
        """The stage's first metrics file: what the gate, the model card and `llmops run`'s summary read of it."""
        return Path(self.metrics[0])


def find(root: str | Path | None = None) -> Path | None:
    """dvc.yaml in `root`; without one, in the working directory, else in the project this package was installed
    from."""
    bases = [Path(root)] if root is not None else [Path.cwd(), Path(__file__).resolve().parents[2]]
    return next((base / DVC_YAML for base in bases if (base / DVC_YAML).is_file()), None)


def raw(root: str | Path | None = None) -> dict:
    """dvc.yaml's `stages`, as written (templates unfilled); {} where there is no dvc.yaml."""
    path = find(root)
    return _load(path) if path is not None else {}


def _load(path: Path) -> dict:
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(path.read_text()).get("stages") or {}


def stages(root: str | Path | None = None) -> dict[str, Declared]:
    """Every DVC stage of dvc.yaml, in file order, its paths filled in."""
    path = find(root)
    if path is None:
        return {}
    stat = path.stat()
    return dict(_expanded(path.resolve(), stat.st_mtime_ns, stat.st_size))  # a copy: the cached one stays as read


@lru_cache(maxsize=8)
def _expanded(path: Path, mtime_ns: int, size: int) -> dict[str, Declared]:
    """Read once per version of the file (its mtime and size in the key): the gate, the release and the model card
    each ask for several stages."""
    found: dict[str, Declared] = {}
    for name, body in _load(path).items():
        items = body.get("foreach")
        if items is None:
            found[name] = _declared(name, body, ())
            continue
        pairs = items.items() if isinstance(items, dict) else ((str(i), i) for i in items)
        for key, item in pairs:
            found[f"{name}@{key}"] = _declared(f"{name}@{key}", body["do"], tuple(items), body.get("desc"),
                                               {"key": str(key), "item": item})
    return found


class NotDeclared(LlmopsError):
    """dvc.yaml is missing, or declares no such stage."""


def stage(root: str | Path | None, name: str) -> Declared:
    """One DVC stage.

    Raises:
        NotDeclared: there is no dvc.yaml, or it has no stage `name`.
    """
    declared = stages(root)
    if name not in declared:
        where = find(root)
        raise NotDeclared(f"{where} declares no stage {name!r} (it has {', '.join(declared) or 'none'})" if where
                          else f"no {DVC_YAML} in {Path(root or '.').resolve()}: run this in the project")
    return declared[name]


def _declared(name: str, body: dict, keys: tuple[str, ...], desc: str | None = None,
              values: dict | None = None) -> Declared:
    def paths(field: str, kind: str | None = None) -> tuple[str, ...]:
        entries = [e if isinstance(e, dict) else {e: {}} for e in body.get(field) or []]
        return tuple(_fill(str(path), values) for e in entries for path, opts in e.items()
                     if kind is None or (opts or {}).get("type") == kind)

    return Declared(name=name, desc=str(desc or body.get("desc") or ""), keys=keys, deps=paths("deps"),
                    outs=paths("outs"), metrics=paths("metrics"), plots=paths("plots"),
                    models=paths("outs", "model"))


def _fill(text: str, values: dict | None) -> str:
    if not values:
        return text

    def value(match: re.Match) -> str:
        ref = match.group(1)
        if ref == "key":
            return values["key"]
        item = values["item"]
        return str(item if ref == "item" else item[ref.split(".", 1)[1]])

    return _TEMPLATE.sub(value, text)
