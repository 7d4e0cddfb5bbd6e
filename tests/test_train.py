"""train: DeepSpeed ZeRO-2/3 on 2 CPU ranks, LoRA and prompt tuning, outputs, manifest, loss that falls."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import BIN, run, set_params
from llmops.core import provenance

pytestmark = pytest.mark.training


def llmops(project: Path, *args: str, check: bool = True):
    return run([str(BIN / "llmops"), *args], project, check=check)


def log_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def test_pretrain_zero2_two_ranks_loss_falls(trained):
    rows = log_rows(trained / "reports/train/pretrain/log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 61))
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    first, last = mean(float(r["loss"]) for r in rows[:5]), mean(float(r["loss"]) for r in rows[-5:])
    assert last < 0.65 * first, (first, last)  # from ~ln(300) = 5.7 to well below
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    lrs = [float(r["lr"]) for r in rows]
    assert max(lrs) == pytest.approx(1e-2, rel=0.02) and lrs[-1] < 0.2 * max(lrs)  # warmup, then cosine decay
    assert lrs[0] == pytest.approx(1e-2 / 5)  # the first step learns: warmup starts at lr / warmup_steps
    assert lrs[:5] == sorted(lrs[:5]) and lrs[4] < max(lrs)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_log_has_grad_norm_and_held_out_loss(trained, mode):
    rows = log_rows(trained / f"reports/train/{mode}/log.csv")
    norms = [float(r["grad_norm"]) for r in rows]
    assert all(0 < n < 1e3 for n in norms), norms
    held = {int(r["step"]): float(r["eval_loss"]) for r in rows if r["eval_loss"]}
    assert sorted(held) == [50, 60]  # every eval_every (50) steps, and at the end
    summary = json.loads((trained / f"reports/train/{mode}/summary.json").read_text())
    assert summary["final_eval_loss"] == held[60]
    # held-out loss tracks the training loss: far below where the run started
    assert held[60] < 0.8 * float(rows[0]["loss"]), (held, rows[0]["loss"])


def test_pretrain_outputs_load_and_reproduce_the_logged_loss(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained / "models/pretrain"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) <= 300 and tok.eos_token == "<|endoftext|>"
    text = "The word apple has 5 letters."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE round-trips
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    # the saved weights are the trained ones: their loss on corpus text is near the last logged losses
    ids = torch.tensor([tok("\n".join((trained / "data/prepared/corpus.txt").read_text().splitlines()[:40]))["input_ids"][:128]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    last = mean(float(r["loss"]) for r in log_rows(trained / "reports/train/pretrain/log.csv")[-5:])
    assert loss < last * 1.5


def test_pretrain_manifest_has_provenance(trained):
    m = json.loads((trained / "models/pretrain/manifest.json").read_text())
    assert m["mode"] == "pretrain" and m["world_size"] == 2 and m["parent_model"] is None
    assert m["params"]["deepspeed"]["zero_stage"] == 2 and m["params"]["model"]["hidden_size"] == 32
    assert m["sha256"]["dataset"] == provenance.sha256_file(trained / "data/prepared/corpus.txt")
    assert m["sha256"]["model.safetensors"] == provenance.sha256_file(trained / "models/pretrain/model.safetensors")
    assert m["git"]["commit"] and m["libraries"]["deepspeed"] and m["libraries"]["peft"]
    assert m["result"]["steps"] == 60
    assert not (trained / "checkpoints/train/pretrain").exists()  # resume scratch removed after success


def test_finetune_lora_zero3_two_ranks(trained):
    out = trained / "models/finetune"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    # all-linear: peft names each layer it adapted, every linear layer of every block (the output layer left out)
    assert {name.rsplit(".", 1)[-1] for name in cfg["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(cfg["target_modules"]) == 2 * 7  # two blocks
    rows = log_rows(trained / "reports/train/finetune/log.csv")
    assert len(rows) == 60
    first, last = mean(float(r["loss"]) for r in rows[:5]), mean(float(r["loss"]) for r in rows[-5:])
    assert last < 0.8 * first, (first, last)
    m = json.loads((out / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["params"]["deepspeed"]["zero_stage"] == 3
    assert m["parent_model"]["base_model"] == "pretrain"
    assert m["parent_model"]["sha256"]["model.safetensors"] == provenance.sha256_file(
        trained / "models/pretrain/model.safetensors")
    assert m["sha256"]["dataset"] == provenance.sha256_file(trained / "data/prepared/train.jsonl")
    assert m["result"]["params_trainable"] < m["result"]["params_total"] / 5


def test_finetune_merged_model_equals_base_plus_adapter(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 120, 7]])
    merged = AutoModelForCausalLM.from_pretrained(trained / "models/finetune/merged")
    base = AutoModelForCausalLM.from_pretrained(trained / "models/pretrain")
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, trained / "models/finetune")(input_ids=ids).logits
        folded = merged(input_ids=ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(folded, adapted, atol=1e-4, rtol=1e-4)


def test_prompt_tuning(project, trained):
    """Prompt tuning on the pretrained base: only the virtual tokens train, and they help on held-out data."""
    set_params(project, f"train.finetune.base_model={trained / 'models/pretrain'}", "train.finetune.method=prompt_tuning",
               "train.finetune.prompt_tuning.num_virtual_tokens=8", "train.finetune.lr=0.1",
               "train.finetune.steps=100", "governance.base_model_licence=CC0-1.0")
    llmops(project, "prepare_data")
    llmops(project, "train", "pretrain")  # fetches the named base: no pretraining
    assert json.loads((project / "reports/train/pretrain/summary.json").read_text())["fetched"] == \
        str(trained / "models/pretrain")
    llmops(project, "train", "finetune")
    cfg = json.loads((project / "models/finetune/adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 8
    m = json.loads((project / "models/finetune/manifest.json").read_text())
    assert m["result"]["params_trainable"] == 8 * 32
    # single micro-batch losses are noisy; the eval split's perplexity is the steadier measure
    llmops(project, "evaluate")
    scores = json.loads((project / "reports/evaluate/metrics.json").read_text())
    assert scores["finetuned"]["perplexity"] < 0.9 * scores["base"]["perplexity"], scores
