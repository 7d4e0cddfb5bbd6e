"""Licences: what each input of a release is licensed under, recorded in its lineage and checked before it is served.

The release stage records, in release.json (and so in the registered version's lineage), one
entry per input: the data (data.instructions, data.eval_instructions, data.corpus, or the
embedded sample, which this project generates and dedicates to the public domain; your data's is
governance.data_licence) and the base
model (train.finetune.base_model: `pretrain` is trained here on the corpus, so it carries the
corpus's licence; another model's licence comes from governance.base_model_licence, else from
its model card's `license:`, the Hugging Face convention, as read when train@pretrain fetched it). An input whose
licence nobody stated is NOASSERTION (SPDX's word for it). Registering a release, or promoting one to production,
is refused unless every licence is in deploy.allowed_licences, naming the input that is not; and since a run is
made to be registered, training refuses, before any work, inputs that registration would refuse (`before_training`).
"""

from __future__ import annotations

from pathlib import Path

from llmops.core.errors import LlmopsError

EMBEDDED = "CC0-1.0"  # the generated sample data and corpus
UNKNOWN = "NOASSERTION"


class LicenceError(LlmopsError):
    """A release built on an input whose licence this deployment does not allow; the message names the input."""


def of_inputs(params, root: str | Path = ".", fetched_only: bool = False) -> list[dict[str, str]]:
    """One entry per input of the release: {"input": what and where, "licence": SPDX id}.

    The corpus is an input only of a base pretrained on it: the demo's, or a named one whose pretraining continued
    on it (train.pretrain.continue_pretraining). With `fetched_only`, a named base
    not fetched yet, whose licence nobody stated, is left out (its card is read when train@pretrain fetches it).
    """
    from llmops.training import base_model

    data, ft = params.data, params.train.finetune
    demo = not base_model.is_named(ft.base_model)
    stated = params.governance.data_licence or (UNKNOWN if any((data.instructions, data.corpus)) else EMBEDDED)
    entries = [{"input": f"data.{name} ({value})" if value else f"data.{name} (the embedded sample)",
                "licence": stated if value else EMBEDDED}
               for name, value in (("instructions", data.instructions), ("eval_instructions", data.eval_instructions),
                                   ("corpus", data.corpus))
               if (value or name != "eval_instructions")
               and (name != "corpus" or demo or params.train.pretrain.continue_pretraining)]
    if demo:
        corpus = next(e["licence"] for e in entries if e["input"].startswith("data.corpus"))
        entries.append({"input": "train.finetune.base_model (pretrain: trained here on data.corpus)",
                        "licence": params.governance.base_model_licence or corpus})
    elif params.governance.base_model_licence or not fetched_only or \
            base_model.matches(base_model.recorded(root), ft.base_model, ft.revision):
        entries.append({"input": f"train.finetune.base_model ({ft.base_model})",
                        "licence": params.governance.base_model_licence or _card_licence(params, Path(root))})
    return entries


def _card_licence(params, root: Path) -> str:
    """The `license:` of the base's model card (README.md front matter): as recorded when it was fetched into
    models/pretrain, else from its directory or the hub (or the hub cache); NOASSERTION if none."""
    from huggingface_hub import ModelCard

    from llmops.training import base_model

    ft = params.train.finetune
    fetched = base_model.recorded(root)
    if base_model.matches(fetched, ft.base_model, ft.revision):
        return fetched.get("licence") or UNKNOWN
    local = root / Path(ft.base_model).expanduser()
    try:
        card = ModelCard.load(local / "README.md" if local.is_dir() else ft.base_model)
    except Exception:  # no card, no network, no such model: nobody stated a licence
        return UNKNOWN
    return str(card.data.license or UNKNOWN)


def check(lineage: dict, allowed: list[str], what: str) -> None:
    """Raise LicenceError unless every input licence recorded in `lineage` is in `allowed` (case-insensitive)."""
    entries = lineage.get("licences")
    if entries is None:
        raise LicenceError(f"{what}: its lineage records no licences (released before they were recorded); run the "
                           "pipeline again to release it with them")
    permitted = {a.lower() for a in allowed}
    for entry in entries:
        if entry["licence"].lower() not in permitted:
            raise LicenceError(f"{what}: it is built on {entry['input']}, licensed {entry['licence']}, which "
                               f"deploy.allowed_licences ({', '.join(allowed) or 'none'}) does not list")


def before_training(params, root: str | Path = ".") -> None:
    """Refuse, before any work, a run whose inputs registration would refuse (deploy.allowed_licences).

    Raises:
        ConfigError: naming the input, its licence, and the keys that decide.
    """
    refuse_unregistrable(params, of_inputs(params, root, fetched_only=True))


def refuse_unregistrable(params, entries: list[dict[str, str]]) -> None:
    """Raise ConfigError for the first of `entries` whose licence deploy.allowed_licences does not list."""
    from llmops.core.config import ConfigError

    try:
        check({"licences": entries}, params.deploy.allowed_licences, "this run")
    except LicenceError as exc:
        raise ConfigError(f"{exc}, so its model could never be registered; state the licence "
                          "(governance.data_licence, governance.base_model_licence) or allow it") from None
