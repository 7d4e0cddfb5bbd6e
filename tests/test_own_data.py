"""A user's own data through a base's own chat template: the formats people have, and loss on the answers only."""

from __future__ import annotations

import pytest

import standin
from llmops.training import chat
from llmops.data import formats
from llmops.data.datasets import DataError
from llmops.training.modeling import IGNORE, instruction_tensors

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome"},
]


@pytest.fixture(scope="module")
def qwen_tok():
    return standin.tokenizer("qwen2")


def _rows(*rows):
    return list(enumerate(rows, 1))


def test_each_format_becomes_prompt_and_response():
    alpaca = formats.normalize(_rows({"instruction": "Add.", "input": "2 and 3", "output": "5", "task": "sum"},
                                     {"instruction": "Say hi.", "input": "", "output": "hi"}), "a.jsonl")
    assert alpaca == [{"task": "sum", "prompt": "Add.\n\n2 and 3", "response": "5"},
                      {"prompt": "Say hi.", "response": "hi"}]
    single = formats.normalize(_rows({"messages": CONVERSATION[1:3]}), "m.jsonl")
    assert single == [{"prompt": "Capital of France?", "response": "Paris"}]  # a single turn needs no messages
    multi = formats.normalize(_rows({"messages": CONVERSATION}), "m.jsonl")[0]
    assert (multi["prompt"], multi["response"], multi["messages"]) == ("And of Italy?", "Rome", CONVERSATION)
    assert formats.context(multi) == CONVERSATION[:-1]
    assert formats.conversation(single[0]) == CONVERSATION[1:3]
    assert formats.normalize(_rows({"prompt": "p", "response": "r"}), "p.csv", "prompt_response") == \
        [{"prompt": "p", "response": "r"}]


def test_a_declared_format_is_held_to():
    with pytest.raises(DataError, match=r"d\.jsonl: line 1: the row is prompt_response, but the file is alpaca "
                                        r"\(data\.format\)"):
        formats.normalize(_rows({"prompt": "p", "response": "r"}), "d.jsonl", "alpaca")
    with pytest.raises(DataError, match=r"line 1: messages\[0\]: content must be a string \(got int\)"):
        formats.normalize(_rows({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}),
                          "d.jsonl")
    with pytest.raises(DataError, match=r"messages\[2\]: a system message can only come first"):
        formats.normalize(_rows({"messages": CONVERSATION[1:3] + [CONVERSATION[0]]}), "d.jsonl")


def test_only_the_assistant_turns_are_trained_as_a_hand_built_mask_says(qwen_tok):
    ids, trained = chat.training_ids(qwen_tok, CONVERSATION, "row 1")
    # the same conversation tokenized piece by piece, each piece marked by hand
    pieces = [("<|im_start|>system\nYou answer in one word.<|im_end|>\n", False),
              ("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", False),
              ("Paris<|im_end|>\n", True),
              ("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n", False),
              ("Rome<|im_end|>\n", True)]
    expected_ids, expected_mask = [], []
    for text, train in pieces:
        part = qwen_tok(text, add_special_tokens=False)["input_ids"]
        expected_ids += part
        expected_mask += [train] * len(part)
    assert (ids, trained) == (expected_ids, expected_mask)
    assert qwen_tok.decode([i for i, t in zip(ids, trained) if t]) == "Paris<|im_end|>\nRome<|im_end|>\n"

    data, _ = instruction_tensors(qwen_tok, [{"messages": CONVERSATION, "prompt": "And of Italy?", "response": "Rome"}],
                                  128, "refuse", "t.jsonl")
    labels = data["labels"][0, :len(ids)].tolist()
    assert labels == [i if t else IGNORE for i, t in zip(ids, trained)]
    # what a model answers from is the conversation up to the answer, ending in the generation prompt
    prompt = chat.prompt_ids(qwen_tok, CONVERSATION[:-1])
    assert ids[:len(prompt)] == prompt and qwen_tok.decode(ids[len(prompt):]) == "Rome<|im_end|>\n"


def test_templates_that_cannot_mark_the_answer_are_refused(qwen_tok):
    bare = standin.tokenizer("gpt2")  # GPT-2 ships no chat template
    with pytest.raises(chat.TemplateError, match="base model gpt2: its tokenizer has no chat template.*"
                                                 "train.finetune.chat_template"):
        chat.set_template(bare, None, "base model gpt2")
    chat.set_template(bare, standin.PLAIN, "base model gpt2")
    ids, trained = chat.training_ids(bare, CONVERSATION[1:3], "row 1")
    assert bare.decode([i for i, t in zip(ids, trained) if t]) == "Paris<|endoftext|>\n"

    # a template that renders the last turn differently (here: only the last assistant turn gets a marker)
    qwen_tok.chat_template = standin.CHATML.replace("m['content'] + '<|im_end|>'",
                                                    "m['content'] + ('!' if loop.last else '') + '<|im_end|>'")
    with pytest.raises(chat.TemplateError, match="row 1: the chat template renders turn 2 with a different start"):
        chat.training_ids(qwen_tok, CONVERSATION[1:] + [{"role": "user", "content": "x"},
                                                        {"role": "assistant", "content": "y"}], "row 1")
    qwen_tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(chat.TemplateError, match="row 2: the chat template failed: .*roles must alternate"):
        chat.prompt_ids(qwen_tok, CONVERSATION[1:2], "row 2")


@pytest.mark.parametrize("overflow, kept", [("drop", 1), ("truncate", 2)])
def test_long_rows_are_dropped_or_truncated_and_counted(qwen_tok, overflow, kept):
    qwen_tok.chat_template = standin.CHATML
    rows = [{"prompt": "Hi", "response": "Hello"}, {"prompt": "word " * 60, "response": "ok"}]
    data, over = instruction_tensors(qwen_tok, rows, 32, overflow, "t.jsonl")
    assert over == 1 and data["input_ids"].shape[0] == kept
    with pytest.raises(DataError, match=r"t\.jsonl: row 2: it is longer than max_seq_len \(\d+ > 32 tokens\)"):
        instruction_tensors(qwen_tok, rows, 32, "refuse", "t.jsonl")


def test_a_base_directory_that_cannot_be_fine_tuned_is_refused_naming_what_it_lacks(tmp_path):
    from llmops.training.base_model import BaseModelError, check_files

    base = standin.build("qwen2", tmp_path / "base")
    check_files(base, "mine")  # whole: passes
    for missing, message in (("tokenizer.json", "no tokenizer in"), ("model.safetensors", "no .safetensors weights"),
                             ("config.json", "no config.json in")):
        moved = base / missing
        moved.rename(tmp_path / missing)
        with pytest.raises(BaseModelError, match=f"base model mine: {message}"):
            check_files(base, "mine")
        (tmp_path / missing).rename(moved)
