"""Models, tokenizers and training examples, shared by train and evaluate.

A training example is a conversation rendered through the base's chat template (llmops/training/chat.py),
with only the assistant's answers trained. The demo model, trained here from scratch, has a
tokenizer of our own whose chat template is the instruction template

    ### Instruction:
    {prompt}

    ### Response:
    {response}<|endoftext|>

whose two framing parts are single special tokens.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llmops.core.config import ModelParams
from llmops.core.errors import LlmopsError
from llmops.data import formats
from llmops.data.datasets import DataError
from llmops.training import base_model as bases
from llmops.training import chat

EOS = "<|endoftext|>"
PAD = "<|pad|>"
PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
IGNORE = -100  # label value the loss skips (transformers' convention)
PRETRAINED = Path("models/pretrain")


class ModelError(LlmopsError):
    """A base model or adapter that cannot be used; the message says which and why."""


def chat_template() -> str:
    """PROMPT_TEMPLATE as a tokenizer chat template (Jinja), so a chat request renders as a training prompt.

    Each user message becomes an instruction and each assistant message a response ending in
    end-of-text; a system message is a preamble; the rendering always ends ready for a response.
    """
    head, tail = (json.dumps(part) for part in PROMPT_TEMPLATE.split("{prompt}"))
    return (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n\\n' }}"
        f"{{%- elif m['role'] == 'user' -%}}{{{{ {head} + m['content'] + {tail} }}}}"
        "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def train_tokenizer(text_lines: Iterable[str], vocab_size: int, max_len: int) -> Any:
    """A byte-level BPE tokenizer trained on `text_lines`, wrapped for transformers (save_pretrained works).

    Digits are always single tokens, and the two parts of the prompt template are single
    special tokens. At vocab_size 260 (256 bytes + those 4 specials: end of text, padding
    and the two template parts) no merges are learnt: one token per character, which is
    what lets a small model count letters and step numbers; a larger vocab_size adds BPE merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    head, tail = PROMPT_TEMPLATE.split("{prompt}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD, head, tail],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(text_lines, trainer=trainer)
    # model_max_length: the model's context, so the tokenizer warns about longer inputs instead of passing them
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=max_len)
    wrapped.chat_template = chat_template()  # the demo's own: training, evaluation and serving render through it
    return wrapped


def llama_config(model: ModelParams, vocab_size: int, max_seq_len: int, eos_id: int, pad_id: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads or model.num_heads,
        max_position_embeddings=max_seq_len,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )


def resolve_base(base_model: str, root: str | os.PathLike = ".", revision: str | None = None) -> str:
    """models/pretrain, once it holds the base that `train.finetune.base_model` (and `revision`) name.

    Raises:
        ModelError: models/pretrain holds no model yet, or another base than the one named.
    """
    path = Path(root) / PRETRAINED
    if not (path / "config.json").is_file():
        raise ModelError(
            f"base model {base_model!r}: {PRETRAINED}/ holds no model yet; run train@pretrain first (`llmops run`, "
            "`llmops train pretrain`, or `dvc pull` in a fresh clone)")
    fetched = bases.recorded(root)
    if bases.is_named(base_model) and not bases.matches(fetched, base_model, revision):
        holds = f"{fetched['base_model']}@{fetched['revision']}" if fetched else "the demo model pretrained here"
        raise ModelError(f"base model {base_model!r}: {PRETRAINED}/ holds {holds}; run train@pretrain to fetch "
                         f"{base_model} (`llmops train pretrain`, or `llmops run`)")
    if not bases.is_named(base_model) and fetched:
        raise ModelError(f"base model 'pretrain': {PRETRAINED}/ holds {fetched['base_model']}, fetched, not the demo "
                         "model; run train@pretrain to train it")
    return str(path)


def verify_model_dir(path: str | os.PathLike) -> None:
    """Check a local model or adapter directory before anything loads it; a hub id passes through.

    Weights are loaded only from safetensors (pickle files can run code), and where a
    manifest.json lies beside them (our own models), every weights file must still have
    the sha256 it recorded.

    Raises:
        ModelError: no safetensors weights, or weights that differ from the manifest.
    """
    path = Path(path)
    if not path.is_dir():
        return
    weights = sorted(path.glob("*.safetensors"))
    if not weights and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        pickled = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl")]
        raise ModelError(
            f"{path}: no .safetensors weights" + (f" (found {', '.join(sorted(pickled))}: pickle files, "
                                                   "which can run code when loaded, are refused)" if pickled else "")
            + "; convert the weights to safetensors, or run `dvc pull` / the stage that makes them")
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return
    recorded = json.loads(manifest.read_text()).get("sha256", {})
    from llmops.core.provenance import sha256_file

    for f in weights:
        if f.name in recorded and sha256_file(f) != recorded[f.name]:
            raise ModelError(
                f"{f}: does not match its manifest (sha256 differs: changed or damaged since it was written); "
                f"restore it with `dvc checkout {path}` or `dvc pull`, or re-run the stage that made it")


def load_causal_lm(name: str, **kwargs: Any) -> Any:
    """A causal LM from a checked model directory (or a hub id), from safetensors only.

    Raises:
        ModelError: see verify_model_dir, or weights that cannot be read (e.g. a truncated file).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verify_model_dir(name)
    hf_logging.disable_progress_bar()  # a bar redrawn through a pipe is noise in a log
    try:
        return safe_4bit_on_cpu(AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, **kwargs))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a truncated file, a missing one
        raise ModelError(f"model {name}: cannot load its weights: {str(exc).splitlines()[0]}") from None


def safe_4bit_on_cpu(model: Any) -> Any:
    """`model`, with bitsandbytes' AVX512-BF16 weight packing off for the 4-bit layers it would break.

    On a CPU with AVX512-BF16 (e.g. AMD Zen 4), bitsandbytes 0.50 repacks a 4-bit layer's weights at its first
    forward pass, reshaping the scales to (out, in // blocksize): a layer narrower than a block (in < 64, as in
    the tests' tiny model) fails with "shape '[32, 0]' is invalid". Those layers keep the plain 4-bit kernel;
    on other CPUs nothing changes.
    """
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(module, "support_avx512bf16_for_cpu", False) and state is not None and \
                module.in_features % state.blocksize != 0:
            module.support_avx512bf16_for_cpu = False
    return model


def load_adapter(model: Any, adapter_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """The peft adapter saved in `adapter_dir` on `model`, from adapter_model.safetensors only."""
    from peft import PeftModel
    from safetensors import SafetensorError

    verify_model_dir(adapter_dir)
    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise ModelError(f"adapter {adapter_dir}: no adapter_model.safetensors")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelError(f"adapter {adapter_dir}: cannot load it: {str(exc).splitlines()[0]}") from None


def model_card(mode: str, manifest: dict) -> str:
    """README.md for a trained model directory: what it is, where it came from, how to load it."""
    result = manifest.get("result", {})
    parent = manifest.get("parent_model") or {}
    fetched = manifest.get("fetched")
    if mode == "pretrain" and fetched:
        what = (f"The base {fetched['base_model']}" + (f" (commit {fetched['revision']})" if fetched.get("revision")
                                                      else "") + ", its pretraining continued by `train@pretrain`")
        load = ('from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                'model = AutoModelForCausalLM.from_pretrained("models/pretrain", use_safetensors=True)\n'
                'tokenizer = AutoTokenizer.from_pretrained("models/pretrain")')
    elif mode == "pretrain":
        what = "A Llama-style causal language model trained from scratch by `train@pretrain`"
        load = ('from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                'model = AutoModelForCausalLM.from_pretrained("models/pretrain", use_safetensors=True)\n'
                'tokenizer = AutoTokenizer.from_pretrained("models/pretrain")')
    else:
        method = manifest.get("params", {}).get("method", "peft")
        what = f"A {method} adapter trained by `train@finetune` on the base `{parent.get('path', '?')}`"
        load = ('from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                f'base = AutoModelForCausalLM.from_pretrained("{parent.get("path", "models/pretrain")}", '
                'use_safetensors=True)\n'
                'model = PeftModel.from_pretrained(base, "models/finetune")\n'
                'tokenizer = AutoTokenizer.from_pretrained("models/finetune")')
    eval_loss = result.get("final_eval_loss")
    lines = [
        f"# models/{mode}", "", f"{what}, on `{manifest.get('dataset')}` "
        f"(sha256 `{manifest.get('sha256', {}).get('dataset', '?')[:16]}…`).", "",
        f"- steps: {result.get('steps')}, loss {result.get('first_loss', 0):.4f} -> {result.get('final_loss', 0):.4f}"
        + (f", held-out loss {eval_loss:.4f}" if eval_loss is not None else ""),
        f"- parameters: {result.get('params_total', 0):,} ({result.get('params_trainable', 0):,} trained)",
        f"- code: git {str((manifest.get('git') or {}).get('commit'))[:12]}, "
        f"params, hashes and library versions in manifest.json", "",
        "Load it with plain transformers/peft, from the project root (weights are safetensors only):", "",
        "```python", load, "```", "",
        "Chats render through the tokenizer's chat template (`tokenizer.apply_chat_template`).", "",
    ]
    return "\n".join(lines)


def load_config(name: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base model {name!r}: cannot load its config: {str(exc).splitlines()[0]}") from None


def meta_model(config: Any) -> Any:
    """The model's module tree without allocating weights (for sizes and shape checks)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class ParamCount:
    total: int
    trainable: int


def count_params(model: Any) -> ParamCount:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return ParamCount(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))


def check_adapter(adapter_dir: str | os.PathLike, base_config: Any, peft_type: str) -> None:
    """Refuse an adapter whose type or tensor shapes do not fit the base model.

    Raises:
        ModelError: the adapter is missing, of another method, or shaped for another model.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg_file, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ModelError(f"adapter {adapter_dir}: expected adapter_config.json and adapter_model.safetensors")
    kind = json.loads(cfg_file.read_text()).get("peft_type")
    if kind != peft_type:
        raise ModelError(f"adapter {adapter_dir}: is {kind}, but train.finetune.method needs {peft_type}")
    modules = dict(meta_model(base_config).named_modules())
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            shape = tuple(fh.get_slice(key).get_shape())
            problem = _shape_problem(key, shape, modules, base_config)
            if problem:
                raise ModelError(f"adapter {adapter_dir} does not match its base model: {problem}")


def _shape_problem(key: str, shape: tuple[int, ...], modules: dict, config: Any) -> str | None:
    if key.startswith("prompt_embeddings") or "prompt_encoder" in key:
        hidden = config.hidden_size
        return None if shape[-1] == hidden else f"{key} has width {shape[-1]}, base hidden_size is {hidden}"
    m = re.match(r"base_model\.model\.(.+)\.lora_([AB])\.weight$", key)
    if not m:
        return None
    name, part = m.groups()
    layer = modules.get(name)
    if layer is None:
        return f"{key}: base model has no module {name}"
    expected = layer.in_features if part == "A" else layer.out_features
    got = shape[1] if part == "A" else shape[0]
    if got != expected:
        return f"{key} expects {got} features, {name} has {expected}"
    return None


def load_tokenizer(name: str) -> Any:
    """The tokenizer saved with a model (ours or a hub model's); a pad token is added as EOS when missing."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base model {name!r}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"base model {name!r}: its tokenizer has no end-of-text token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


Example = tuple[list[int], list[bool]]  # a conversation's token ids, and whether each is trained (an answer's)


def encode_row(tok: Any, row: dict, where: str) -> Example:
    """A prepared row's conversation through the tokenizer's chat template, its assistant turns trained."""
    return chat.training_ids(tok, formats.conversation(row), where)


def answer_start(trained: list[bool]) -> int:
    """Where the final answer (the last run of trained tokens) starts."""
    end = max(i for i, t in enumerate(trained) if t)
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    return start


def fit_to_length(example: Example, max_len: int) -> Example | None:
    """Cut the conversation's start so it fits in max_len; None if its final answer alone does not fit."""
    ids, trained = example
    if len(ids) <= max_len:
        return example
    cut = len(ids) - max_len
    if cut > answer_start(trained):
        return None
    return ids[cut:], trained[cut:]


def instruction_tensors(tok: Any, rows: list[dict], max_len: int, overflow: str, source: str,
                        pack: bool = False) -> tuple[dict, int]:
    """Tensors of instruction rows (see example_tensors), each rendered through the tokenizer's chat template."""
    examples = [encode_row(tok, row, f"{source}: row {i}") for i, row in enumerate(rows, 1)]
    return example_tensors(examples, max_len, overflow, source, tok.pad_token_id, pack)


def example_tensors(examples: list[Example], max_len: int, overflow: str, source: str, pad_id: int,
                    pack: bool = False) -> tuple[dict, int]:
    """Tensors of encoded examples: labels are -100 outside the assistant's answers.

    Unpacked: one example per sequence, right-padded to the longest (input_ids, labels, attention_mask).
    Packed: examples packed into sequences of max_len (`pack_examples`), with position_ids restarting
    at each example; attention_mask then marks real tokens only, for counting, and is not the model's.

    Args:
        overflow: what to do with an example over max_len: refuse (stop, naming the row), truncate (cut the
            conversation's start; its final answer must fit), drop (leave it out).

    Returns:
        The tensors and how many examples were over max_len (truncated or dropped).

    Raises:
        DataError: an example is over max_len and overflow is 'refuse', its final answer alone is over (truncate),
            or no example is left.
    """
    kept, too_long = [], []
    for i, example in enumerate(examples, 1):
        if len(example[0]) > max_len:
            too_long.append(i)
            if overflow == "drop":
                continue
            fitted = fit_to_length(example, max_len) if overflow == "truncate" else None
            if fitted is None:
                what = "its final answer alone is" if overflow == "truncate" else "it is"
                raise DataError(
                    f"{source}: row {i}: {what} longer than max_seq_len ({len(example[0])} > {max_len} tokens); "
                    f"{len(too_long)} such row(s) so far. Raise max_seq_len"
                    + (", or set prompt_overflow: drop" if overflow == "truncate"
                       else " or set prompt_overflow: truncate or drop")
                )
            example = fitted
        kept.append(example)
    if not kept:
        raise DataError(f"{source}: no examples" + (f" (all {len(too_long)} are over max_seq_len, {max_len} tokens, "
                                                    "and prompt_overflow is drop)" if too_long else ""))
    if pack:
        return pack_examples(kept, max_len, pad_id), len(too_long)
    return pad_examples(kept, pad_id), len(too_long)


def pad_examples(examples: list[Example], pad_id: int) -> dict:
    """One example per row, right-padded to the longest."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids_t = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, trained) in enumerate(examples):
        n = len(ids)
        ids_t[row, :n] = torch.tensor(ids)
        labels[row, :n] = torch.where(torch.tensor(trained), torch.tensor(ids), IGNORE)
        mask[row, :n] = 1
    return {"input_ids": ids_t, "labels": labels, "attention_mask": mask}


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into sequences of at most `capacity` tokens: first-fit decreasing.

    Our own because the libraries that pack (TRL's BFD packing) pull in `datasets` and a
    trainer; this is fifteen lines. Deterministic: ties keep the examples' order.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_examples(examples: list[Example], max_len: int, pad_id: int) -> dict:
    """Examples packed into sequences of max_len tokens that attention cannot cross.

    Each example's position_ids start at 0, which is how transformers tells packed examples
    apart: given position_ids and no attention_mask, its masks keep each token's attention
    within its own example (block-diagonal causal; flash-attention uses the same ids). Each
    example's first label is -100, as an unpacked row's first label is never a target: no
    example learns to predict the next one's start. The padding at the end is a block of its own.
    """
    import torch

    bins = pack_bins([len(ids) for ids, _ in examples], max_len)
    ids_t = torch.full((len(bins), max_len), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), max_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(bins), max_len), dtype=torch.long)
    mask = torch.zeros((len(bins), max_len), dtype=torch.long)
    for row, members in enumerate(bins):
        at = 0
        for i in members:
            ids, trained = examples[i]
            n = len(ids)
            ids_t[row, at:at + n] = torch.tensor(ids)
            labels[row, at:at + n] = torch.where(torch.tensor(trained), torch.tensor(ids), IGNORE)
            labels[row, at] = IGNORE
            positions[row, at:at + n] = torch.arange(n)
            mask[row, at:at + n] = 1
            at += n
        positions[row, at:] = torch.arange(max_len - at)
    return {"input_ids": ids_t, "labels": labels, "position_ids": positions, "attention_mask": mask}


def padding_share(tensors: dict) -> float:
    """The share of the tensors' token slots that hold padding."""
    mask = tensors["attention_mask"]
    return 1 - float(mask.sum()) / mask.numel()


def corpus_tensors(tok: Any, text: str, max_len: int, source: str) -> dict:
    """The corpus as consecutive blocks of max_len tokens (lines joined by EOS; the tail shorter than a block dropped)."""
    import torch

    ids: list[int] = []
    for line in text.splitlines():
        if line.strip():
            ids += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = len(ids) // max_len
    if blocks < 1:
        raise DataError(f"{source}: {len(ids)} tokens, fewer than one block of max_seq_len ({max_len})")
    data = torch.tensor(ids[: blocks * max_len]).view(blocks, max_len)
    return {"input_ids": data, "labels": data.clone(), "attention_mask": torch.ones_like(data)}
