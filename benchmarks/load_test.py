"""Load test of the serving stack on 127.0.0.1 (locust, bounded in time and requests), in one run:

    python benchmarks/load_test.py --project DIR [--canary v2 --share 25] [--users 16] [--seconds 60]

DIR is a project with a version in production and others on the same base (after `llmops run`, another
fine-tune registered: docs/serving.md, Many adapters on one base). The test starts --replicas servers of adapters
(`llmops serve start --adapters`) in DIR and `llmops route` in front of them, then:

1. mixed traffic through the router: every model the servers list (production's `model` and each
   `model@vN`), callers with their own `user` (a canary's share is sticky per caller), and
   --repeat-share greedy repeats of four prompts (response cache hits); the rest sampled. Reported:
   generated tokens/s, requests/s, p50/p99 latency, errors, answers by version and replica, cache hits.
2. the router's overhead per request: the same cached request one at a time, straight to a replica
   and through the router (p50 of each and the difference), and the router's own histogram.
3. with --kill: the mixed traffic again, one replica SIGKILLed halfway: requests sent = answered +
   refused with a 503 that says why, and nothing else.

With --canary, the version is made production's canary for the run (`llmops registry canary`) and
dropped after it, both in the registry's history. Multi-LoRA throughput against one adapter, and the
cache's hit/miss latency, are measured in benchmarks/serve_adapters.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


def _wait(url: str, proc: subprocess.Popen, seconds: float = 300) -> dict:
    from llmops.core.procs import Exited, wait_until

    def answer() -> dict | None:
        try:
            return json.load(urllib.request.urlopen(url, timeout=2))
        except OSError:
            return None

    try:
        found = wait_until(answer, seconds, interval_s=0.5, proc=proc)
    except Exited as exc:
        raise SystemExit(f"{proc.args} exited with {exc.returncode} (see its log)") from None
    if found is None:
        raise SystemExit(f"no answer from {url} in {seconds:g} s")
    return found


def _port() -> int:
    from llmops.serving.instances import free_port

    return free_port()


def locust(url: str, key: str, models: list[str], users: int, seconds: float, work: Path, name: str,
           repeat_share: float = 0.3, max_tokens: int = 16, max_requests: int = 0,
           during: tuple[float, callable] | None = None) -> dict:
    """One headless locust run against `url`; its figures. `during = (after_s, act)` runs act() that long in."""
    out = work / f"{name}.json"
    env = dict(os.environ, LOAD_KEY=key, LOAD_MODELS=json.dumps(models), LOAD_OUT=str(out),
               LOAD_REPEAT_SHARE=str(repeat_share), LOAD_MAX_TOKENS=str(max_tokens),
               LOAD_MAX_REQUESTS=str(max_requests))
    cmd = [str(BIN / "locust"), "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{seconds:g}s", "-H", url, "--only-summary", "--stop-timeout", "120",
           "--exit-code-on-error", "0"]
    log = open(work / f"{name}.log", "w")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if during is not None:
        time.sleep(during[0])
        during[1]()
    if proc.wait(seconds + 300) != 0:
        raise SystemExit(f"locust exited with {proc.returncode}: {work / f'{name}.log'}")
    elapsed = time.monotonic() - started
    totals = json.loads(out.read_text())
    status, latencies = totals["status"], sorted(totals["latencies_ms"])
    answered = int(status.get("200", 0))
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"requests": len(latencies), "answered": answered, "refused_503": int(status.get("503", 0)),
            "other_errors": sum(v for k, v in status.items() if k not in ("200", "503")),
            "requests_per_s": answered / elapsed, "p50_ms": cuts[49], "p99_ms": cuts[98],
            "tokens_per_s": totals["tokens"].get("completion", 0) / elapsed,
            "cache_hit_share": totals["cache"].get("hit", 0) / max(1, answered),
            "by_version": totals["version"], "by_replica": totals["replica"]}


def overhead(direct: str, routed: str, key: str, model: str, n: int) -> dict:
    """p50 latency of one cached request sent n times one at a time, straight to a replica and through the router."""
    import httpx

    body = {"model": model, "prompt": "What number comes after 250?", "max_tokens": 4, "temperature": 0}
    found = {}

    def own(client: httpx.Client) -> tuple[float, float]:  # the router's histogram: (sum s, count)
        text = client.get(f"{routed}/metrics").text
        total = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("llmops_router_overhead_seconds_")}
        return total["llmops_router_overhead_seconds_sum"], total["llmops_router_overhead_seconds_count"]

    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        before = own(client)  # this phase's requests only: the load runs' include time queued behind others
        for name, base in (("direct", direct), ("router", routed)):
            client.post(f"{base}/v1/completions", json=body).raise_for_status()  # cached from here on
            times = []
            for _ in range(n):
                started = time.perf_counter()
                client.post(f"{base}/v1/completions", json=body).raise_for_status()
                times.append(time.perf_counter() - started)
            found[name] = statistics.median(times) * 1000
        after = own(client)
    return {"direct_p50_ms": found["direct"], "router_p50_ms": found["router"],
            "added_p50_ms": found["router"] - found["direct"],
            "router_own_mean_ms": (after[0] - before[0]) / (after[1] - before[1]) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path.cwd())
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-requests", type=int, default=0, help="stop each run after this many; 0: no bound")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeat-share", type=float, default=0.3)
    parser.add_argument("--canary", help="a version to make production's canary for the run")
    parser.add_argument("--share", type=float, default=25)
    parser.add_argument("--kill", action="store_true", help="third run: one replica SIGKILLed halfway")
    parser.add_argument("--overhead-requests", type=int, default=200)
    parser.add_argument("--out", type=Path, help="the figures as JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parents[0]))
    from llmops.governance.apikeys import hash_key, new_key

    project = args.project.resolve()
    key = new_key()
    env = dict(os.environ, LLMOPS_API_KEY_HASHES=f"{hash_key(key)}:load-test", OMP_NUM_THREADS="1")
    llmops = str(BIN / "llmops")
    work = Path(tempfile.mkdtemp(prefix="llmops-load-"))
    procs: list[subprocess.Popen] = []
    if args.canary:
        subprocess.run([llmops, "registry", "canary", args.canary, "--share", f"{args.share:g}", "--why",
                        "load test"], cwd=project, env=env, check=True)
    try:
        replicas = []
        for i in range(args.replicas):
            port = _port()
            procs.append(subprocess.Popen([llmops, "serve", "start", "--adapters", "--port", str(port)], cwd=project,
                                          env=env, stdout=open(work / f"replica{i}.log", "w"),
                                          stderr=subprocess.STDOUT))
            replicas.append(f"http://127.0.0.1:{port}")
        health = [_wait(f"{url}/health", proc) for url, proc in zip(replicas, procs)]
        (work / "router").mkdir()
        tokenizer = project / ".llmops/serve/adapters" / health[0]["version"]  # production's, with its template
        route = {"classes": {"replica": {"hardware": health[0]["hardware"]}},
                 "replicas": [{"url": u, "class": "replica", "name": f"replica{i}"} for i, u in enumerate(replicas)],
                 "policy": {"latency": ["replica"], "default": ["replica"]}, "tokenizer": str(tokenizer),
                 "port": _port()}
        (work / "router/params.yaml").write_text(json.dumps({"route": route}))  # JSON is YAML
        procs.append(subprocess.Popen([llmops, "route"], cwd=work / "router", env=env,
                                      stdout=open(work / "router.log", "w"), stderr=subprocess.STDOUT))
        router = f"http://127.0.0.1:{route['port']}"
        _wait(f"{router}/health", procs[-1])
        request = urllib.request.Request(f"{replicas[0]}/v1/models", headers={"Authorization": f"Bearer {key}"})
        models = [m["id"] for m in json.load(urllib.request.urlopen(request))["data"]]
        common = dict(users=args.users, seconds=args.seconds, work=work, repeat_share=args.repeat_share,
                      max_tokens=args.max_tokens, max_requests=args.max_requests)
        figures = {"device": f"{health[0]['hardware']} ({health[0]['device_name']})", "replicas": args.replicas,
                   "models": models, "canary": args.canary and f"{args.canary} at {args.share:g}%",
                   "versions": {p: version(p) for p in ("torch", "transformers", "peft", "locust", "httpx")}}
        figures["mixed"] = locust(router, key, models, name="mixed", **common)
        figures["overhead"] = overhead(replicas[0], router, key, "model", args.overhead_requests)
        if args.kill:
            victim = procs[-2]  # the last replica
            figures["kill"] = locust(router, key, models, name="kill", **common,
                                     during=(args.seconds / 2, lambda: victim.send_signal(signal.SIGKILL)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait(60)
        if args.canary:
            figures["canary_outcome"] = _end_canary(project, args.canary, env)
    _print(figures)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"(logs and locust's CSV files in {work})")
    kill = figures.get("kill")
    return 1 if kill and (kill["other_errors"] or kill["requests"] != kill["answered"] + kill["refused_503"]) else 0


def _end_canary(project: Path, canary: str, env: dict) -> str:
    """Drop the run's canary, or say why the servers dropped it themselves (automatic rollback) during the run."""
    from llmops.registry import versions as registry

    if registry.canary(project) is not None:
        subprocess.run([str(BIN / "llmops"), "registry", "canary", "drop", "--why", "load test over"], cwd=project,
                       env=env, check=True, capture_output=True)
        return "held through the run; dropped after it"
    last = [e for e in registry.history(project, "canary") if e["event"] == "unassignment"][-1]
    return f"dropped by a server during the run: {last['why']}"


def _print(f: dict) -> None:
    print(f"\ndevice {f['device']}, {f['replicas']} replicas behind `llmops route`; models {', '.join(f['models'])}"
          f"{'; canary ' + f['canary'] if f['canary'] else ''}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in f["versions"].items()))
    print("\n| run | requests | answered | 503 | other errors | tokens/s | req/s | p50 ms | p99 ms | cache hits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("mixed", "kill"):
        if (r := f.get(name)) is not None:
            print(f"| {name} | {r['requests']} | {r['answered']} | {r['refused_503']} | {r['other_errors']} | "
                  f"{r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                  f"{r['cache_hit_share']:.0%} |")
    for name in ("mixed", "kill"):
        if (r := f.get(name)) is not None:
            print(f"{name}: answered by version {r['by_version']}, by replica {r['by_replica']}")
    if f.get("canary_outcome"):
        print(f"canary {f['canary']}: {f['canary_outcome']}")
    o = f["overhead"]
    print(f"\nrouter overhead (one cached request at a time): direct p50 {o['direct_p50_ms']:.2f} ms, through the "
          f"router {o['router_p50_ms']:.2f} ms: +{o['added_p50_ms']:.2f} ms; the router's own time, mean "
          f"{o['router_own_mean_ms']:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
