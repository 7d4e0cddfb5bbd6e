"""The `llmops` command: run the pipeline flow, run one stage (as dvc.yaml does), check params."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import signal
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

from llmops.cli import explain as explain_cli
from llmops.cli import monitor as monitor_cli
from llmops.cli import output
from llmops.cli import registry as registry_cli
from llmops.cli import route as route_cli
from llmops.cli import serve as serve_cli
from llmops.cli import trail as trail_cli
from llmops.core import forkserver, locks
from llmops.core.config import PARAMS_FILE, ConfigError, load_params, overlay, storage_for, write_params
from llmops.core.errors import LlmopsError
from llmops.core.storage import StorageError, check_remote
from llmops.governance import audit, identity
from llmops.pipeline.prefect_api import PrefectUnavailable, prefect_api
from llmops.pipeline.preflight import check_inputs
from llmops.pipeline.stage import declared, summaries
from llmops.registry import versions as registry

EXIT_BAD_PARAMS = 2
# commands that were renamed: the old name is refused with the new one, not with a near miss (`audit` is closer to the
# stage audit_bias than to the trail it named)
RENAMED = {"audit": ("trail", "the audit trail: trail verify|log|policy; the bias audit is the stage audit_bias")}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, suggesting the choice meant by a mistyped one, as Python 3.14's suggest_on_error does (and in
    its words); subparsers are of this class too (add_subparsers' parser_class), so actions and values get it."""

    def _check_value(self, action: argparse.Action, value) -> None:
        # where 3.11's argparse refuses a value outside `choices`: a command, an action, a --device
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError:
            choices = [str(c) for c in action.choices]
            if value in RENAMED and RENAMED[value][0] in choices:
                new, why = RENAMED[value]
                raise argparse.ArgumentError(action, f"{value!r} is now {new!r} ({why})") from None
            # a beginning typed (`llmops reg`) names what it begins; else the closest (`llmops serv`)
            begun = [c for c in choices if c.startswith(str(value))]
            close = begun[:1] or difflib.get_close_matches(str(value), choices, n=1)
            if not close:
                raise
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}, maybe you meant {close[0]!r}? "
                                         f"(choose from {', '.join(map(repr, choices))})") from None


def _parser(list_stages: bool = False) -> argparse.ArgumentParser:
    """The parser; `list_stages`: the stages among the commands (a subcommand with help), as shell completion needs
    them, rather than apart in the epilog."""
    stages = declared()
    parser = _Parser(
        prog="llmops",
        description="LLMOps pipeline: Prefect orchestrates, DVC versions, each stage does one job.",
        epilog=None if list_stages else _stages_help(stages), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmops {version('llmops')}")
    # the stages are listed apart, in the epilog (argparse lists one group of subcommands): a stage is one step of
    # the pipeline, a command acts on what the pipeline made
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    run = sub.add_parser(
        "run",
        help=f"run the pipeline flow ({' -> '.join(declared())} -> push)",
        description=(
            "Run the pipeline as a Prefect flow. Stages run through DVC, so unchanged ones are skipped. "
            "Uses Prefect's local API, or the server at PREFECT_API_URL when set."
        ),
    )
    _add_overrides(run)
    run.add_argument("--no-push", action="store_true", help="do not push outputs to the DVC remote")
    run.add_argument("--commit", help="build this commit, branch or tag in a workspace of its own (a git worktree "
                     "sharing the DVC cache), not the checkout as it is")

    sub.add_parser(
        "setup", help="make the Prefect server at PREFECT_API_URL ready: work pool, concurrency limit, deployments",
        description="Create the process work pool and the concurrency limit (orchestration.concurrency_limit), and register deployments/prefect.yaml's deployments (schedules, "
        "typed parameter forms) for this checkout on the Prefect server at PREFECT_API_URL; then start a worker "
        "with `prefect worker start --pool llmops`.")

    for verb, does in (("approve", "promote its version to production"), ("reject", "end it; nothing is promoted")):
        review = sub.add_parser(
            verb, help=f"answer a flow run paused for approval (deploy.require_approval): {does}",
            description=f"{verb.capitalize()} the release a paused flow run waits on ({does}), through the Prefect "
            "API at PREFECT_API_URL, as the UI's Resume form does. The decision, who and why go into the run and "
            "the registry's history.")
        review.add_argument("run", help="the flow run's name or id (the run's log prints the command)")
        review.add_argument("--reason", required=True, help="why; kept in the run and the registry's history")
        review.add_argument("--reviewer", help="who decides: must be you (your OS account, or LLMOPS_TOKEN's key); "
                            "checked, never taken on trust")

    hook = sub.add_parser(
        "install-hook", help="retrain on git push: a post-receive hook for the shared repository",
        description="Write the post-receive hook of the repository people push to (a bare repository on this "
        "machine): a push to BRANCH that changes params.yaml, dvc.yaml or a *.dvc pointer starts a run of the "
        "on-push deployment for the pushed commit on the Prefect server at PREFECT_API_URL. On GitHub, "
        ".github/workflows/retrain.yml does the same.")
    hook.add_argument("repo", help="the repository pushed to (bare, or a checkout)")
    hook.add_argument("--branch", default="main", help="the branch whose pushes retrain (default: main)")
    hook.add_argument("--force", action="store_true", help="replace a post-receive hook that is not llmops's")

    erase = sub.add_parser(
        "erase", help="GDPR erasure: a data subject out of every dataset version, the remote, the cache, the logs",
        description="Find every row that mentions SUBJECT (case-insensitive) in every dataset version DVC tracks "
        "under data/ (any commit, the registry's included), write new versions of the current inputs without them "
        "(rebuilt through prepare_data and validate_data, pushed, committed), remove every stored file that held "
        "them from the DVC cache and the remote, remove the subject from the request log, the feedback database and "
        "the monitor's outputs, and list the model versions trained on affected data. Recorded in the audit trail "
        "by the subject's sha256, never its value. Needs the admin role (governance/policy.csv).")
    erase.add_argument("--subject", required=True, help="the value to erase: a name, an email address, an id")
    erase.add_argument("--retrain", action="store_true", help="start the pipeline deployment (monitor.retrain."
                       "deployment, at PREFECT_API_URL) on the new dataset version")

    spaces = sub.add_parser(
        "workspaces", help="the workspaces of runs that built a commit (kept after a failure)",
        description="List the workspaces under .llmops/workspaces/ (a run that failed leaves its own), or remove them.")
    spaces.add_argument("action", nargs="?", choices=["clean"], help="clean: remove those no run is using")
    output.add_json(spaces, "one JSON object per workspace and line (path, commit)")

    params = sub.add_parser(
        "params", help="validate params.yaml (with overrides) and print the values a run will use",
        description="Validate params.yaml and -S overrides against the schema and print the values a run "
        "will use as YAML (LLMOPS_S3_* environment variables applied).",
    )
    _add_overrides(params)
    params.add_argument("--apply", metavar="FILE", help="lay the values FILE sets (a params file, whole or in part, "
                        "e.g. one of configs/) over params.yaml and write them into it, every other key and comment "
                        "kept; prints the keys that changed")
    output.add_json(params, "the values as one JSON document")

    registry_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    route_cli.add_parser(sub)
    monitor_cli.add_parser(sub)
    trail_cli.add_parser(sub)
    explain_cli.add_parser(sub)

    completion = sub.add_parser(
        "completion", help="print the shell completion script: llmops completion bash|zsh|tcsh",
        description="Print a completion script for SHELL, generated from these commands (shtab), e.g. "
        "`llmops completion bash > ~/.local/share/bash-completion/completions/llmops`, or "
        "`llmops completion zsh > \"${fpath[1]}/_llmops\"`. Generate it again after dvc.yaml's stages change.")
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"])

    for spec in stages.values():
        cmd = sub.add_parser(  # without help=, a subcommand is left out of the commands' list
            spec.name, **({"help": f"stage: {spec.desc}"} if list_stages else {}),
            description=f"Run the {spec.name} stage alone with params.yaml (this is the command dvc.yaml runs).",
        )
        if spec.keys:
            cmd.add_argument("key", choices=spec.keys, help=f"which one: params section {spec.name}.<key>")
    return parser


def _stages_help(stages: dict) -> str | None:
    """The stages, listed as argparse lists commands: the name, then its help wrapped beside it (to the width argparse
    wraps to)."""
    if not stages:
        return None
    width, columns = max(map(len, stages)), shutil.get_terminal_size().columns - 2
    return "\n".join(["stages, in pipeline order (each runs alone, as dvc.yaml runs it):", *(
        textwrap.fill(spec.desc, width=columns, initial_indent=f"  {spec.name:<{width}}  ",
                      subsequent_indent=" " * (width + 4)) for spec in stages.values())])


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a parameter by its dotted key, e.g. -S data.num_examples=500 (repeatable); "
        "like `dvc exp run -S`, a run writes it to params.yaml",
    )


def main(argv: list[str] | None = None) -> int:
    # a stage, as DVC runs it, or a server: forked past its imports where a fork server serves
    if argv is None and forkserver.enabled() and (sys.argv[1:2] and sys.argv[1] in declared()
                                                   or sys.argv[1:3] == ["serve", "start"]):
        status = forkserver.forward(sys.argv, entry="llmops.cli.main:main")
        if status is not None:
            return status
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, not at exit, where a reader gone would be an "Exception ignored" message
        return status
    except BrokenPipeError:  # `llmops trail log | head`: the reader has what it wanted, no traceback
        # (Python's recipe: point stdout at /dev/null, or its flush at exit fails again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command that SIGPIPE ended


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    stages = declared()
    if args.command in stages:
        return stages[args.command].module.main(*([args.key] if stages[args.command].keys else []))
    if args.command == "registry":
        return registry_cli.main(args)
    if args.command == "serve":
        return serve_cli.main(args)
    if args.command == "route":
        return route_cli.main(args)
    if args.command in ("monitor", "feedback"):
        return monitor_cli.main(args)
    if args.command == "trail":
        return trail_cli.main(args)
    if args.command == "explain":
        return explain_cli.main(args)
    if args.command == "erase":
        return _erase(args)
    if args.command == "workspaces":
        return _workspaces(Path.cwd(), args.action, args.json)
    if args.command == "completion":
        return _completion(args.shell)
    if args.command == "setup":
        return _setup(Path.cwd())
    if args.command in ("approve", "reject"):
        return _answer(args)
    if args.command == "install-hook":
        return _install_hook(args)
    root = Path.cwd()
    try:  # everything that can be refused without work is refused here, before Prefect or DVC start
        if args.command == "params" and args.apply:
            changed = write_params(PARAMS_FILE, overlay(PARAMS_FILE, args.apply, args.overrides))
            print(f"params.yaml: {len(changed)} value(s) from {args.apply}" + "".join(f"\n  {k}" for k in changed))
            return 0
        params = load_params(PARAMS_FILE, args.overrides)
        storage = storage_for(params.storage, root)  # what the run uses (LLMOPS_S3_*); never written to params.yaml
        if args.command == "params":
            values = params.model_copy(update={"storage": storage}).model_dump(mode="json")
            if args.json:
                print(json.dumps(values, indent=2))
            else:
                from ruamel.yaml import YAML

                YAML().dump(values, sys.stdout)
            return 0
        check_inputs(params, root)
        if args.commit is not None:  # that commit's params.yaml, with the overrides (the flow checks its inputs)
            params = _commit_params(root, args.commit, args.overrides)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    try:  # refused before any work; each stage asks again, as `dvc repro` alone would
        audit.require(root, "pipeline.run", "pipeline", ("run", "pipeline"))
    except LlmopsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    push = not args.no_push
    if push:
        try:  # an unreachable remote is refused before the Prefect server starts (the flow checks it again)
            check_remote(storage)
        except StorageError as exc:
            print(f"error: pipeline failed: {exc}", file=sys.stderr)
            return 1
    return _run(root, params, push=push, commit=args.commit)


def _answer(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from llmops.pipeline.approval import answer

    try:
        who = identity.check_named(Path.cwd(), args.reviewer)  # a viewer once passed as `--reviewer approver`
        if (Path.cwd() / PARAMS_FILE).is_file():  # in the project: its policy refuses at once (the flow asks again)
            audit.require(Path.cwd(), f"registry.{args.command}", registry.ARTIFACT, ("approve", "stage:production"),
                          who=who, run=args.run)
        print(answer(args.run, args.command == "approve", args.reason, who))
    except ValidationError as exc:
        print(f"error: {args.command}: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    except LlmopsError as exc:
        print(f"error: {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _erase(args: argparse.Namespace) -> int:
    from llmops.pipeline import erasure

    try:
        with locks.exclusive(Path.cwd() / locks.RUN_LOCK, "`llmops erase`"):  # never beside a run of this checkout
            print(erasure.summary(erasure.erase(Path.cwd(), args.subject, retrain=args.retrain)))
    except LlmopsError as exc:
        print(f"error: erase: {exc}", file=sys.stderr)
        return 1
    return 0


def _install_hook(args: argparse.Namespace) -> int:
    from llmops.pipeline.triggers import TriggerError, install_hook

    try:
        hook = install_hook(args.repo, args.branch, force=args.force)
    except TriggerError as exc:
        print(f"error: install-hook: {exc}", file=sys.stderr)
        return 1
    print(f"{hook}: a push to {args.branch} that changes params.yaml, dvc.yaml or a *.dvc pointer now starts a run "
          "of build-model/on-push for the pushed commit")
    return 0


def _setup(root: Path) -> int:
    from llmops.pipeline.orchestration import SetupError, setup

    try:
        for line in setup(root):
            print(line)
    except SetupError as exc:
        print(f"error: setup: {exc}", file=sys.stderr)
        return 1
    return 0


def _commit_params(root: Path, ref: str, overrides: list[str]):
    """The params a run of commit `ref` uses: its own params.yaml with the -S overrides (None when there are none)."""
    import tempfile

    from llmops.core import git
    from llmops.pipeline import workspaces

    try:
        sha = workspaces.resolve(root, ref)
    except workspaces.WorkspaceError as exc:
        raise ConfigError(f"--commit: {exc}") from None
    text = git.out(root, "show", f"{sha}:{PARAMS_FILE}", error=ConfigError)  # a commit without one: said, not a traceback
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / PARAMS_FILE).write_text(text)
        params = load_params(Path(tmp) / PARAMS_FILE, overrides)  # checked here, before anything starts
    return params if overrides else None


def _workspaces(root: Path, action: str | None, as_json: bool) -> int:
    from llmops.pipeline import workspaces

    if action == "clean" and as_json:
        print("error: workspaces: --json lists them; clean takes none", file=sys.stderr)
        return EXIT_BAD_PARAMS
    try:
        found = workspaces.kept(root)
        for ws in found if action == "clean" else ():
            print(f"removed {ws.path}" if workspaces.discard(root, ws) else
                  f"in use by a running pipeline, kept: {ws.path}")
    except workspaces.WorkspaceError as exc:
        print(f"error: workspaces: {exc}", file=sys.stderr)
        return 1
    if as_json:
        output.show(output.json_lines({"path": str(ws.path), "commit": ws.commit} for ws in found))
    elif not found:
        print("no workspaces: every run succeeded, and its workspace was removed")
    elif action != "clean":
        print(output.table(["PATH", "COMMIT"], ([ws.path, ws.commit[:12]] for ws in found)))
    return 0


def _completion(shell: str) -> int:
    # shtab writes a static script from the parser: nothing of llmops runs while a shell completes
    import shtab

    print(shtab.complete(_parser(list_stages=True), shell))
    return 0


def _run(root: Path, params, push: bool, commit: str | None = None) -> int:
    # Prefect's server reports telemetry by default; a pipeline run should not phone home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a scheduler or a supervisor stops a run with SIGTERM: end it as Ctrl-C does, training processes included
    signal.signal(signal.SIGTERM, _interrupt)
    # and Ctrl-C always interrupts, even when the parent started us with SIGINT ignored (an ignored signal is
    # inherited through exec, and Python then leaves it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with locks.exclusive(root / locks.RUN_LOCK, "`llmops run`"), prefect_api(root):
            previous = _previous_metrics(root)  # once the run is ours: a refused run returns at once
            from llmops.pipeline.flows.build_model import build_model

            state = build_model(params=params, push=push, commit=commit, return_state=True)
    except (locks.Busy, PrefectUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the run stopped, and the checkout is as it was unless the run had registered its model; "
              "the next `llmops run` resumes training from its complete checkpoints and restores the stages it "
              "completed from DVC's run-cache", file=sys.stderr)
        return 130
    if not state.is_completed():
        print(f"error: pipeline {state.name.lower()}: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    if Path(result.project) == root:
        print(f"\nPipeline completed (commit {result.commit[:12]}). Results:")
        for path in result.outputs:
            print(f"  {result.project}/{path}")
    else:  # its workspace is gone: the outputs are in the DVC cache (and remote), under that commit's dvc.lock
        print(f"\nPipeline completed: commit {result.commit[:12]} built in a workspace of its own (now removed); "
              "its outputs are in the DVC cache, pinned by the registered version's commit")
    for line in summaries(root, result.results, previous):  # each stage says what its result means
        print(line)
    if result.remote:
        print(f"  pushed to DVC remote: {result.remote}")
    print(f"Registered as {registry.ARTIFACT} {result.version} (`llmops registry lineage {result.version}`)")
    if result.deployed is not None:
        from llmops.serving.deploy import summary

        print(summary(result.deployed))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _previous_metrics(root: Path) -> dict[str, dict]:
    """Each stage's metrics as the last completed run left them (its first metrics file in dvc.yaml), to print beside
    this run's.

    Read as plain JSON: the stage modules import Prefect, which must wait until its API is chosen.
    """
    from llmops.core.errors import LlmopsError
    from llmops.pipeline.stage import plan

    try:
        stages = plan(root)
    except LlmopsError:  # the flow reports it
        return {}
    previous = {}
    for stage in stages:
        try:
            previous[stage.dvc_name] = json.loads((root / stage.metrics[0]).read_text())
        except (IndexError, OSError, ValueError):
            continue
    return previous
