"""Typed pipeline parameters: params.yaml parsed into pydantic models.

One parser for every consumer (stages, CLI, flow): unknown keys, wrong types and
impossible combinations fail here, before any work, with the dotted key named.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

PARAMS_FILE = "params.yaml"


class ConfigError(Exception):
    """Bad parameters. The message names the source and the dotted key, one line per problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataParams(Section):
    """Where the instruction data and the pretraining corpus come from.

    A path left null means "generate the embedded sample from `seed`".
    """

    seed: int = 0
    num_examples: int = Field(2000, ge=2, description="generated instruction examples (train + eval)")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of examples held out for eval")
    corpus_lines: int = Field(4000, ge=1, description="lines of generated pretraining text")
    instructions: str | None = Field(None, description="your instruction data: JSONL or CSV, local path or s3:// URI")
    eval_instructions: str | None = Field(
        None, description="your eval split (same format); when null, eval is split off `instructions`"
    )
    corpus: str | None = Field(None, description="your pretraining text: local path or s3:// URI")

    @field_validator("eval_instructions")
    @classmethod
    def _eval_needs_train(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("instructions") is None:
            raise ValueError("set only together with data.instructions (the train split)")
        return value

    @field_validator("instructions", "eval_instructions", "corpus")
    @classmethod
    def _known_format(cls, value, info: ValidationInfo):
        if value is None:
            return value
        suffixes = (".txt", ".text") if info.field_name == "corpus" else (".jsonl", ".csv")
        if not value.lower().endswith(suffixes):
            raise ValueError(f"{value!r}: expected a file ending in {' or '.join(suffixes)}")
        return value


class ValidateDataParams(Section):
    """Thresholds of the Great Expectations suite run by validate_data."""

    min_chars: int = Field(1, ge=0, description="shortest allowed prompt or response, in characters")
    max_prompt_chars: int = Field(2048, ge=1)
    max_response_chars: int = Field(2048, ge=1)
    max_duplicate_rate: float = Field(
        0.01, ge=0, le=1, description="largest share of rows whose (prompt, response) pair appears twice or more"
    )
    pii: list[Literal["email", "phone", "card", "ip"]] = Field(
        default_factory=lambda: ["email", "phone", "card", "ip"], description="kinds of PII refused"
    )

    @field_validator("max_prompt_chars", "max_response_chars")
    @classmethod
    def _max_above_min(cls, value, info: ValidationInfo):
        low = info.data.get("min_chars")
        if low is not None and value < low:
            raise ValueError(f"must be >= validate_data.min_chars ({low})")
        return value


class StorageParams(Section):
    """The DVC remote that datasets and checkpoints are pushed to.

    Credentials never live here: they come from the standard AWS sources
    (environment, ~/.aws, instance roles).
    """

    remote: Literal["local", "s3"] = "local"
    local_dir: str = Field("~/.cache/llmops/dvc-remote", description="the local remote's directory")
    bucket: str | None = Field(None, validate_default=True)
    prefix: str = Field("llmops", description="key prefix inside the bucket")
    endpoint_url: str | None = Field(None, description="for S3-compatible stores (MinIO, moto, R2...)")
    region: str | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket_for_s3(cls, value, info: ValidationInfo):
        if info.data.get("remote") == "s3" and not value:
            raise ValueError("required when storage.remote is 's3'")
        return value

    @property
    def url(self) -> str:
        """The remote's URL as DVC takes it."""
        if self.remote == "s3":
            return f"s3://{self.bucket}/{self.prefix.strip('/')}" if self.prefix.strip("/") else f"s3://{self.bucket}"
        return self.local_dir


class Params(Section):
    """Everything in params.yaml: one section per stage, plus storage."""

    data: DataParams = Field(default_factory=DataParams)
    validate_data: ValidateDataParams = Field(default_factory=ValidateDataParams)
    storage: StorageParams = Field(default_factory=StorageParams)


# Environment variables that point storage elsewhere without editing params.yaml
# (a CI runner or a Prefect worker with its own bucket).
STORAGE_ENV = {
    "LLMOPS_S3_BUCKET": "bucket",
    "LLMOPS_S3_PREFIX": "prefix",
    "LLMOPS_S3_ENDPOINT_URL": "endpoint_url",
    "LLMOPS_S3_REGION": "region",
}


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: keeps comments when we write params back
    yaml.preserve_quotes = True
    return yaml


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    try:
        return _yaml().load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}malformed YAML: {getattr(exc, 'problem', exc)}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value` into the dotted key and the value parsed as a YAML scalar (as `dvc exp run -S`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"-S {text}: expected KEY=VALUE with a dotted key, e.g. data.num_examples=500")
    try:
        value = YAML(typ="safe").load(raw) if raw.strip() else raw
    except YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"-S {key}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _format_errors(exc: ValidationError, source: str, overridden: set[str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        where = "-S" if any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overridden) else source
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        lines.append(f"-S {key}: {msg}" if where == "-S" else f"{where}: {key}: {msg}")
    return "\n".join(lines)


def load_params(path: str | os.PathLike = PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    """Read params.yaml, apply dotted overrides and validate the result.

    Args:
        path: the params file.
        overrides: `dotted.key=value` strings, as given to `-S`.

    Returns:
        The validated parameters.

    Raises:
        ConfigError: one line per problem, naming the file (or -S) and the dotted key.
    """
    path = Path(path)
    tree = _plain(_read_yaml(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    keys = set()
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        keys.add(key)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path), keys)) from None


def storage_from_env(storage: StorageParams, environ: dict[str, str] | None = None) -> StorageParams:
    """Storage with the LLMOPS_S3_* environment variables applied; a bucket switches the remote to S3."""
    environ = os.environ if environ is None else environ
    update = {field: environ[var] for var, field in STORAGE_ENV.items() if environ.get(var)}
    if "bucket" in update:
        update["remote"] = "s3"
    if not update:
        return storage
    try:
        return StorageParams.model_validate(storage.model_dump() | update)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, "environment", set()).replace("environment: ", "environment: storage.")) from None


def write_params(path: str | os.PathLike, params: Params) -> bool:
    """Write `params` into the params file, keeping its comments and layout.

    Used when a flow run is given parameters (from the UI or the CLI's -S): like
    `dvc exp run -S`, the values land in params.yaml so dvc.lock records them.

    Returns:
        True if the file changed.
    """
    path = Path(path)
    doc = _read_yaml(path) if path.exists() else None
    if doc is None:
        doc = {}
    changed = _merge(doc, params.model_dump(mode="json"))
    if changed:
        buf = io.StringIO()
        _yaml().dump(doc, buf)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(buf.getvalue())
        tmp.replace(path)
    return changed


def _merge(doc: dict, values: dict) -> bool:
    changed = False
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            changed |= _merge(doc[key], value)
        elif key not in doc or _plain(doc[key]) != value:
            doc[key] = value
            changed = True
    return changed
