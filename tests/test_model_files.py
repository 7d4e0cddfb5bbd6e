"""Trained models load anywhere with plain transformers/peft, and only from files we can trust."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import BIN, run, set_params, snapshot

pytestmark = [pytest.mark.services, pytest.mark.training]  # the session's run pipeline (DVC, training)


def llmops(project: Path, *args: str):
    return run([str(BIN / "llmops"), *args], project, check=False)


def one_line_error(proc, *phrases: str, code: int = 1) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


def test_models_load_after_a_move_with_plain_transformers_and_peft(ran_project, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    moved = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(ran_project, moved, symlinks=True)
    shutil.rmtree(ran_project)  # nothing may still point at the old place
    for name in ("models/finetune/adapter_config.json", "models/finetune/manifest.json",
                 "models/pretrain/manifest.json", "models/pretrain/tokenizer_config.json"):
        assert str(ran_project) not in (moved / name).read_text(), name
    assert json.loads((moved / "models/finetune/adapter_config.json").read_text())[
        "base_model_name_or_path"] == "models/pretrain"
    for mode in ("pretrain", "finetune"):
        card = (moved / f"models/{mode}/README.md").read_text()
        assert "More Information Needed" not in card and "from_pretrained" in card

    monkeypatch.chdir(moved)  # the README's snippets run from the project root
    tok = AutoTokenizer.from_pretrained("models/finetune")
    assert tok.model_max_length == 128  # the model's context, not transformers' 1e30 placeholder
    base = AutoModelForCausalLM.from_pretrained("models/pretrain", use_safetensors=True)
    assert base.config.max_position_embeddings == tok.model_max_length
    ids = torch.tensor([tok("### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n")["input_ids"]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, "models/finetune")(input_ids=ids).logits
        auto = AutoPeftModelForCausalLM.from_pretrained("models/finetune")(input_ids=ids).logits
    torch.testing.assert_close(auto, adapted)


def test_pickled_weights_are_refused(ran_project):
    from transformers import AutoModelForCausalLM

    pickled = ran_project.parent / "pickled"
    model = AutoModelForCausalLM.from_pretrained(ran_project / "models/pretrain")
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # what older tools and untrusted uploads hold
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    set_params(ran_project, f"train.finetune.base_model={pickled}")
    before = snapshot(ran_project, "models")
    one_line_error(llmops(ran_project, "train", "pretrain"), "no .safetensors weights",
                   "(only pytorch_model.bin: pickle files, which can run code when loaded, are refused)", code=2)
    assert snapshot(ran_project, "models") == before  # the previous base stays


def test_changed_or_truncated_weights_are_refused(ran_project):
    weights = ran_project / "models/pretrain/model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8] + bytes(8))  # same size, other bytes
    one_line_error(llmops(ran_project, "evaluate"), "model.safetensors: does not match its manifest",
                   "dvc checkout")
    # without a manifest to compare with, a truncated file is still one clear line
    (ran_project / "models/pretrain/manifest.json").unlink()
    weights.write_bytes(data[: len(data) // 2])
    one_line_error(llmops(ran_project, "evaluate"), "models/pretrain: cannot load its weights")


def test_evaluate_in_a_fresh_clone_says_what_to_run(project):
    one_line_error(llmops(project, "evaluate"), "data/prepared/eval.jsonl: no such file",
                   "run `llmops run` (or `dvc pull` in a fresh clone)")
