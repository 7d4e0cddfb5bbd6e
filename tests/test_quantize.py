"""quantize: real weight quantization that saves without pickles, reloads with plain transformers, and is measured."""

from __future__ import annotations

import json

import pytest

from conftest import BIN, run, set_params, snapshot
from llmops.training.modeling import safe_4bit_on_cpu
from llmops.core.provenance import sha256_file

pytestmark = [pytest.mark.services, pytest.mark.training]  # the session's run pipeline

LIBRARY = {"int8_weight_only": "torchao", "nf4": "bitsandbytes"}


def test_each_method_reloads_with_plain_transformers_and_matches_its_metrics(pipeline):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = json.loads((pipeline / "reports/quantize/metrics.json").read_text())
    ref = metrics["reference"]
    assert set(metrics["methods"]) == set(LIBRARY) and metrics["device"] == "cpu"
    for name, q in metrics["methods"].items():
        path = pipeline / "models/quantized" / name
        files = {f.name for f in path.iterdir()}
        assert not {f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))}, files  # no pickles
        assert "model.safetensors" in files and "manifest.json" in files
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["sha256"]["model.safetensors"] == sha256_file(path / "model.safetensors")
        assert manifest["parent"]["adapter"]["path"] == "models/finetune"

        config = json.loads((path / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == LIBRARY[name]
        # no extra arguments; safe_4bit_on_cpu only keeps bitsandbytes' AVX512-BF16 repacking off the tiny model's
        # 32-wide layers, which it cannot repack (a real model's layers are wide enough)
        model = safe_4bit_on_cpu(AutoModelForCausalLM.from_pretrained(path, use_safetensors=True))
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("### Instruction:\nWhat is 2 + 2?\n\n### Response:\n", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            assert out.shape[1] == ids.shape[1] + 3

        # the figures are the files' and each other's
        size = (path / "model.safetensors").stat().st_size
        assert q["size_bytes"] == size and q["size_ratio"] == pytest.approx(size / ref["size_bytes"])
        assert q["size_ratio"] < 0.8  # quantized linear layers really are smaller on disk
        assert q["perplexity_change"] == pytest.approx(q["perplexity"] - ref["perplexity"])
        assert q["exact_match_change"] == pytest.approx(q["exact_match"] - ref["exact_match"])
        for batch in ("batch_1", "batch_8"):
            assert q["ms_per_token"][batch] > 0
            assert q["latency_ratio"][batch] == pytest.approx(q["ms_per_token"][batch] / ref["ms_per_token"][batch])
    # int8 keeps the model close: perplexity within 5% of the unquantized one
    assert abs(metrics["methods"]["int8_weight_only"]["perplexity_change_ratio"]) < 0.05


def test_a_method_this_machine_cannot_run_is_refused_before_any_work(ran_project):
    before = snapshot(ran_project, "models/quantized", "reports/quantize")
    proc = run([str(BIN / "llmops"), "run", "--no-push", "-S", "quantize.methods=[int4_weight_only]",
                "-S", "gate.release_candidate=none"], ran_project, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: quantize.methods: int4_weight_only needs a CUDA GPU and this machine has "
                                   "none; methods that run on CPU: int8_weight_only, nf4")
    assert not (ran_project / ".llmops/prefect").exists()  # refused before the Prefect server started
    set_params(ran_project, "quantize.methods=[int4_weight_only]", "gate.release_candidate=none")
    proc = run([str(BIN / "llmops"), "quantize"], ran_project, check=False)
    assert proc.returncode == 2 and "int4_weight_only needs a CUDA GPU" in proc.stderr
    assert snapshot(ran_project, "models/quantized", "reports/quantize") == before
