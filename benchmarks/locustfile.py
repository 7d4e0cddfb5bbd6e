"""The load test's callers (locust): OpenAI completions through our router or server, mixing models (adapters),
callers (a canary's share is sticky per caller) and repeated greedy prompts (response cache hits).

Run by benchmarks/load_test.py, which sets LOAD_* in the environment; alone:

    LOAD_KEY=sk-... LOAD_MODELS='["model", "model@v1.0.0"]' LOAD_OUT=totals.json \\
        locust -f benchmarks/locustfile.py --headless -u 16 -r 16 -t 60s -H http://127.0.0.1:8080

Every request ends as answered (200), refused with a 503 that says why, or another failure; the
totals (tokens, cache hits, answering versions and replicas, statuses, each request's latency) go to
LOAD_OUT at the end.
LOAD_MAX_REQUESTS bounds the run by requests as -t bounds it by time.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter

from locust import HttpUser, constant, events, task

KEY = os.environ["LOAD_KEY"]
MODELS = json.loads(os.environ.get("LOAD_MODELS", '["model"]'))
REPEAT_SHARE = float(os.environ.get("LOAD_REPEAT_SHARE", "0.3"))  # greedy repeats of a few prompts: cache hits
MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "16"))
MAX_REQUESTS = int(os.environ.get("LOAD_MAX_REQUESTS", "0"))  # 0: no bound but the run time
PROMPTS = json.loads(os.environ.get("LOAD_PROMPTS", "null")) or [
    f"What number comes after {n}?" for n in range(100, 400, 7)] + [f"What is {a} plus {a + 3}?" for a in range(40)]

totals: dict[str, Counter] = {k: Counter() for k in ("status", "version", "replica", "cache", "tokens")}
latencies_ms: list[float] = []  # every request's, answered or not


class Caller(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.user_id = f"load-{random.randrange(10**9)}"  # one caller: one side of a canary's share

    @task
    def complete(self) -> None:
        if MAX_REQUESTS and sum(totals["status"].values()) >= MAX_REQUESTS:
            self.environment.runner.quit()
            return
        repeat = random.random() < REPEAT_SHARE
        body = {"model": random.choice(MODELS), "prompt": random.choice(PROMPTS[:4] if repeat else PROMPTS),
                "max_tokens": MAX_TOKENS, "temperature": 0 if repeat else 0.8, "user": self.user_id}
        with self.client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                              name="/v1/completions", catch_response=True) as response:
            totals["status"][str(response.status_code)] += 1
            latencies_ms.append(response.request_meta["response_time"])
            if response.status_code == 200:
                answer = response.json()
                totals["tokens"]["completion"] += answer["usage"]["completion_tokens"]
                totals["version"][answer["model"]] += 1
                totals["replica"][response.headers.get("X-LLMOps-Replica", "-")] += 1
                totals["cache"][response.headers.get("X-LLMOps-Cache", "-")] += 1
                response.success()
            else:
                try:
                    why = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    why = "no OpenAI-style error body"  # counted apart: a refusal must say why
                    totals["status"]["unexplained"] += 1
                response.failure(f"{response.status_code}: {why[:200]}")


@events.test_stop.add_listener
def _write(environment, **kwargs) -> None:
    if out := os.environ.get("LOAD_OUT"):
        with open(out, "w") as f:
            json.dump({k: dict(v) for k, v in totals.items()} | {"latencies_ms": latencies_ms}, f)
