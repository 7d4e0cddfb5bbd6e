"""Requests the monitor itself sends to the live endpoint, through the official openai client: self-consistency
(the same prompt sampled k times) and counterfactual fairness probes (an audit template with its two group terms).

They say `user: llmops-monitor`, so the monitor leaves them out of the traffic it measures.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from difflib import SequenceMatcher

from llmops.core.config import ConsistencyParams, FairnessParams
from llmops.evaluation import bias_pairs

PROBE_USER = "llmops-monitor"
PARALLEL = 8  # requests in flight: the server batches them


def _ask(client, model: str, prompt: str, max_tokens: int, temperature: float) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=temperature, user=PROBE_USER)
    return (reply.choices[0].message.content or "").strip()


def agreement(answers: list[str]) -> float:
    """The share of the answers that equal the most common one (1.0: all k agree)."""
    return Counter(answers).most_common(1)[0][1] / len(answers)


def consistency(client, model: str, prompts: list[str], params: ConsistencyParams) -> list[float]:
    """Each prompt's agreement among `params.samples` sampled answers."""
    jobs = [(p, i) for p in prompts for i in range(params.samples)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        answers = list(pool.map(lambda job: _ask(client, model, job[0], params.max_tokens, params.temperature), jobs))
    return [agreement(answers[i * params.samples:(i + 1) * params.samples]) for i in range(len(prompts))]


def divergence(a: str, b: str) -> float:
    """0 when two answers are the same text, 1 when they share nothing (difflib's similarity ratio, inverted)."""
    return 1.0 - SequenceMatcher(None, a, b, autojunk=False).ratio()


def fairness(client, model: str, params: FairnessParams) -> list[dict]:
    """The audit's counterfactual pairs asked greedily; per pair: bias type, both answers, their divergence."""
    pairs = bias_pairs.generate(params.seed, params.pairs_per_type)
    prompts = [params.prompt.format(sentence=s) for pair in pairs for s in (pair["sent_more"], pair["sent_less"])]
    with ThreadPoolExecutor(PARALLEL) as pool:
        answers = list(pool.map(lambda p: _ask(client, model, p, params.max_tokens, 0.0), prompts))
    return [{"bias_type": pair["bias_type"], "sent_more": pair["sent_more"], "sent_less": pair["sent_less"],
             "answer_more": answers[2 * i], "answer_less": answers[2 * i + 1],
             "divergence": divergence(answers[2 * i], answers[2 * i + 1])} for i, pair in enumerate(pairs)]


def server_metrics(base_url: str, key: str) -> dict:
    """The live server's own Prometheus counters since it started: generation requests, failed ones, time to first
    token. (The window's rates come from the request log; these say what the server itself counted.)"""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(base_url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
    requests = errors = 0.0
    ttft = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llmops_requests_total" and sample.labels.get("route", "").startswith(
                    ("/v1/completions", "/v1/chat/completions")):
                requests += sample.value
                errors += sample.value if int(sample.labels.get("status", "200")) >= 400 else 0.0
            elif sample.name in ("llmops_time_to_first_token_seconds_sum", "llmops_time_to_first_token_seconds_count"):
                ttft[sample.name.rsplit("_", 1)[1]] = sample.value
    return {"requests": int(requests), "errors": int(errors), "error_rate": errors / requests if requests else None,
            "mean_ttft_s": ttft["sum"] / ttft["count"] if ttft["count"] else None}
