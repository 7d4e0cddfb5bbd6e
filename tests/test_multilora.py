"""Many LoRA adapters on one base in one continuous-batching engine: each answer equals its adapter's served alone."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmops.serving.engine import Engine, EngineError, Sampling
from conftest import toy_model
from llmops.serving.multilora import AdapterError

PROMPTS = ["w1 w2 w3", "w4 w4 w4 w4 w4 w9 w10", "w7", "w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21", "w30 w31"]


def _adapter(base, path, seed, **lora):
    """A LoRA adapter with random (not zero) weights, so that each one answers differently from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(init_lora_weights=False, lora_alpha=16, **lora))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilora")
    base = toy_model(root / "base")
    adapters = {
        "a": _adapter(base, root / "a", 1, r=4, target_modules=["q_proj", "v_proj"]),
        "b": _adapter(base, root / "b", 2, r=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
        "c": _adapter(base, root / "c", 3, r=2, target_modules=["gate_proj", "up_proj"], use_rslora=True),
    }
    return base, adapters


def _alone(base, adapter, prompt_ids, n, eos=None):
    """What plain transformers (+ peft) generates greedily: the adapter served alone."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


async def _answers(engine, jobs, n):
    async def one(ids, adapter):
        return [t for piece in [p async for p in engine.generate(ids, Sampling(max_tokens=n, temperature=0,
                                                                               ignore_eos=True), adapter)]
                for t in piece]
    return await asyncio.gather(*(one(ids, adapter) for ids, adapter in jobs))


def test_mixed_adapters_in_one_batch_answer_as_each_alone(toys):
    base, adapters = toys
    engine = Engine(base, max_concurrency=8, adapters=True)
    ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    jobs = [(ids[i % len(ids)], name) for i, name in enumerate(["a", "b", None, "c", "a", "b", "c", None])]
    long = [ids[3][i % len(ids[3])] for i in range(40)]  # 2.5 pages of 16 tokens
    want = [_alone(base, adapters[name] if name else None, prompt, 10) for prompt, name in jobs]
    assert len({tuple(w) for w in want}) >= 6  # the adapters really differ from each other and from the base
    batches = []
    engine.on_step = batches.append
    engine.start()
    try:
        async def scenario():
            for name in ("a", "b", "c"):
                await engine.add_adapter(name, adapters[name])
            got = await _answers(engine, jobs, 10)
            assert max(batches) >= 4  # requests of different adapters shared forward passes
            with pytest.raises(EngineError, match="adapter 'zzz' is not loaded"):
                await _answers(engine, [(ids[0], "zzz")], 2)
            # unload one at run time: the others go on answering exactly as before
            await engine.remove_adapter("b")
            assert engine.lora.names == ["a", "c"]
            again = await _answers(engine, [job for job in jobs if job[1] != "b"], 10)
            with pytest.raises(EngineError, match="adapter 'b' is not loaded"):
                await _answers(engine, [(ids[0], "b")], 2)
            await engine.add_adapter("b", adapters["b"])  # and back, without a restart
            back = await _answers(engine, [job for job in jobs if job[1] == "b"], 10)
            # a prompt of several KV-cache pages asked of each in turn: a page cached for one adapter's request
            # holds that adapter's keys and values, and must not serve another's (transformers shares prefix pages)
            shared = [await _answers(engine, [(long, name)], 6) for name in ("a", "b", None, "c")]
            return got, again, back, shared

        got, again, back, shared = asyncio.run(scenario())
    finally:
        engine.stop()
    assert shared == [[_alone(base, adapters[name] if name else None, long, 6)] for name in ("a", "b", None, "c")]
    assert got == want
    assert again == [w for w, job in zip(want, jobs) if job[1] != "b"]
    assert back == [w for w, job in zip(want, jobs) if job[1] == "b"]


def test_an_adapter_of_another_base_or_kind_is_refused_and_the_rest_keeps_serving(toys, tmp_path):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapters = toys
    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=42, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(other)
    foreign = _adapter(other, tmp_path / "foreign", 4, r=4, target_modules=["q_proj", "v_proj"])
    prompt = tmp_path / "prompt"
    get_peft_model(LlamaForCausalLM.from_pretrained(base),
                   PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(prompt)
    engine = Engine(base, max_concurrency=4, adapters=True)
    ids = engine.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    engine.start()
    try:
        async def scenario():
            for _ in range(2):  # before any adapter is loaded (the base is untouched), and beside one
                with pytest.raises(AdapterError, match="adapter 'foreign' does not fit this base: .*q_proj"):
                    await engine.add_adapter("foreign", foreign)
                await engine.add_adapter("a", adapters["a"])
            with pytest.raises(AdapterError, match="prompt_tuning; only LoRA adapters share a base"):
                await engine.add_adapter("prompt", prompt)
            assert engine.lora.names == ["a"]
            return await _answers(engine, [(ids, "a"), (ids, None)], 8)

        got = asyncio.run(scenario())
    finally:
        engine.stop()
    assert got == [_alone(base, adapters["a"], ids, 8), _alone(base, None, ids, 8)]
    with pytest.raises(AdapterError, match="serves one model"):
        asyncio.run(Engine(base, max_concurrency=2).add_adapter("a", adapters["a"]))


@pytest.mark.services
@pytest.mark.training
def test_a_server_of_adapters_serves_every_version_on_its_base_and_follows_the_registry(versioned_project):
    """`llmops serve start --adapters`: v1 (production) and v2 (another fine-tune of the same base) from one process, each
    answering as its adapter alone; v2 as a canary (below); a version registered later is served without a restart,
    and the oldest one not holding a stage leaves (deploy.max_adapters)."""
    import subprocess

    from openai import NotFoundError, OpenAI

    from conftest import BIN, _wait_http, base_env, free_port, run, set_params, stop_servers

    project = versioned_project  # v1 in production, v2 another adapter on the same base
    llmops = [str(BIN / "llmops")]
    key = run(llmops + ["serve", "keygen", "tests"], project).stdout.strip()
    # canary_*: judged after 10 requests each; dropped unless twice as fast as production (_canary checks it is)
    set_params(project, "deploy.max_adapters=2", "deploy.watch_s=1", "deploy.canary_min_requests=10",
               "deploy.canary_max_latency_ratio=0.5")
    port = free_port()
    log = open(project / "adapters.log", "w")
    proc = subprocess.Popen(llmops + ["serve", "start", "--adapters", "--port", str(port)], cwd=project, env=base_env(),
                            stdout=log, stderr=log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 180)
        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert [m.id for m in api.models.list().data] == ["model", "model@v2.0.0", "model@v1.0.0"]
        adapters = project / ".llmops/serve/adapters"
        prompts = ["What number comes after 250?", "What is 12 plus 30?", "Reverse the word: cat", "Hello"]
        jobs = [(p, m) for p in prompts for m in ("model@v1.0.0", "model@v2.0.0", "model")]
        with ThreadPoolExecutor(len(jobs)) as pool:  # together: the two adapters share forward passes
            got = list(pool.map(lambda job: api.completions.create(model=job[1], prompt=job[0], max_tokens=8,
                                                                   temperature=0), jobs))
        want = {v: [_alone_text(project / "models/pretrain", adapters / v, p, 8) for p in prompts]
                for v in ("v1.0.0", "v2.0.0")}
        assert want["v1.0.0"] != want["v2.0.0"]  # two different adapters
        for (prompt, model), reply in zip(jobs, got):
            version = "v1.0.0" if model == "model" else model.split("@")[1]
            assert reply.model == f"model@{version}"
            assert reply.choices[0].text == want[version][prompts.index(prompt)], (prompt, model)
        explained = api.post("/explain", cast_to=object, body={"model": "model@v2.0.0", "prompt": prompts[0],
                                                                "max_tokens": 3})
        chat = api.chat.completions.create(model="model@v2.0.0", max_tokens=3, temperature=0,
                                           messages=[{"role": "user", "content": prompts[0]}])
        assert explained["model"] == "model@v2.0.0"  # the adapter's own answer (explain renders the chat template)
        assert explained["answer"] == chat.choices[0].message.content

        _canary(project, api, port, key)

        set_params(project, "gate.release_candidate=nf4")  # a third version (same adapter as v2), no restart
        run(["dvc", "repro", "release"], project)
        run(llmops + ["registry", "register", "--why", "v3"], project)
        deadline = time.monotonic() + 60
        while [m.id for m in api.models.list().data] != ["model", "model@v3.0.0", "model@v1.0.0"]:
            assert time.monotonic() < deadline, [m.id for m in api.models.list().data]
            time.sleep(0.5)
        reply = api.completions.create(model="model@v3.0.0", prompt=prompts[0], max_tokens=8, temperature=0)
        assert reply.choices[0].text == want["v2.0.0"][0]
        with pytest.raises(NotFoundError, match="not among the 2 newest versions served here"):
            api.completions.create(model="model@v2.0.0", prompt="x", max_tokens=1)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(60)
        stop_servers(project)


@pytest.mark.services
@pytest.mark.training
def test_a_server_of_one_model_serves_the_canary_from_a_second_engine(versioned_project):
    """Without --adapters, the production server loads the canary's model beside production's: the same routing,
    labels, automatic rollback and promotion as a server of adapters."""
    import subprocess

    from openai import OpenAI

    from conftest import BIN, _wait_http, base_env, free_port, set_params, stop_servers

    from llmops.serving.deploy import project_key

    project = versioned_project
    llmops = [str(BIN / "llmops")]
    key = project_key(project)  # the deploy key: a server started by hand accepts it too (the monitor calls with it)
    set_params(project, "deploy.canary_min_requests=10", "deploy.canary_max_latency_ratio=0.5")
    port = free_port()
    log = open(project / "one.log", "w")
    proc = subprocess.Popen(llmops + ["serve", "start", "--port", str(port)], cwd=project, env=base_env(), stdout=log,
                            stderr=log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 180)
        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert [m.id for m in api.models.list().data] == ["model"]
        _canary(project, api, port, key)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(60)
        stop_servers(project)


def _alone_text(base, adapter, prompt, n):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return tok.decode(_alone(base, adapter, ids, n, eos=tok.eos_token_id), skip_special_tokens=True)


def _canary(project, api, port, key):
    """v2 takes half of production's requests, sticky per user, labelled in answers and metrics; it is dropped by the
    server when it fares worse than deploy.canary_*; `canary promote` gives it production."""
    import urllib.request

    from conftest import BIN, run
    from llmops.registry import versions as registry
    from llmops.serving.runtime import _bucket

    llmops = [str(BIN / "llmops")]
    bad = run(llmops + ["registry", "canary", "v2", "--share", "150", "--why", "x"], project, check=False)
    assert bad.returncode == 1 and "canary share 150% is outside 0-100%" in bad.stderr
    out = run(llmops + ["registry", "canary", "v2", "--share", "50", "--why", "try it"], project).stdout
    assert "canary: none -> v2.0.0 at 50% of production's traffic" in out and "now serves v1.0.0" in out
    assert "model@v2.0.0" in [m.id for m in api.models.list().data]

    def ask(user):  # sampled, the same work each: never cached, latencies comparable
        return api.completions.create(model="model", prompt="What is 2 plus 2?", max_tokens=6, temperature=1.0,
                                      user=user, extra_body={"ignore_eos": True}).model

    users = [f"user-{i}" for i in range(8)]
    routed = {u: ask(u) for u in users}
    assert routed == {u: "model@v2.0.0" if _bucket(u) < 50 else "model@v1.0.0" for u in users}
    assert 0 < list(routed.values()).count("model@v2.0.0") < len(users)
    assert all(ask(u) == routed[u] for u in users[:4])  # sticky
    page = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                                         headers={"Authorization": f"Bearer {key}"})).read().decode()
    assert 'llmops_requests_total{route="/v1/completions",status="200",version="v2.0.0"}' in page
    # more requests: once both have 10, the canary is judged, and (not twice as fast) dropped by the server
    for i in range(40):
        ask(f"more-{i}")
        if registry.canary(project) is None:
            break
    assert registry.canary(project) is None
    dropped = [e for e in registry.history(project, "canary") if e["event"] == "unassignment"][-1]
    assert dropped["version"] == "v2.0.0" and "automatic rollback of v2.0.0: its median latency" in dropped["why"]
    deadline = time.monotonic() + 30
    while any(ask(u) != "model@v1.0.0" for u in users):  # the server reloaded without it
        assert time.monotonic() < deadline
    logged = run(llmops + ["trail", "log", "--action", "registry.drop"], project).stdout
    assert "registry.drop" in logged and "ok" in logged

    run(llmops + ["registry", "canary", "v2", "--share", "10", "--why", "again"], project)
    out = run(llmops + ["registry", "canary", "promote", "--why", "it holds"], project).stdout
    assert "production: v1.0.0 -> v2.0.0; no canary" in out
    assert ask("anyone") == "model@v2.0.0" and registry.canary(project) is None
    run(llmops + ["registry", "rollback", "--why", "back for the rest of the test"], project)
    again = run(llmops + ["registry", "canary", "drop", "--why", "x"], project, check=False)
    assert again.returncode == 1 and "no version holds canary" in again.stderr
