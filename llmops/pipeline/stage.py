"""What a stage is, declared once: an entry in dvc.yaml, a module llmops/pipeline/stages/<name>.py, a params section <name>.

dvc.yaml is the declaration: the stage's command, inputs, outputs and `desc`. The CLI
(`llmops <name>`), the flow (its order is dvc.yaml's DAG) and the tests read the stages
from it; a test (tests/test_stage_deps.py) checks that its deps list the code the stage runs.
The module `llmops/pipeline/stages/<name>.py` holds the work and is a `Stage` (below); it may also
be `Summarised` and `ShowsFailure`.

A foreach stage (train) has one DVC stage per key (train@pretrain, train@finetune), one CLI
command with the key as its argument, and one Prefect task run per key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Protocol, cast, runtime_checkable

from llmops.core import dvcyaml, git
from llmops.core.config import ConfigError, Params, load_params
from llmops.core.errors import LlmopsError, Refused
from llmops.governance import audit

EXIT_BAD_PARAMS = 2
EXIT_FAILED = 1


@runtime_checkable
class Stage(Protocol):
    """What every stage module defines."""

    def main(self, *keys: str) -> int:
        """The command dvc.yaml runs (`llmops <name> [<key>]`), through run_cli."""

    def publish(self, root: Path, run: Any) -> Any:
        """After DVC ran the stage (or found it unchanged) in a flow: its Prefect artifacts and the flow's result."""


@runtime_checkable
class Summarised(Protocol):
    def summary(self, result: Any, previous: dict | None) -> str:
        """The lines `llmops run` ends with (and a reviewer reads before approving); `previous` is the stage's
        metrics file as the last run left it."""


@runtime_checkable
class ShowsFailure(Protocol):
    def publish_failed(self, root: Path, stage: str) -> None:
        """What a failed run still shows (a report, a verdict)."""


class StageFailed(LlmopsError):
    """The stage ran and its verdict is no (e.g. the data failed validation, the gate refused)."""


@dataclass(frozen=True)
class StageSpec:
    name: str  # the dvc.yaml stage, the CLI command, the params section, the Prefect task, its module in llmops/pipeline/stages/
    desc: str
    keys: tuple[str, ...] = ()  # foreach keys: the DVC stages are <name>@<key>

    @property
    def module(self) -> Stage:
        module = import_module(f"llmops.pipeline.stages.{self.name}")
        if not isinstance(module, Stage):
            raise TypeError(f"{module.__name__} is not a stage: it must define main and publish")
        return cast(Stage, module)


def declared(root: str | Path | None = None) -> dict[str, StageSpec]:
    """The stages of dvc.yaml, in file order (llmops.core.dvcyaml: `root` defaults to the working directory when it
    holds a dvc.yaml, else the project this package was installed from)."""
    return {
        name: StageSpec(name=name, desc=str(body.get("desc") or body.get("do", {}).get("desc") or ""),
                        keys=tuple(body.get("foreach") or ()))
        for name, body in dvcyaml.raw(root).items()
    }


@dataclass(frozen=True)
class PlannedStage:
    dvc_name: str  # e.g. train@pretrain
    spec: StageSpec
    outs: tuple[str, ...]
    metrics: tuple[str, ...]  # the outs that are DVC metrics


def plan(root: str | Path) -> list[PlannedStage]:
    """Every DVC stage in the order it must run: dvc.yaml's DAG, file order between independent stages.

    Raises:
        StageError: dvc.yaml cannot be read as a pipeline.
    """
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    from llmops.pipeline.repro import StageError

    specs = declared(root)
    try:
        repo = Repo(str(root))
        # dvc.yaml's stages; a *.dvc pointer (data added with `dvc add`, the monitor's corrections) is a stage of
        # DVC's graph too, with no command and no name
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
    except DvcException as exc:  # a malformed dvc.yaml, a missing stage file: DVC's message says where
        raise StageError(f"{dvcyaml.DVC_YAML}: {exc}") from None
    with repo:
        # names, not DVC's addressing: that is relative to the working directory, which a run in a workspace is not in
        # (every stage is in the root dvc.yaml, so a name is unique)
        position = {s.name: i for i, s in enumerate(stages)}
        # DVC's edges run from a stage to the stages it depends on
        ordered = nx.lexicographical_topological_sort(repo.index.graph.reverse(),
                                                      key=lambda s: position.get(getattr(s, "name", None), -1))
        return [
            PlannedStage(dvc_name=s.name, spec=specs[s.name.split("@")[0]],
                         outs=tuple(str(o.def_path) for o in s.outs),
                         metrics=tuple(str(o.def_path) for o in s.outs if o.metric))
            for s in ordered if isinstance(s, PipelineStage)
        ]


def run_cli(stage: str, body: Callable[[Params], str], params_file: str = "params.yaml") -> int:
    """Run `body(params)` as the CLI of `stage`: print its summary, or one clear error.

    Exit codes: 0 done, 1 bad input or failed verdict, 2 refused before any work (bad params, an unusable
    base model or chat template, data that cannot be trained on as params say; llmops.core.errors.Refused). The error
    starts with "error: <stage>:" so a caller (the flow, through DVC) can pick it out.
    """
    try:
        params = load_params(params_file)
    except ConfigError as exc:
        _print_error(stage, exc)
        return EXIT_BAD_PARAMS
    try:
        # audited here, where every stage passes whether DVC, the flow or a person runs it; `version`: the code and
        # params it ran with
        with audit.recorded(".", f"stage.{stage}", stage, _head(), allow=("run", "pipeline")) as note:
            summary = body(params)
            note["summary"] = summary.splitlines()[0] if summary else ""
        print(summary)
    except Refused as exc:  # found before any work: a contradiction only the stage can see, an unusable base...
        _print_error(stage, exc)
        return EXIT_BAD_PARAMS
    except LlmopsError as exc:
        _print_error(stage, exc)
        return EXIT_FAILED
    return 0


def _head() -> str | None:
    return git.answer(".", "rev-parse", "--short=12", "HEAD") or None


def _print_error(stage: str, exc: Exception) -> None:
    print(f"error: {stage}: {exc}", file=sys.stderr)


def summaries(root: str | Path, results: dict[str, Any], previous: dict[str, Any] | None = None) -> list[str]:
    """What each stage's result (DVC stage name -> publish()'s value) means, in the stage's own words, in run order."""
    stages = declared(root)
    modules = {name: stages[name.split("@")[0]].module for name in results}
    return [module.summary(results[name], (previous or {}).get(name))
            for name, module in modules.items() if isinstance(module, Summarised)]
