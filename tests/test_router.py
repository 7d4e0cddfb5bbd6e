"""`llmops route` in front of real `llmops serve` replicas (a toy model, so that each starts in seconds): the policy
by class, context and load; refused declarations and policies; a replica killed under load loses no request."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import BIN, _wait_http, base_env, free_port, run, toy_model
from llmops.governance.apikeys import hash_key

pytestmark = pytest.mark.services

KEY = "sk-llmops-router-tests"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory.mktemp("router") / "toy")


def _env() -> dict[str, str]:
    return base_env(LLMOPS_API_KEY_HASHES=f"{hash_key(KEY)}:tests")


class Fleet:
    """Replicas (`llmops serve start --model`) in one directory and a router in a project directory of its own."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        (root / "replicas").mkdir(parents=True)
        (root / "router").mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def replica(self, name: str, *args: str) -> str:
        port = self.ports[name] = free_port()
        log = open(self.root / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            [str(BIN / "llmops"), "serve", "start", "--model", str(self.model), "--port", str(port), "--device", "cpu",
             "--cache-entries", "0", *args], cwd=self.root / "replicas", env=_env(), stdout=log, stderr=log)
        return f"http://127.0.0.1:{port}"

    def route(self, section: dict) -> str:
        self.write(section)
        port = self.ports["router"] = free_port()
        self.log = self.root / "router.log"
        self.procs["router"] = subprocess.Popen([str(BIN / "llmops"), "route", "--port", str(port)],
                                                cwd=self.root / "router", env=_env(), stdout=open(self.log, "w"),
                                                stderr=subprocess.STDOUT)
        for name, proc in self.procs.items():
            _wait_http(f"http://127.0.0.1:{self.ports[name]}/health", proc, 120)
        return f"http://127.0.0.1:{port}"

    def write(self, section: dict) -> None:
        (self.root / "router/params.yaml").write_text(yaml.safe_dump({"route": section}))

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            proc.wait(60)


def _cpu_pair(replicas: dict[str, str], tokenizer: Path) -> dict:
    """The route section of replicas of one cpu class, read every 0.5 s."""
    return {"classes": {"cpu": {"hardware": "cpu"}},
            "replicas": [{"url": u, "class": "cpu", "name": n} for n, u in replicas.items()],
            "policy": {"latency": ["cpu"], "default": ["cpu"]}, "tokenizer": str(tokenizer),
            "health_interval_s": 0.5, "health_timeout_s": 1}


def _load_test():
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", Path(__file__).parents[1] / "benchmarks/load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(url: str, path: str) -> dict:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {KEY}"})
    return json.load(urllib.request.urlopen(request, timeout=10))


def _metrics(url: str) -> str:
    return urllib.request.urlopen(urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}),
                                  timeout=10).read().decode()


def _states(url: str) -> dict[str, dict]:
    return {r["name"]: r for r in _get(url, "/router/replicas")["replicas"]}


def _up(url: str, *names: str) -> dict[str, dict]:
    """The replicas' states once the router has seen these up (it reads each /health every 0.5 s)."""
    deadline = time.monotonic() + 30
    while not all((states := _states(url))[name]["up"] for name in names):
        assert time.monotonic() < deadline, states
        time.sleep(0.2)
    return states


def _complete(url: str, words: int, max_tokens: int = 2, headers: dict | None = None):
    """A completion through the router with the openai client; (the replica that answered, the response)."""
    from openai import OpenAI

    api = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, default_headers=headers or {}, timeout=120)
    raw = api.completions.with_raw_response.create(model="toy", prompt=" ".join(f"w{i % 40}" for i in range(words)),
                                                   max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    return raw.headers["x-llmops-replica"], raw.parse()


def test_requests_go_by_class_context_and_load_and_bad_declarations_are_refused(toy, tmp_path):
    from openai import AuthenticationError, BadRequestError

    fleet = Fleet(tmp_path, toy)
    big = fleet.replica("big", "--max-concurrency", "4")
    small = fleet.replica("small", "--max-concurrency", "2", "--context", "24")
    try:
        url = fleet.route({
            "classes": {"gpu": {"hardware": "cuda", "variant": "bfloat16"}, "cpu-big": {"hardware": "cpu",
                        "variant": "float32"}, "cpu-small": {"hardware": "cpu"}},
            # the third declares a GPU the replica (big's server, on CPU) lacks: it must never get a request
            "replicas": [{"url": big, "class": "cpu-big", "name": "big"}, {"url": small, "class": "cpu-small",
                         "name": "small"}, {"url": big, "class": "gpu", "name": "claims-gpu"}],
            "policy": {"latency": ["gpu", "cpu-big"], "default": ["cpu-small", "cpu-big"]},
            "tokenizer": str(toy), "health_interval_s": 0.5})
        states = _up(url, "big", "small")
        assert not states["claims-gpu"]["up"]
        assert "declares cuda, but the replica runs on cpu" in states["claims-gpu"]["why"]
        assert states["small"]["context"] == 24 and states["big"]["context"] == 64

        assert _complete(url, 5)[0] == "small"  # the default policy's first class
        assert _complete(url, 30)[0] == "big"  # 30 + 2 tokens: beyond small's context
        assert _complete(url, 5, headers={"X-LLMOps-Priority": "latency"})[0] == "big"  # its GPU class is not used
        with pytest.raises(BadRequestError, match="largest context of a healthy replica is 64"):
            _complete(url, 70)
        with pytest.raises(AuthenticationError):
            from openai import OpenAI

            OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()

        # overflow: small takes 2 at a time; the others go to big, least loaded first
        with ThreadPoolExecutor(6) as pool:
            who = [name for name, _ in pool.map(lambda _: _complete(url, 5, max_tokens=16), range(6))]
        assert who.count("small") >= 2 and who.count("big") >= 2, who
        assert "claims-gpu" not in who

        # a policy naming an unknown class: refused at start, and by a running router (which routes on)
        bad = {"policy": {"default": ["tpu"]}, "replicas": [{"url": big, "class": "cpu"}]}
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad/params.yaml").write_text(yaml.safe_dump({"route": bad}))
        refused = run([str(BIN / "llmops"), "route"], tmp_path / "bad", env=_env(), check=False)
        assert refused.returncode == 1
        assert "route.policy.default: 'tpu' is not one of route.classes" in refused.stderr, refused.stderr
        fleet.write(bad)
        fleet.procs["router"].send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload refused" not in fleet.log.read_text():
            assert time.monotonic() < deadline, fleet.log.read_text()
            time.sleep(0.2)
        assert _complete(url, 5)[0] == "small"

        # a replica declaring hardware it lacks refuses to start
        no_gpu = run([str(BIN / "llmops"), "serve", "start", "--model", str(toy), "--device", "cuda", "--port",
                      str(free_port())], tmp_path / "replicas", env=_env(), check=False)
        assert no_gpu.returncode == 1 and "device cuda: this machine has no CUDA GPU" in no_gpu.stderr
        # the load test's locust users (benchmarks/load_test.py), briefly: every request answered and counted
        load = _load_test().locust(url, KEY, ["toy"], users=4, seconds=4, work=tmp_path, name="load",
                                   max_tokens=4)
        assert load["requests"] == load["answered"] > 0 and load["other_errors"] == load["refused_503"] == 0, load
        assert load["tokens_per_s"] > 0 and load["p99_ms"] >= load["p50_ms"] > 0
        assert set(load["by_replica"]) <= {"small", "big"}

        metrics = urllib.request.urlopen(urllib.request.Request(
            f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})).read().decode()
        assert 'llmops_router_requests_total{replica="small",status="200"}' in metrics
        assert "llmops_router_overhead_seconds_count" in metrics

        host, port = url.removeprefix("http://").split(":")  # a body over 1 MiB is refused here, as by a replica
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/v1/completions")
        for name, value in (("Authorization", f"Bearer {KEY}"), ("Content-Length", str(2 << 20))):
            conn.putheader(name, value)
        conn.endheaders()
        answer = conn.getresponse()
        assert answer.status == 413 and json.loads(answer.read())["error"]["code"] == "request_too_large"
        conn.close()
    finally:
        fleet.close()


def test_a_replica_killed_under_load_loses_no_request(toy, tmp_path):
    """Requests sent = answered + refused with a clear 503; the dead replica is out within seconds and what it held
    is answered by the other."""
    from openai import APIStatusError

    fleet = Fleet(tmp_path, toy)
    replicas = {name: fleet.replica(name, "--max-concurrency", "4") for name in ("a", "b")}
    try:
        url = fleet.route(_cpu_pair(replicas, toy))
        _up(url, "a", "b")
        results: list[object] = []
        lock = threading.Lock()

        def one(_):
            try:
                outcome = _complete(url, 6, max_tokens=24)[0]
            except APIStatusError as exc:
                outcome = exc  # a 503 must name why; anything else fails the test below
            with lock:
                results.append(outcome)

        sent = 48
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(sent)]
            deadline = time.monotonic() + 120
            while not (len(results) >= 4 and _states(url)["a"]["in_flight"] > 0):  # a holds requests now
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(fleet.procs["a"].pid, signal.SIGKILL)
            killed = time.monotonic()
            while _states(url)["a"]["up"]:
                assert time.monotonic() - killed < 5, "the router still sends to a dead replica"
                time.sleep(0.1)
            for future in futures:
                future.result()  # nothing raised but a status error
        answered = [r for r in results if isinstance(r, str)]
        refused = [r for r in results if not isinstance(r, str)]
        assert len(results) == sent == len(answered) + len(refused)
        assert all(r.status_code == 503 and "replica" in str(r) for r in refused), refused
        assert answered[-1] == "b"
        metrics = urllib.request.urlopen(urllib.request.Request(
            f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})).read().decode()
        assert 'llmops_router_retries_total{replica="a"}' in metrics  # a's requests in flight were sent to b

        fleet.procs["b"].kill()  # nothing left: a clear 503 naming each replica
        with pytest.raises(APIStatusError, match="No replica of class cpu can take the request") as err:
            for _ in range(20):
                _complete(url, 3)
                time.sleep(0.2)
        assert err.value.status_code == 503
    finally:
        fleet.close()


def test_a_request_that_kills_an_engine_fails_alone_and_the_engine_comes_back(tmp_path):
    """A prompt that makes the sampler fail kills the replica's generation loop: that request gets a 500, never sent
    to another replica (it would kill that one too); /health answers 503 until the replica restarted its engine by
    itself; then it answers again, and the router uses it again."""
    from openai import APIStatusError, OpenAI

    model = toy_model(tmp_path / "toy", poison="w7")
    fleet = Fleet(tmp_path / "fleet", model)
    replicas = {name: fleet.replica(name) for name in ("a", "b")}
    try:
        url = fleet.route(_cpu_pair(replicas, model))
        _up(url, "a", "b")
        health: list[int] = []
        polling = threading.Event()

        def poll():  # every replica's /health, every 50 ms, while the poisoned request goes
            while not polling.is_set():
                for replica in replicas.values():
                    try:
                        health.append(urllib.request.urlopen(replica + "/health", timeout=5).status)
                    except urllib.error.HTTPError as exc:
                        health.append(exc.code)
                    except OSError:
                        health.append(0)  # no answer at all: counted against the replica below
                time.sleep(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        api = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        with pytest.raises(APIStatusError) as killed:
            api.completions.create(model="toy", prompt="w1 w7 w2", max_tokens=4, temperature=1.0)
        assert killed.value.status_code == 500 and killed.value.code == "generation_failed", killed.value
        assert "probability tensor" in killed.value.message
        hit = killed.value.response.headers["x-llmops-replica"]
        deadline = time.monotonic() + 30
        while "llmops_engine_restarts_total 1.0" not in _metrics(replicas[hit]):  # it restarts by itself
            assert time.monotonic() < deadline, "the dead engine was not restarted"
            time.sleep(0.2)
        states = _up(url, "a", "b")
        polling.set()
        poller.join()
        assert 503 in health and 0 not in health and health[-1] == 200, health
        assert "llmops_router_retries_total{" not in _metrics(url)  # the poisoned request went to one replica only
        assert all(s["in_flight"] == 0 for s in states.values())
        for _ in range(4):  # both replicas answer, the restarted engine too, streamed or not
            assert _complete(url, 3)[1].choices[0].finish_reason == "length"
            streamed = api.completions.create(model="toy", prompt="w1 w2", max_tokens=4, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
            assert [c.choices[0].finish_reason for c in streamed][-1] == "length"
    finally:
        fleet.close()


def test_clients_that_send_too_slowly_are_cut_off(toy, tmp_path):
    """A connection that sends nothing, half a request head, or a head and part of its body is closed once its
    read timeout passes (here 1 s), at a replica and at the router; a slow one no longer holds a connection for
    ever (slowloris), and the server answers the others meanwhile."""
    import socket

    fleet = Fleet(tmp_path, toy)
    replica = fleet.replica("a", "--read-timeout", "1")
    try:
        router = fleet.route({"classes": {"cpu": {"hardware": "cpu"}},
                              "replicas": [{"url": replica, "class": "cpu", "name": "a"}], "policy": {"latency": ["cpu"], "default": ["cpu"]}, "tokenizer": str(toy),
                              "read_timeout_s": 1})
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        sends = {"nothing": b"", "half a head": head.encode(),
                 "part of a body": (head + "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
                                    '{"model": "toy", "prompt": "w1').encode()}
        for url in (replica, router):
            host, port = url.removeprefix("http://").split(":")
            for what, data in sends.items():
                with socket.create_connection((host, int(port)), timeout=10) as conn:
                    conn.sendall(data)
                    started = time.monotonic()
                    assert urllib.request.urlopen(url + "/health", timeout=5).status == 200  # others are answered
                    assert conn.recv(1024) == b"", (url, what)  # closed, with nothing sent back
                    assert 0.5 < time.monotonic() - started < 5, (url, what)
        assert _complete(router, 3)[0] == "a"  # a request sent at once is answered
    finally:
        fleet.close()
