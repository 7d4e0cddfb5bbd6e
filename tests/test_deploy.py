"""The deploy step: a candidate that fails its smoke request never reaches production, and the server keeps answering
with the version before; promotions and rollbacks move the running server without dropping requests in flight."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import free_port, run, set_params, stop_servers
from llmops.serving import instances as servers

pytestmark = [pytest.mark.services, pytest.mark.training]


def ask(client, model: str = "model") -> str:
    """Which version answered a chat request."""
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What comes after 3?"}],
                                          max_tokens=3, temperature=0).model


def test_a_broken_smoke_test_leaves_production_serving_the_version_before(versioned_project):
    """(The flow's own deploy, `llmops run` to a served model, is in test_flow and test_monitor; here the deploy
    step is called directly, on v1 in production and v2 registered.)"""
    from openai import OpenAI

    from llmops.serving import deploy
    from llmops.core.config import load_params

    project = versioned_project
    port = free_port()
    set_params(project, "deploy.target=local", f"deploy.port={port}")
    params = load_params(project / "params.yaml").deploy
    try:
        first = deploy.deploy(project, "v1.0.0", params, "a test")  # production already: started and asked
        assert first.version == "v1.0.0" and first.previous is None and first.answer
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                        api_key=(project / ".llmops/serve/api_key").read_text().strip(), max_retries=0)
        assert ask(client) == "model@v1.0.0"

        # a new release whose smoke answer cannot pass: staged, never production
        with pytest.raises(deploy.DeployError, match="v2.0.0 failed its smoke test, so production stays on v1.0.0: "
                                                     "the smoke answer"):
            deploy.deploy(project, "v2.0.0", params.model_copy(update={"smoke_expect": "an answer no model gives"}),
                          "a test")
        listing = run(["llmops", "registry", "list", "--json"], project).stdout.splitlines()
        assert [(v["version"], v["stages"]) for v in map(json.loads, listing)] == [("v2.0.0", ["staging"]),
                                                                                   ("v1.0.0", ["production"])]
        assert ask(client) == "model@v1.0.0"  # the same server, untouched
        assert [s.port for s in servers.running(project)] == [port]  # the candidate's server is gone

        # promoting by hand reloads the server that follows production; streams in flight finish on the old model
        streams = [iter(client.completions.create(model="model", prompt="a", max_tokens=60, temperature=1.0,
                                                  stream=True, extra_body={"ignore_eos": True})) for _ in range(4)]
        firsts = [next(s) for s in streams]
        done: list[list] = []
        readers = [threading.Thread(target=lambda s=s: done.append(list(s))) for s in streams]
        promoted = run(["llmops", "registry", "promote", "v2", "--to", "production", "--why", "fixed by hand"], project)
        [t.start() for t in readers]
        [t.join(60) for t in readers]
        assert f"http://127.0.0.1:{port}/v1 now serves v2.0.0" in promoted.stdout
        assert all(f.model == "model@v1.0.0" for f in firsts)
        assert len(done) == 4 and all(rest[-1].choices[0].finish_reason == "length" for rest in done)
        assert ask(client) == "model@v2.0.0"

        back = run(["llmops", "registry", "rollback", "--why", "users preferred v1"], project)
        assert "production: rolled back v2.0.0 -> v1.0.0" in back.stdout
        assert ask(client) == "model@v1.0.0" and ask(client, "model@v1.0.0") == "model@v1.0.0"
        history = run(["llmops", "registry", "history", "--stage", "production"], project).stdout
        assert "rollback from v2.0.0: users preferred v1" in history and "fixed by hand" in history
    finally:
        stop_servers(project)
    assert servers.running(project) == []


def test_a_port_taken_by_another_program_is_refused_before_anything_moves(ran_project):
    import socket

    project = ran_project
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = run(["llmops", "run", "--no-push", "-S", "deploy.target=local", "-S", f"deploy.port={port}"], project,
                   check=False)
    assert proc.returncode == 1
    assert f"deploy: 127.0.0.1:{port} is in use by another program; stop it or set deploy.port" in proc.stderr
    # refused before the first stage: once found only after every stage, the push and the registration
    assert "Running stage" not in proc.stdout + proc.stderr
    assert run(["llmops", "registry", "list"], project).stdout.startswith("no versions registered yet")
    assert servers.running(project) == []
