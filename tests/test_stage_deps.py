"""dvc.yaml's code deps are the code each stage runs: a stage that imports a module its deps do not list would not run
again when that module changes, and its outputs would go stale without DVC knowing."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import grimp
import pytest
from ruamel.yaml import YAML

from conftest import REPO
from llmops.core import dvcyaml
from llmops.pipeline.stage import declared

# What runs and records a stage, not what it computes: a change there changes no output, so it does not run the
# stage again (the audit trail and who acts, the stage runner and DVC's wrapper, git, errors, locks, state paths).
MACHINERY = {"llmops.governance.audit", "llmops.governance.identity", "llmops.governance.access",
             "llmops.governance.apikeys", "llmops.pipeline.stage", "llmops.pipeline.repro", "llmops.core.git",
             "llmops.core.errors", "llmops.core.locks", "llmops.core.layout"}


def _machinery(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in MACHINERY)


def _runs(graph: grimp.ImportGraph, module: str) -> set[str]:
    """The modules `module` imports, directly or through others, leaving out the machinery and what only it imports."""
    seen, todo = set(), [module]
    while todo:
        for imported in graph.find_modules_directly_imported_by(todo.pop()):
            if imported.startswith("llmops.") and not _machinery(imported) and imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return {m for m in seen | {module} if not graph.find_children(m)}  # a package's __init__ holds no code


def _code_deps(body: dict) -> set[str]:
    """The llmops modules a dvc.yaml stage lists as deps (a foreach stage: its template and its items' `base`)."""
    stage = body.get("do", body)
    paths = [str(d) for d in stage.get("deps", [])]
    paths += [str(item.get("base")) for item in (body.get("foreach") or {}).values() if isinstance(item, dict)]
    return {p.removesuffix(".py").replace("/", ".") for p in paths if p.startswith("llmops/") and p.endswith(".py")}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("llmops")


@pytest.mark.parametrize("name", list(declared(REPO)))
def test_a_stage_lists_every_module_it_runs_and_no_other(name, graph):
    body = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"][name]
    module = f"llmops.pipeline.stages.{name}"
    runs = _runs(graph, module)
    listed = _code_deps(body)
    assert not runs - listed, f"dvc.yaml's {name} runs code its deps do not list: {sorted(runs - listed)}"
    assert not listed - runs, f"dvc.yaml's {name} lists code it does not run: {sorted(listed - runs)}"


def test_the_check_sees_a_missing_dep(graph):
    """The check itself: train without the trainer in its deps is caught."""
    body = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    body["do"]["deps"] = [d for d in body["do"]["deps"] if d != "llmops/training/trainer.py"]
    runs = _runs(graph, "llmops.pipeline.stages.train")
    assert "llmops.training.trainer" in runs - _code_deps(body)


@pytest.mark.parametrize("name", list(declared(REPO)))
def test_every_stage_module_is_a_stage(name):
    from llmops.pipeline.stage import Stage

    assert isinstance(declared(REPO)[name].module, Stage)


def test_a_module_without_publish_is_not_a_stage(monkeypatch):
    import types

    from llmops.pipeline.stage import StageSpec

    monkeypatch.setitem(__import__("sys").modules, "llmops.pipeline.stages.half", types.ModuleType("half"))
    with pytest.raises(TypeError, match="not a stage"):
        StageSpec(name="half", desc="").module


_PROJECT_PATH = re.compile(r"(data|reports|models)(/[\w.@-]+)+/?")


def _path_literals(graph: grimp.ImportGraph, module: str) -> set[str]:
    """Every string constant that names a project path (data/..., reports/..., models/...) in the code `module` runs."""
    found = set()
    for name in _runs(graph, module):
        tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
        found |= {node.value.rstrip("/") for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and _PROJECT_PATH.fullmatch(node.value)}
    return found


def _undeclared(literals: set[str], declared_paths: set[str]) -> set[str]:
    """The literals that are neither a declared path, nor inside one, nor a folder holding one."""
    def related(literal: str, path: str) -> bool:
        return literal == path or literal.startswith(path + "/") or path.startswith(literal + "/")
    return {lit for lit in literals if not any(related(lit, p) for p in declared_paths)}


@pytest.mark.parametrize("name", list(declared(REPO)))
def test_the_paths_a_stage_names_are_the_ones_dvc_yaml_declares(name, graph):
    """A stage's code names its paths only as dvc.yaml declares them: a path changed there and not in the code (or
    the other way round) fails here, not as a stage that writes an output DVC does not know."""
    entries = [d for key, d in dvcyaml.stages(REPO).items() if key == name or key.startswith(f"{name}@")]
    paths = {p.rstrip("/") for d in entries for p in d.deps + d.outs + d.metrics + d.plots}
    literals = _path_literals(graph, f"llmops.pipeline.stages.{name}")
    undeclared = _undeclared(literals, paths)
    assert not undeclared, f"{name}'s code names paths dvc.yaml does not declare for it: {sorted(undeclared)}"


def test_the_path_check_sees_an_undeclared_path(graph):
    literals = _path_literals(graph, "llmops.pipeline.stages.evaluate")
    assert "reports/evaluate" in literals
    assert _undeclared(literals, {"data/prepared/eval.jsonl"}) >= {"reports/evaluate"}
