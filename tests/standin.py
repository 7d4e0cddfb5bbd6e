"""Stand-in foundation models: tiny models of common architectures, built locally from their configs, each with a
BPE tokenizer trained here and its family's chat template, saved where the Hugging Face hub client looks for them.

Nothing is downloaded: `into_hub_cache` lays a model directory out as huggingface_hub's cache does
(HF_HOME/hub/models--org--name/refs/main and snapshots/<commit>/), so naming it by hub id with
HF_HUB_OFFLINE=1 runs exactly the path a user's online run takes once the model is cached.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

CHATML = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{ bos_token }}{%- for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
          "+ m['content'] + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
MISTRAL = ("{{ bos_token }}{%- for m in messages %}{%- if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
           "{%- elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{%- else %}{{ m['content'] + eos_token }}{%- endif %}{%- endfor %}")
# GPT-2 has no chat template: a user names one (train.finetune.chat_template), as this one
PLAIN = ("{%- for m in messages %}{{ m['role'] + ':\\n' + m['content'] }}{%- if m['role'] == 'assistant' %}"
         "{{ eos_token }}{%- endif %}{{ '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ 'assistant:\\n' }}"
         "{%- endif %}")

# architecture -> (transformers config class, its size arguments, special tokens, eos, bos, chat template)
ARCHS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512),
              ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"],
              "<|eot_id|>", "<|begin_of_text|>", LLAMA3),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512),
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None, CHATML),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
                ["<s>", "</s>", "[INST]", "[/INST]", "<pad>"], "</s>", "<s>", MISTRAL),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
             ["<|endoftext|>"], "<|endoftext|>", None, None),
}
LICENCE = "apache-2.0"


def _text() -> list[str]:
    """What the tokenizers learn their merges from: the demo's corpus and arithmetic words."""
    from llmops.data import sample_data

    return sample_data.corpus(0, 1500).splitlines() + [
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
        "How many clips did Natalia sell altogether in April and May? #### 72 The answer is 72.",
        "You are a helpful assistant. Answer the question. user assistant system"]


def tokenizer(arch: str, vocab_size: int = 600, texts: list[str] | None = None):
    """A byte-level BPE tokenizer of the architecture's special tokens and chat template, trained on `texts`
    (default `_text()`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, _, specials, eos, bos, template = ARCHS[arch]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts or _text(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    pad = next((t for t in specials if "pad" in t), eos)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, bos_token=bos, pad_token=pad,
                                  model_max_length=512)
    if template:
        tok.chat_template = template
    return tok


def build(arch: str, dest: Path, licence: str | None = LICENCE, seed: int = 0, sizes: dict | None = None,
          texts: list[str] | None = None, vocab_size: int = 600, dtype: str = "float32") -> Path:
    """A randomly initialised `arch` model with its tokenizer and a model card (licence in its front matter).

    `sizes` replaces the tiny config's (benchmarks/own_model_stages.py builds real models' shapes); a `vocab_size`
    there larger than the tokenizer's is kept, as real bases pad their embedding (Qwen2.5: 151,936 rows for 151,665
    tokens). `texts`, `vocab_size`: what the tokenizer is trained on, and its size."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, tiny, _, _, _, _ = ARCHS[arch]
    tok = tokenizer(arch, vocab_size, texts)
    shape = {"tie_word_embeddings": True, **(sizes or tiny)}
    shape["vocab_size"] = max(len(tok), shape.get("vocab_size", 0))
    tok.model_max_length = shape.get("max_position_embeddings", tok.model_max_length)
    config = getattr(transformers, config_class)(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    card = f"---\nlicense: {licence}\n---\n" if licence else ""
    (dest / "README.md").write_text(card + f"# stand-in {arch}\n\nA tiny {arch} of random weights, for tests.\n")
    return dest


def into_hub_cache(model_dir: Path, hf_home: Path, repo_id: str) -> str:
    """Lay `model_dir` out in the hub cache under HF_HOME as `repo_id` at a commit of its contents; return the
    commit."""
    digest = hashlib.sha1()
    for f in sorted(model_dir.iterdir()):
        digest.update(f.name.encode() + f.read_bytes())
    commit = digest.hexdigest()
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit
