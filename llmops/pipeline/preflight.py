"""Checks that need no work: run before the Prefect server starts and before DVC touches any output."""

from __future__ import annotations

import os
from pathlib import Path

from llmops.core.config import ConfigError, Params, stage_inputs
from llmops.training import base_model


def check_inputs(params: Params, root: str | os.PathLike = ".") -> None:
    """Refuse a run whose local input files or directories do not exist, that asks for hardware this machine lacks,
    or whose inputs' licences registration would refuse.

    s3:// inputs and hub ids are checked by their stage, which can reach them; this
    catches the typo in a local path before any previous output is touched.

    Raises:
        ConfigError: one line per missing input, naming its dotted key.
    """
    root = Path(root)
    files = {
        "data.instructions": params.data.instructions,
        "data.eval_instructions": params.data.eval_instructions,
        "data.corpus": params.data.corpus,
        "data.corrections": params.data.corrections,
        "audit_bias.data": params.audit_bias.data,
    }
    dirs = {"train.finetune.adapter": params.train.finetune.adapter}
    base = params.train.finetune.base_model
    if base_model.is_named(base) and base_model.is_local(base, root):
        dirs["train.finetune.base_model"] = base
    problems = [f"{key}: {value}: a relative path out of the project; name it by its absolute path (a run builds in "
                "a workspace under .llmops/workspaces/, where it would name another file)"
                for pairs in stage_inputs(params).values() for key, value in pairs
                if "://" not in value and not os.path.isabs(os.path.expanduser(value))
                and os.path.normpath(value).startswith("..")]
    for key, value in files.items():
        if value and not value.startswith("s3://") and not (root / Path(value).expanduser()).is_file():
            problems.append(f"{key}: {value}: no such file")
    for key, value in dirs.items():
        if value and not (root / Path(value).expanduser()).is_dir():
            problems.append(f"{key}: {value}: no such directory")
    if problems:
        raise ConfigError("\n".join(problems))
    from llmops.evaluation import harness
    from llmops.training import licences
    from llmops.training.quantization import check_runnable

    check_runnable(params.quantize.methods)
    harness.check(params.evaluate.harness_tasks, root, params.train.finetune.method)
    licences.before_training(params, root)  # what registration would refuse is refused before any training
