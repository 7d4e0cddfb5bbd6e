"""Loading the trained model and scoring it: one place for evaluate, audit_bias, quantize and the server.

- `load_finetuned`: the base model (checked, safetensors only) with the fine-tuned adapter on it.
- `continuation_logprobs`: the summed log-probability of each continuation given its context,
  the quantity behind perplexity, the bias audit's paired likelihoods and lm-evaluation-harness's
  `loglikelihood` requests.
- `perplexity` and `greedy_answers` on instruction rows (through the chat template), built on the two above.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llmops.core.config import Params
from llmops.data import formats
from llmops.evaluation import metrics
from llmops.training import chat
from llmops.training.modeling import (
    ModelError,
    answer_start,
    encode_row,
    fit_to_length,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    resolve_base,
)

ADAPTER = Path("models/finetune")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(dev: str) -> Any:
    """What a model computes in on `dev`: bf16 on a CUDA GPU (its tensor cores' type), float32 on a CPU, where bf16
    matmuls are slow."""
    import torch

    return torch.bfloat16 if dev == "cuda" else torch.float32


@dataclass
class Loaded:
    tokenizer: Any
    model: Any  # a PeftModel: `with model.disable_adapter():` scores the base
    base_path: str  # the directory or hub id of the base
    virtual_tokens: int  # prompt tuning prepends these to every input

    @property
    def context(self) -> int:
        """Tokens of text the model can take (its positions, less the virtual tokens)."""
        return int(getattr(self.model.config, "max_position_embeddings", 2048)) - self.virtual_tokens


def load_finetuned(params: Params, root: str | os.PathLike = ".", adapter: str | os.PathLike = ADAPTER,
                   **kwargs: Any) -> Loaded:
    """The base model named by train.finetune.base_model with the adapter in `adapter`, in eval mode, on the GPU when
    there is one; in `compute_dtype` unless `dtype` says otherwise ("auto": the base's own).

    Raises:
        ModelError: the base or the adapter is missing, damaged, or not loadable from safetensors.
    """
    from peft import PeftConfig

    root = Path(root)
    adapter = root / adapter
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{Path(adapter).relative_to(root)}/ has no trained adapter; "
                         "run `llmops run` (or `dvc pull` in a fresh clone)")
    base = resolve_base(params.train.finetune.base_model, root, params.train.finetune.revision)
    tok = load_tokenizer(str(adapter))
    kwargs.setdefault("dtype", compute_dtype(device()))
    model = load_adapter(load_causal_lm(base, **kwargs), adapter).to(device()).eval()
    virtual = getattr(PeftConfig.from_pretrained(str(adapter)), "num_virtual_tokens", 0) or 0
    return Loaded(tokenizer=tok, model=model, base_path=base, virtual_tokens=virtual)


def continuation_logprobs(model: Any, pad_id: int, items: Iterable[tuple[list[int], list[int]]],
                          batch_size: int) -> list[tuple[float, int]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation and its length.

    Each item is its own right-padded row (no text shared between rows); the caller fits
    it to the model's context. A prompt-tuning model's virtual positions come first in its
    logits and are skipped.
    """
    import torch

    items = list(items)
    out: list[tuple[float, int]] = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            width = max(len(c) + len(t) for c, t in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (c, t) in enumerate(chunk):
                ids[r, :len(c) + len(t)] = torch.tensor(c + t)
                mask[r, :len(c) + len(t)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, -width:]
            for r, (c, t) in enumerate(chunk):
                # the token at position p is predicted by the logits at p - 1; only the continuation's positions are
                # normalised, in float32, where the model is: a batch's whole [rows, width, vocab] in float32 is
                # 14 GB for 32 GSM8K rows with Qwen2.5's 151,936-token vocabulary
                scored = torch.log_softmax(logits[r, len(c) - 1:len(c) + len(t) - 1].float(), dim=-1)
                picked = scored.gather(-1, torch.tensor(t, device=dev)[:, None])
                out.append((float(picked.double().sum()), len(t)))
    return out


def response_logprobs(loaded: Loaded, rows: list[dict], batch_size: int) -> list[tuple[float, int]]:
    """Summed log-probability of each row's final answer (with the template's end of turn) given the conversation
    before it, rendered through the chat template.

    A row longer than the context has the start of its conversation cut, so every answer
    token is scored with as much of its prompt as fits.

    Raises:
        ModelError: an answer alone is longer than the model's context.
    """
    items = []
    for i, row in enumerate(rows, 1):
        example = encode_row(loaded.tokenizer, row, f"eval row {i}")
        fitted = fit_to_length(example, loaded.context)
        if fitted is None:
            raise ModelError(f"eval row {i}: its answer alone is longer than the model's context "
                             f"({len(example[0]) - answer_start(example[1])} > {loaded.context} tokens)")
        ids, trained = fitted
        start = answer_start(trained)
        items.append((ids[:start], ids[start:]))
    return continuation_logprobs(loaded.model, loaded.tokenizer.pad_token_id, items, batch_size)


def perplexity(scores: list[tuple[float, int]]) -> float:
    """exp of the mean negative log-likelihood per token, token-weighted over all rows."""
    return math.exp(-sum(s for s, _ in scores) / sum(n for _, n in scores))


def _left_padded(loaded: Loaded, contexts: list[chat.Messages], max_new_tokens: int) -> tuple[Any, Any]:
    """input_ids and attention_mask of the conversations rendered for an answer, left-padded (generation continues
    on the right); a conversation longer than the context has its start cut."""
    import torch

    tok = loaded.tokenizer
    room = max(1, loaded.context - max_new_tokens)
    heads = [chat.prompt_ids(tok, c)[-room:] for c in contexts]
    width = max(map(len, heads))
    ids = torch.full((len(heads), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, head in enumerate(heads):
        ids[r, width - len(head):] = torch.tensor(head)
        mask[r, width - len(head):] = 1
    dev = next(loaded.model.parameters()).device
    return ids.to(dev), mask.to(dev)


def stop_ids(loaded: Loaded) -> list[int]:
    """The tokens that end an answer: the tokenizer's end of text and the model's generation config's (a chat model
    often ends its turn with a token of its own, such as <|im_end|>)."""
    found = [loaded.tokenizer.eos_token_id]
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    for i in configured if isinstance(configured, list) else [configured]:
        if i is not None and i not in found:
            found.append(i)
    return found


def greedy_answers(loaded: Loaded, contexts: list[chat.Messages], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to conversations (rendered through the chat template, left-padded batches), cut at the end of
    the turn, stripped."""
    import torch

    tok = loaded.tokenizer
    stops = stop_ids(loaded)
    answers = []
    for i in range(0, len(contexts), batch_size):
        ids, mask = _left_padded(loaded, contexts[i:i + batch_size], max_new_tokens)
        with torch.no_grad():
            out = loaded.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id,
            )
        for seq in out[:, ids.shape[1]:].tolist():
            ends = [seq.index(s) for s in stops if s in seq]
            seq = seq[: min(ends)] if ends else seq
            answers.append(tok.decode(seq, skip_special_tokens=True).strip())
    return answers


def contexts(rows: list[dict]) -> list[chat.Messages]:
    """What each row asks: its conversation before the final answer."""
    return [formats.context(r) for r in rows]


def exact_matches(answers: list[str], rows: list[dict]) -> list[bool]:
    """Whether each answer equals its row's reference response: the one exact-match rule (llmops/evaluation/metrics.py)."""
    return [bool(s) for s in metrics.scores("exact_match", answers, [r["response"] for r in rows])]


def ms_per_token(loaded: Loaded, prompts: list[chat.Messages], new_tokens: int, repeats: int) -> float:
    """Greedy generation latency for one batch of conversations: milliseconds per generated token step.

    Exactly `new_tokens` steps each time (end-of-text does not stop it), after one warm-up
    run; the median of `repeats` timed runs.
    """
    import statistics
    import time

    import torch

    ids, mask = _left_padded(loaded, prompts, new_tokens)
    pad = loaded.tokenizer.pad_token_id
    timings = []
    for i in range(repeats + 1):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        if ids.is_cuda:
            torch.cuda.synchronize()
        if i:  # the first run warms up (allocations, kernels)
            timings.append(time.perf_counter() - start)
    return 1000 * statistics.median(timings) / new_tokens
