"""Packed fine-tuning batches: several examples per sequence, each example's loss as if it were alone."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmops.training.modeling import IGNORE, pack_bins, pack_examples, pad_examples, padding_share
from llmops.training.trainer import model_inputs

PAD = 0


def _pairs(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) token lists of mixed lengths."""
    rng = random.Random(seed)
    return [([rng.randrange(1, 97) for _ in range(rng.randint(2, 20))],
             [rng.randrange(1, 97) for _ in range(rng.randint(1, 12))]) for _ in range(n)]


def _examples(pairs) -> list[tuple[list[int], list[bool]]]:
    """Each pair as modeling.encode_row gives an example: its ids, and the response's marked trained."""
    return [(h + t, [False] * len(h) + [True] * len(t)) for h, t in pairs]


def _model(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def _per_example_loss(model, tensors: dict, spans: list[tuple[int, int, int]]) -> list[float]:
    """Summed next-token loss of each example, found at (row, start, length) in the tensors."""
    with torch.no_grad():
        logits = model(**model_inputs(tensors)).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), tensors["labels"][:, 1:], ignore_index=IGNORE, reduction="none")
    return [float(losses[row, start:start + n - 1].sum()) for row, start, n in spans]


def _spans(pairs, bins) -> list[tuple[int, int, int]]:
    """Where pack_examples put each example: bins are filled in order, one after another."""
    found: dict[int, tuple[int, int, int]] = {}
    for row, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(pairs[i][0]) + len(pairs[i][1])
            found[i] = (row, at, n)
            at += n
    return [found[i] for i in range(len(pairs))]


def test_bins_hold_every_example_once_within_capacity():
    lengths = [len(h) + len(t) for h, t in _pairs(200)]
    bins = pack_bins(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= sum(lengths) // 64 + 2  # first-fit decreasing: within a sequence or so of the ideal
    assert pack_bins(lengths, 64) == bins  # deterministic


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_batches_give_each_example_the_same_loss(attn):
    pairs = _pairs(24)
    model = _model(attn)
    padded = pad_examples(_examples(pairs), PAD)
    alone = _per_example_loss(model, padded, [(i, 0, len(h) + len(t)) for i, (h, t) in enumerate(pairs)])
    packed = pack_examples(_examples(pairs), 64, PAD)
    bins = pack_bins([len(h) + len(t) for h, t in pairs], 64)
    assert packed["input_ids"].shape[0] == len(bins) < len(pairs)
    together = _per_example_loss(model, packed, _spans(pairs, bins))
    assert together == pytest.approx(alone, rel=1e-5, abs=1e-5)

    # the model's own loss (the one training minimises): the same token-weighted mean in both layouts
    with torch.no_grad():
        assert float(model(**model_inputs(packed)).loss) == pytest.approx(float(model(**model_inputs(padded)).loss),
                                                                           rel=1e-5)
        packed_loss = float(model(**model_inputs(packed)).loss)

    # and it is the block-diagonal attention that makes them equal: the packed rows seen as one sequence each
    # (the attention_mask a padded batch would have) let examples read the ones before them
    crossing = _per_example_loss(model, {k: v for k, v in packed.items() if k != "position_ids"},
                                 _spans(pairs, bins))
    assert crossing != pytest.approx(alone, rel=1e-3)
    # as does a cache (transformers then ignores the packing)
    with torch.no_grad():
        cached = model(**{k: v for k, v in packed.items() if k != "attention_mask"}, use_cache=True).loss
    assert float(cached) != pytest.approx(packed_loss, rel=1e-4)


def test_packing_cuts_the_padding_of_a_length_mix():
    pairs = _pairs(400, seed=1)
    padded, packed = pad_examples(_examples(pairs), PAD), pack_examples(_examples(pairs), 64, PAD)
    assert padding_share(padded) > 0.3
    assert padding_share(packed) < 0.05
    # every response token is still a target, once
    assert int((packed["labels"] != IGNORE).sum()) == sum(len(t) for _, t in pairs) - sum(not h for h, _ in pairs)


def test_only_packed_batches_lose_their_attention_mask():
    packed = pack_examples(_examples(_pairs(4)), 64, PAD)
    assert set(model_inputs(packed)) == {"input_ids", "labels", "position_ids", "use_cache"}
    padded = pad_examples(_examples(_pairs(4)), PAD)
    assert set(model_inputs(padded)) == {"input_ids", "labels", "attention_mask", "use_cache"}
