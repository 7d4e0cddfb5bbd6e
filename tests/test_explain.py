"""Explanations: attributions point at the prompt token that decides the answer (a toy model trained here)."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from conftest import BIN, _wait_http, base_env, free_port, run
from llmops.evaluation import explain

FILLERS = [f"w{i}" for i in range(12)]
KEYS = ["red", "green", "blue"]  # the one token in each prompt that decides its answer
CONTEXT = 32


def _example(rng: random.Random) -> tuple[str, str]:
    words = rng.choices(FILLERS, k=6)
    key = rng.choice(KEYS)
    words.insert(rng.randrange(7), key)
    return " ".join(words) + " =", key


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 2-layer Llama trained in seconds to answer each prompt with the colour word somewhere in it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "=", *FILLERS, *KEYS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    rng = random.Random(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CONTEXT,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        batch = [_example(rng) for _ in range(64)]
        ids = torch.tensor([tokenizer(f"{prompt} {key}")["input_ids"] for prompt, key in batch])
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]  # learn the answer only (one token: explanations ask for one)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    out = tmp_path_factory.mktemp("toy") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_attributions_point_at_the_token_that_decides_the_answer(toy):
    model, tokenizer = explain.load(toy)
    rng = random.Random(1)
    for _ in range(10):
        prompt, key = _example(rng)
        result = explain.explain(model, tokenizer, prompt, max_new_tokens=1)
        assert result.answer == key
        ranked = sorted(result.by_token(), key=lambda t: -t[1])
        assert ranked[0][0] == key and ranked[0][1] > 3 * abs(ranked[1][1]), ranked
    # the answer a caller names is explained too: "why would it say blue?" points at nothing in particular
    forced = explain.explain(model, tokenizer, "w1 w2 red w3 w4 w5 w6 =", answer="blue")
    assert forced.answer_tokens == ["blue"] and len(forced.attributions) == 1


def test_explain_cli_prints_a_table_and_writes_a_heatmap(toy, tmp_path):
    out = run([str(BIN / "llmops"), "explain", "w3 w3 green w1 w9 w0 w2 =", "--model", str(toy), "--max-tokens", "1",
               "--out", str(tmp_path / "x")], tmp_path).stdout
    table = out.splitlines()
    assert table[0] == "answer: 'green'" and table[2].split() == ["token", "attribution", "share"]
    rows = [line.split() for line in table[3:11]]
    assert [r[0] for r in rows] == ["'w3'", "'w3'", "'green'", "'w1'", "'w9'", "'w0'", "'w2'", "'='"]
    assert max(rows, key=lambda r: float(r[1]))[0] == "'green'"
    saved = json.loads((tmp_path / "x/explanation.json").read_text())
    assert saved["answer"] == "green" and len(saved["attributions"][0]) == len(saved["input_tokens"]) == 8
    assert (tmp_path / "x/attributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_prompt_over_the_context_is_refused(toy, tmp_path):
    result = run([str(BIN / "llmops"), "explain", " ".join(["w1"] * 40), "--model", str(toy)], tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("error: explain: the prompt has 40 tokens; with the answer it does not fit the "
                                     f"model's context of {CONTEXT} tokens")
    assert not (tmp_path / ".llmops").exists()  # nothing written


@pytest.mark.services
def test_the_server_explains_under_the_same_keys(toy, tmp_path):
    from openai import AuthenticationError, BadRequestError, OpenAI

    from llmops.governance.apikeys import hash_key

    key, port = "sk-test-explain", free_port()
    proc = subprocess.Popen([str(BIN / "llmops"), "serve", "start", "--model", str(toy), "--port", str(port)],
                            cwd=tmp_path, env=base_env(LLMOPS_API_KEY_HASHES=hash_key(key)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 120)
        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        answer = api.post("/explain", cast_to=object, body={"model": "model", "prompt": "w5 blue w1 w1 w2 w8 w0 =",
                                                                   "max_tokens": 1})
        assert answer["object"] == "explanation" and answer["answer"] == "blue"
        scores = [sum(row[i] for row in answer["attributions"]) for i in range(len(answer["input_tokens"]))]
        assert answer["input_tokens"][scores.index(max(scores))] == "blue"
        with pytest.raises(BadRequestError) as over:
            api.post("/explain", cast_to=object, body={"model": "model", "prompt": " ".join(["w1"] * 40)})
        assert over.value.code == "context_length_exceeded"
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0).post(
                "/explain", cast_to=object, body={"model": "model", "prompt": "w1 ="})
    finally:
        proc.terminate()
        proc.wait(60)
