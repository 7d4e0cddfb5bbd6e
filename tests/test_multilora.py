"""Many LoRA adapters on one base in one continuous-batching engine: each answer equals its adapter's served alone."""

from __future__ import annotations

import asyncio

import pytest

from llmops.engine import Engine, EngineError, Sampling
from llmops.multilora import AdapterError

WORDS = [f"w{i}" for i in range(40)]
PROMPTS = ["w1 w2 w3", "w4 w4 w4 w4 w4 w9 w10", "w7", "w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21", "w30 w31"]


def _toy_base(path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=None))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
    base = _toy_base(root / "base")
    adapters = {
        "a": _adapter(base, root / "a", 1, r=4, target_modules=["q_proj", "v_proj"]),
        "b": _adapter(base, root / "b", 2, r=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
        "c": _adapter(base, root / "c", 3, r=2, target_modules=["gate_proj", "up_proj"], use_rslora=True),
    }
    return base, adapters


def _alone(base, adapter, prompt_ids, n):
    """What plain transformers (+ peft) generates greedily: the adapter served alone."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
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
            return got, again, back

        got, again, back = asyncio.run(scenario())
    finally:
        engine.stop()
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
            await engine.add_adapter("a", adapters["a"])
            with pytest.raises(AdapterError, match="adapter 'foreign' does not fit this base"):
                await engine.add_adapter("foreign", foreign)
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
