"""The base model fine-tuning starts from, as a versioned input of the pipeline: models/pretrain.

`train.finetune.base_model` names it: `pretrain` (the demo: train@pretrain trains a small model
here from scratch), a hub id (at `train.finetune.revision`), or a local Hugging Face model
directory. A named base is not trained: train@pretrain fetches it, checks it, and writes its files
into models/pretrain with a manifest (where it came from, the commit it resolved to, each file's
sha256, its licence). DVC then versions it like any output: dvc.lock holds its hash, the DVC
remote its files, so a fresh clone gets it with `dvc pull` and never needs the hub again.

Hub ids go through huggingface_hub's `snapshot_download`, which keeps the Hugging Face cache
(HF_HOME) and works offline (HF_HUB_OFFLINE=1) once the revision is cached.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmops.core.errors import Refused

DEMO = "pretrain"
DIR = Path("models/pretrain")
# what a model directory needs to load and be served: configs, weights, tokenizer, chat template, its card and licence
WANTED = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt",
          "README.md", "LICENSE*"]
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class BaseModelError(Refused):
    """A base model that cannot be fetched or used; the message names it and the fix."""


def is_named(base_model: str) -> bool:
    """Whether `base_model` names a model of someone else's (fetched), rather than the demo trained here."""
    return base_model != DEMO


def is_local(base_model: str, root: str | os.PathLike = ".") -> bool:
    path = Path(base_model).expanduser()
    return base_model.startswith((".", "/", "~")) or (Path(root) / path).is_dir()


def locate(base_model: str, revision: str | None, root: str | os.PathLike = ".") -> tuple[Path, str | None]:
    """The local directory holding the base's files (a hub id: its snapshot in the Hugging Face cache, downloaded
    when missing), and the commit it resolved to (None for a local directory).

    Raises:
        BaseModelError: no such directory or hub model, no such revision, or no hub and no cached copy.
    """
    if is_local(base_model, root):
        path = Path(root) / Path(base_model).expanduser()
        if not path.is_dir():
            raise BaseModelError(f"train.finetune.base_model: {base_model}: no such directory")
        return path, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{base_model}@{revision or 'main'}"
    try:
        found = Path(snapshot_download(base_model, revision=revision, allow_patterns=WANTED))
    except GatedRepoError:
        raise BaseModelError(f"train.finetune.base_model: {base_model} is gated on the hub: accept its terms on its "
                             "page and log in (`hf auth login`, or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise BaseModelError(f"train.finetune.revision: {revision!r} is not a revision of {base_model} on the hub")\
            from None
    except RepositoryNotFoundError:
        raise BaseModelError(f"train.finetune.base_model: {base_model}: no such model on the hub (or it is private: "
                             "log in with `hf auth login`, or HF_TOKEN)") from None
    except HFValidationError as exc:
        raise BaseModelError(f"train.finetune.base_model: {base_model!r} is neither a local directory nor a hub id "
                             f"({str(exc).splitlines()[0]})") from None
    except OSError as exc:  # offline, the hub down or refusing (HTTP errors are OSErrors), an incomplete cached copy
        if not isinstance(exc, LocalEntryNotFoundError) and getattr(exc, "errno", None) == errno.ENOSPC:
            raise BaseModelError(f"train.finetune.base_model: {at}: no space left on the device while downloading it "
                                 f"into the Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}); "
                                 "free some, or point HF_HOME at a larger disk") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise BaseModelError(
            f"train.finetune.base_model: {at}: the hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if offline else "") + " and the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) has no complete copy of it; fetch it once where "
            f"the hub is reachable (`hf download {base_model}`), or `dvc pull models/pretrain` in a clone that has "
            f"fetched it ({type(exc).__name__})") from None
    return found, found.name  # snapshot folders are named by their commit


def check_files(path: Path, name: str) -> None:
    """Refuse a model directory that cannot be fine-tuned here: no config, no safetensors weights (pickle-only),
    or no tokenizer.

    Raises:
        BaseModelError: naming the directory and what is missing.
    """
    files = {f.name for f in path.iterdir()} if path.is_dir() else set()
    if "config.json" not in files:
        raise BaseModelError(f"base model {name}: no config.json in {path} (not a Hugging Face model directory)")
    if not any(f.endswith(".safetensors") for f in files):
        pickled = sorted(f for f in files if f.endswith(PICKLED))
        raise BaseModelError(
            f"base model {name}: no .safetensors weights in {path}"
            + (f" (only {', '.join(pickled)}: pickle files, which can run code when loaded, are refused)"
               if pickled else "") + "; convert them to safetensors (e.g. `model.save_pretrained(dir)` in a "
            "trusted environment) and point train.finetune.base_model at that directory")
    # a tokenizer's vocabulary (tokenizer_config.json alone is settings, not a tokenizer)
    tokenizer = {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"}
    if not files & tokenizer and not any(f.endswith(".tiktoken") for f in files):
        raise BaseModelError(f"base model {name}: no tokenizer in {path} (none of {', '.join(sorted(tokenizer))}, "
                             "*.tiktoken)")


def check_space(src: Path, dest: Path, name: str) -> None:
    """Refuse a copy that would not fit on the disk of `dest`."""
    need = sum(f.stat().st_size for f in _wanted(src))
    dest.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise BaseModelError(f"base model {name}: its files take {need / 2**30:.1f} GiB and {dest} has "
                             f"{free / 2**30:.1f} GiB free; free some space (e.g. `dvc gc`) and run again")


def _wanted(src: Path) -> list[Path]:
    from fnmatch import fnmatch

    return sorted(f for f in src.iterdir() if f.is_file() and any(fnmatch(f.name, p) for p in WANTED))


def card_licence(path: Path) -> str | None:
    """The `license:` of the model card (README.md front matter) in `path`, the Hugging Face convention."""
    from huggingface_hub import ModelCard

    readme = path / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.license or None
    except Exception:  # a card that is not valid front matter states no licence
        return None


def fetch(base_model: str, revision: str | None, dest: Path, root: str | os.PathLike = ".") -> dict[str, Any]:
    """Copy the base's files into `dest` (a new directory) and return what identifies them.

    Returns:
        {"base_model", "revision_requested", "revision" (the commit, or None for a local directory), "licence",
        "sha256": {file: digest}}.

    Raises:
        BaseModelError: see locate, check_files and check_space.
    """
    from llmops.core.provenance import sha256_file

    src, commit = locate(base_model, revision, root)
    check_files(src, base_model)
    check_space(src, dest.parent, base_model)
    dest.mkdir(parents=True)
    for f in _wanted(src):
        shutil.copyfile(f.resolve(), dest / f.name)  # the hub cache holds symlinks into its blobs: copy the content
    return {"base_model": base_model, "revision_requested": revision, "revision": commit,
            "licence": card_licence(dest),
            "sha256": {f.name: sha256_file(f) for f in sorted(dest.iterdir()) if f.suffix in (".json", ".safetensors")}}


def recorded(root: str | os.PathLike = ".") -> dict[str, Any] | None:
    """What models/pretrain/manifest.json says was fetched there (None: nothing fetched, e.g. the demo's model)."""
    manifest = Path(root) / DIR / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("fetched")


def matches(fetched: dict[str, Any] | None, base_model: str, revision: str | None) -> bool:
    """Whether what was fetched is the base that params name (a revision given must be the one requested or the
    commit it resolved to)."""
    return bool(fetched) and fetched["base_model"] == base_model and (
        revision is None or revision in (fetched.get("revision_requested"), fetched.get("revision")))
