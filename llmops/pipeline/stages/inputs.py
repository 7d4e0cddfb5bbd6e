"""inputs: fingerprints of the files your params name for the stages to read (llmops/pipeline/fingerprints.py).

dvc.yaml runs it every time (always_changed): it only hashes files. Each stage that reads such files depends on
its reports/inputs/<stage>.json, so DVC runs it again when one of them changed, and skips it when none did.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmops.core.config import Params, readers, storage_from_env
from llmops.pipeline import fingerprints
from llmops.pipeline.repro import StageRun
from llmops.pipeline.stage import run_cli


def _cli_body(params: Params) -> str:
    counts = fingerprints.write(".", params, storage_from_env(params.storage))
    named = ", ".join(f"{n} for {stage}" for stage, n in counts.items() if n)
    return f"inputs: fingerprints of the files params name ({named or 'none: every input is generated'}) -> " \
           f"{fingerprints.OUT_DIR}/"


def main() -> int:
    return run_cli("inputs", _cli_body)


def publish(root: Path, run: StageRun) -> dict:
    """For the flow: each reading stage's fingerprinted files."""
    return {stage: [p.get("path") or p.get("uri") for p in
                    json.loads((root / fingerprints.OUT_DIR / f"{stage}.json").read_text())]
            for stage in readers()}
