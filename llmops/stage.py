"""The command-line shell shared by every stage: load params, run, turn errors into exit codes."""

from __future__ import annotations

import sys
from typing import Callable

from llmops.config import ConfigError, Params, load_params
from llmops.datasets import DataError
from llmops.fit import FitError
from llmops.modeling import ModelError
from llmops.storage import StorageError

EXIT_BAD_PARAMS = 2
EXIT_FAILED = 1


class StageFailed(Exception):
    """The stage ran and its verdict is no (e.g. the data failed validation)."""


def run_cli(stage: str, body: Callable[[Params], str], params_file: str = "params.yaml") -> int:
    """Run `body(params)` as the CLI of `stage`: print its summary, or one clear error.

    Exit codes: 0 done, 1 bad input or failed verdict, 2 bad params. The error
    starts with "error: <stage>:" so a caller (the flow, through DVC) can pick it out.
    """
    try:
        params = load_params(params_file)
    except ConfigError as exc:
        _print_error(stage, exc)
        return EXIT_BAD_PARAMS
    try:
        print(body(params))
    except (DataError, StorageError, StageFailed, ModelError, FitError) as exc:
        _print_error(stage, exc)
        return EXIT_FAILED
    return 0


def _print_error(stage: str, exc: Exception) -> None:
    print(f"error: {stage}: {exc}", file=sys.stderr)
