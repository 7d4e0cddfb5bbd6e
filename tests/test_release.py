"""release: the gated candidate, self-contained in models/release/, with the chat template it was trained with."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import BIN, run, set_params, snapshot
from llmops.core import provenance
from llmops.data.datasets import read_jsonl
from llmops.training.modeling import answer_start, encode_row, load_tokenizer

pytestmark = [pytest.mark.services, pytest.mark.training]


def test_the_release_is_the_gated_candidate_and_stands_alone(pipeline, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    release = json.loads((pipeline / "models/release/release.json").read_text())
    verdict = json.loads((pipeline / "reports/gate/verdict.json").read_text())
    assert release["variant"] == f"quantized/{verdict['release_candidate']}" and release["gate"] == verdict
    source = pipeline / "models/quantized" / verdict["release_candidate"]
    assert provenance.sha256_file(pipeline / "models/release/model.safetensors") == provenance.sha256_file(
        source / "model.safetensors")
    for name, path, weights in (("base", "models/pretrain", "model.safetensors"),
                                ("adapter", "models/finetune", "adapter_model.safetensors")):
        assert release["sources"][name]["sha256"][weights] == provenance.sha256_file(pipeline / path / weights)
    metrics = json.loads((pipeline / "reports/evaluate/metrics.json").read_text())
    assert release["scores"]["evaluate"]["exact_match"] == metrics["finetuned"]["exact_match"]
    assert release["adapter"] == "adapter"  # the LoRA adapter itself, for a server of adapters on one base
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (pipeline / "models/release/adapter" / name).read_bytes() == (pipeline / "models/finetune" / name).read_bytes()

    moved = shutil.copytree(pipeline / "models/release", tmp_path / "elsewhere")  # nothing outside it is needed
    tok = AutoTokenizer.from_pretrained(moved)
    model = AutoModelForCausalLM.from_pretrained(moved)
    for row in read_jsonl(pipeline / "data/prepared/eval.jsonl")[:5]:
        chat = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"]
        trained_with = load_tokenizer(str(pipeline / "models/finetune"))
        ids, trained = encode_row(trained_with, row, "eval")
        assert chat == ids[:answer_start(trained)]  # a chat request renders as the training prompt did
        with torch.no_grad():
            out = model.generate(torch.tensor([chat]), max_new_tokens=4, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        assert out.shape[1] > len(chat)


def test_an_unquantized_release_is_the_adapter_merged_into_its_base(ran_project):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    set_params(ran_project, "gate.release_candidate=none")
    run(["dvc", "repro", "release"], ran_project)
    release = json.loads((ran_project / "models/release/release.json").read_text())
    assert release["variant"] == "merged" and "quantize" not in release["scores"]
    ids = torch.tensor([[5, 17, 42, 99, 120, 7]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(ran_project / "models/release")(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(ran_project / "models/pretrain")
        adapted = PeftModel.from_pretrained(base, ran_project / "models/finetune")(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_a_refused_verdict_releases_nothing(ran_project):
    verdict = ran_project / "reports/gate/verdict.json"
    verdict.write_text(verdict.read_text().replace('"passed": true', '"passed": false', 1))
    before = snapshot(ran_project, "models")
    proc = run([str(BIN / "llmops"), "release"], ran_project, check=False)
    assert proc.returncode == 1 and "error: release: the release gate refused this model" in proc.stderr
    assert snapshot(ran_project, "models") == before
