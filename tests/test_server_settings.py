"""A server's settings, resolved once (llmops/serving/settings.py): params.yaml's values, then `llmops serve start`'s
flags over them; the defaults outside a project; each invalid flag refused with its message. In-process and fast."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from llmops.cli import serve as serve_cli
from llmops.core.config import Params
from llmops.core.errors import LlmopsError
from llmops.governance.privacy import Privacy
from llmops.serving.settings import CanaryLimits, resolve

PARAMS = Params.model_validate({
    "deploy": {"cache_entries": 7, "cache_ttl_s": 60, "read_timeout_s": 12, "privacy": "refuse", "max_adapters": 3,
               "watch_s": 5, "canary_min_requests": 4, "canary_max_error_rate_increase": 0.1,
               "canary_max_latency_ratio": 2},
    "validate_data": {"pii": ["email"], "phone_regions": ["GB"]},
})
REPO = Path(__file__).resolve().parents[1]


def flags(*argv: str) -> argparse.Namespace:
    """`llmops serve start ARGV` as the command line parses it."""
    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", "start", *argv])


def test_params_fill_what_the_flags_leave_out(tmp_path):
    settings = resolve(tmp_path, PARAMS, flags())
    assert (settings.cache_entries, settings.cache_ttl_s, settings.read_timeout_s) == (7, 60, 12)
    assert settings.privacy == Privacy(mode="refuse", kinds=("email",), regions=("GB",))
    assert settings.canary == CanaryLimits(min_requests=4, max_error_rate_increase=0.1, max_latency_ratio=2)
    assert settings.max_adapters == 3 and settings.watch_s == 0  # only a server of adapters watches the registry
    assert (settings.project, settings.model, settings.ref, settings.adapters) == (True, None, "production", False)
    assert settings.url == "http://127.0.0.1:8000/v1" and settings.log_dir == tmp_path / ".llmops/serve/requests"
    assert resolve(tmp_path, PARAMS, flags("--adapters")).watch_s == 5


def test_a_flag_overrides_params(tmp_path):
    settings = resolve(tmp_path, PARAMS, flags(
        "--cache-entries", "0", "--read-timeout", "2.5", "--privacy", "log", "--version", "3", "--host", "0.0.0.0",
        "--port", "9001", "--max-concurrency", "2", "--context", "64", "--device", "cpu", "--keys", "my-keys"))
    assert (settings.cache_entries, settings.read_timeout_s) == (0, 2.5)  # 0 turns the cache off: not "unset"
    assert settings.privacy == Privacy(mode="log", kinds=("email",), regions=("GB",))  # the mode alone is the flag's
    assert (settings.ref, settings.url, settings.keys) == ("v3.0.0", "http://0.0.0.0:9001/v1", "my-keys")
    assert settings.engine_options == {"max_concurrency": 2, "device": "cpu", "max_context": 64}
    assert settings.cache_ttl_s == 60  # no flag for it


def test_outside_a_project_the_defaults_apply(tmp_path):
    settings = resolve(tmp_path, None, flags("--model", "some/dir"))
    assert (settings.project, settings.model, settings.ref) == (False, "some/dir", "some/dir")
    assert (settings.cache_entries, settings.cache_ttl_s, settings.read_timeout_s) == (1024, 600, 30)
    assert settings.privacy == Privacy(mode="mask")
    assert settings.canary is None and settings.watch_s == 0  # a model directory has no canary
    assert settings.engine_options == {"max_concurrency": 16, "device": None, "max_context": None}
    assert resolve(tmp_path, None, flags()).canary == CanaryLimits(20, 0.05, 1.5)
    assert resolve(tmp_path, None, flags("--privacy", "refuse")).privacy == Privacy(mode="refuse")


@pytest.mark.parametrize("params, argv, message", [
    (PARAMS, ["--context", "1"], "--context 1: a request needs at least 2 tokens (a prompt and an answer)"),
    (PARAMS, ["--read-timeout", "0"], "--read-timeout 0.0: give a number of seconds above 0"),
    (PARAMS, ["--read-timeout", "-3"], "--read-timeout -3.0: give a number of seconds above 0"),
    (PARAMS, ["--adapters", "--model", "some/dir"],
     "--adapters serves registered versions: run it in the project, without --model"),
    (None, ["--adapters"], "--adapters serves registered versions: run it in the project, without --model"),
    (PARAMS, ["--version", "latest"], "'latest' is not a model version (like v3 or v3.0.0)"),
])
def test_each_invalid_setting_is_refused_with_its_message(tmp_path, params, argv, message):
    with pytest.raises(LlmopsError) as refused:
        resolve(tmp_path, params, flags(*argv))
    assert str(refused.value) == message


def test_the_command_refuses_an_invalid_flag_before_anything_else(tmp_path, monkeypatch, capsys):
    """Settings come first: here with no API keys and no model, the flag is what the command names."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMOPS_API_KEY_HASHES", raising=False)
    assert serve_cli.main(flags("--model", str(tmp_path / "none"), "--context", "1")) == 1
    assert capsys.readouterr().err == ("error: serve: --context 1: a request needs at least 2 tokens (a prompt and "
                                       "an answer)\n")


def test_the_server_runs_on_the_settings_it_resolved(tmp_path, monkeypatch):
    """Through `llmops serve start` in a project: the app and the HTTP server get params.yaml's values where no flag
    is given, and the flag's where one is."""
    import llmops.serving.engine
    import llmops.serving.http_server
    from llmops.governance.apikeys import hash_key

    class Engine:  # no model is loaded: the settings are what is checked
        def __init__(self, model_dir, **options):
            self.model_dir, self.options = model_dir, options

    ran = {}
    monkeypatch.setattr(llmops.serving.engine, "Engine", Engine)
    monkeypatch.setattr(llmops.serving.http_server, "run", lambda app, host, port, read_timeout_s: ran.update(
        app=app, host=host, port=port, read_timeout_s=read_timeout_s))
    monkeypatch.setenv("LLMOPS_API_KEY_HASHES", hash_key("sk-test"))
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("deploy:\n  cache_entries: 7\n  read_timeout_s: 12\n  privacy: refuse\n")
    shutil.copytree(REPO / "governance", "governance")  # a project has an access policy
    assert serve_cli.main(flags("--model", "release", "--cache-entries", "3", "--port", "9001", "--context", "64")) == 0
    settings = ran["app"].state.runtime.settings
    assert (ran["host"], ran["port"], ran["read_timeout_s"]) == ("127.0.0.1", 9001, 12)
    assert (settings.cache_entries, settings.privacy.mode, settings.project) == (3, "refuse", True)
    assert ran["app"].state.runtime.served.engine.options["max_context"] == 64
