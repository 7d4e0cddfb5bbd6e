"""Everything train refuses before a training process starts, and the pieces it is built from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import BIN, run, set_params, snapshot
from llmops.training import checkpoints
from llmops.core.config import FinetuneParams, ModelParams, PretrainParams
from llmops.training.fit import GIB, Devices, FitError, Shape, check_fit, estimate
from llmops.training.modeling import (
    IGNORE, ParamCount, encode_row, instruction_tensors, llama_config, train_tokenizer,
)
from llmops.training.trainer import (Batches, clear_stale_build_locks, deepspeed_config, sanitize_cuda_arch_list,
                            sanitized_env)


def llmops(project: Path, *args: str):
    return run([str(BIN / "llmops"), *args], project, check=False)


@pytest.fixture(scope="module")
def tokenizer():
    from llmops.data import sample_data

    return train_tokenizer(sample_data.corpus(0, 300).splitlines(), 300, 128)


def save_base(path: Path, tok, hidden: int = 32) -> Path:
    """A tiny randomly initialised Llama with our tokenizer, saved as a local base model."""
    from transformers import AutoModelForCausalLM

    cfg = llama_config(ModelParams(vocab_size=300, hidden_size=hidden, num_layers=2, num_heads=2, intermediate_size=64),
                       len(tok), 64, tok.eos_token_id, tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: mit\n---\n# a local base\n")  # its card states its licence
    return path


def save_lora(base: Path, dest: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(dest)
    return dest


# -- refused before launch: clear message, exit 1 (2 for bad params), nothing written ----------------------

def assert_refused(proc, *phrases: str, code: int = 1) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "torch.distributed.run" not in proc.stderr


def test_finetune_before_pretrain_names_the_missing_base(project):
    llmops(project, "prepare_data")
    assert_refused(llmops(project, "train", "finetune"), "error: train@finetune: base model 'pretrain'",
                   "run train@pretrain first")
    assert not (project / "models").exists()


def test_missing_or_unreachable_base_model(project):
    llmops(project, "prepare_data")
    set_params(project, "train.finetune.base_model=/no/such/model")
    assert_refused(llmops(project, "train", "pretrain"), "train.finetune.base_model: /no/such/model: no such directory",
                   code=2)
    assert_refused(llmops(project, "train", "finetune"), "models/pretrain/ holds no model yet", "run train@pretrain")
    set_params(project, "train.finetune.base_model=someorg/some-model")  # a hub id, with the hub unreachable
    assert_refused(llmops(project, "train", "pretrain"), "someorg/some-model@main: the hub cannot be reached "
                   "(HF_HUB_OFFLINE is set)", "has no complete copy of it", "hf download someorg/some-model", code=2)
    assert not (project / "models").exists()


def test_adapter_that_does_not_match_its_base(project, tokenizer, tmp_path):
    llmops(project, "prepare_data")
    base = save_base(tmp_path / "base", tokenizer)
    other = save_base(tmp_path / "other", tokenizer, hidden=48)
    set_params(project, f"train.finetune.base_model={base}")
    fetched = llmops(project, "train", "pretrain")  # the named base is fetched into models/pretrain, not trained
    assert fetched.returncode == 0 and f"nothing to pretrain: fetched the base {base}" in fetched.stdout, fetched.stderr
    before = snapshot(project, "models")
    set_params(project, f"train.finetune.adapter={save_lora(other, tmp_path / 'a1')}")
    assert_refused(llmops(project, "train", "finetune"), "does not match its base model", "q_proj")
    set_params(project, f"train.finetune.adapter={save_lora(base, tmp_path / 'a2')}", "train.finetune.method=prompt_tuning")
    assert_refused(llmops(project, "train", "finetune"), "is LORA, but train.finetune.method needs PROMPT_TUNING")
    assert snapshot(project, "models") == before


def test_incompatible_zero_and_offload_is_a_params_error(project):
    proc = llmops(project, "params", "-S", "train.pretrain.deepspeed.offload_params=true")
    assert_refused(proc, "-S train.pretrain.deepspeed: offload_params needs zero_stage 3", code=2)
    set_params(project, "train.finetune.deepspeed.zero_stage=0")
    proc = llmops(project, "params", "-S", "train.finetune.deepspeed.offload_optimizer=true")
    assert_refused(proc, "offload_optimizer needs zero_stage 1, 2 or 3", code=2)
    assert_refused(llmops(project, "params", "-S", "train.finetune.method=ia3"), "unknown method 'ia3'", code=2)


@pytest.mark.training  # the truncated run trains two steps
def test_prompts_over_max_seq_len_refused_or_truncated_with_a_count(project, tokenizer, tmp_path):
    llmops(project, "prepare_data")
    base = save_base(tmp_path / "base", tokenizer)
    set_params(project, f"train.finetune.base_model={base}", "train.finetune.max_seq_len=24")
    llmops(project, "train", "pretrain")
    assert_refused(llmops(project, "train", "finetune"), "data/prepared/train.jsonl:", "examples are longer than "
                   "max_seq_len (24 tokens; the longest has", "the first at row", "prompt_overflow: truncate or drop",
                   code=2)
    set_params(project, "train.finetune.prompt_overflow=truncate", "train.finetune.steps=2",
               "train.finetune.warmup_steps=1")
    proc = llmops(project, "train", "finetune")
    assert proc.returncode == 0, proc.stderr
    assert "warning: train@finetune:" in proc.stdout and "had the start of their conversation cut" in proc.stdout


def test_configuration_that_cannot_fit_is_refused_before_launch(project):
    llmops(project, "prepare_data")
    set_params(project, "train.pretrain.model.hidden_size=8192", "train.pretrain.model.num_layers=48",
               "train.pretrain.model.num_heads=64", "train.pretrain.model.intermediate_size=28672")
    proc = llmops(project, "train", "pretrain")
    assert_refused(proc, "this configuration does not fit: it needs", "GiB per process", "trainable")
    assert "fine-tuning an existing one with LoRA" in proc.stderr
    assert not (project / "checkpoints/train/pretrain/job.json").exists()
    assert not (project / "models").exists()


# -- the fit arithmetic --------------------------------------------------------------------------------------

SEVEN_B = ParamCount(total=7_000_000_000, trainable=7_000_000_000)
SHAPE_7B = Shape(hidden=4096, layers=32, heads=32, vocab=32000)


def cfg_7b(**ds) -> PretrainParams:
    return PretrainParams(micro_batch=1, max_seq_len=2048, deepspeed={"precision": "bf16", "num_procs": 8, **ds})


def test_zero_arithmetic_matches_the_paper():
    e = estimate(SEVEN_B, SHAPE_7B, cfg_7b(zero_stage=0))
    assert (e.weights, e.gradients, e.optimizer) == (2 * 7e9, 2 * 7e9, 12 * 7e9)  # 16 bytes per parameter
    e3 = estimate(SEVEN_B, SHAPE_7B, cfg_7b(zero_stage=3))
    assert (e3.weights, e3.gradients, e3.optimizer) == (2 * 7e9 / 8, 2 * 7e9 / 8, 12 * 7e9 / 8)
    off = estimate(SEVEN_B, SHAPE_7B, cfg_7b(zero_stage=3, offload_optimizer=True, offload_params=True))
    assert off.optimizer == 0 and off.weights == 0 and off.host == 12 * 7e9 + 2 * 7e9
    # activations: s*b*h*(34 + 5*a*s/h) per layer in 16-bit, plus fp32 logits and their gradient
    assert e.activations == 2048 * 4096 * (34 + 5 * 32 * 2048 / 4096) * 32 + 2 * 2048 * 32000 * 4


def test_fit_check_refuses_with_numbers_and_suggests_what_fits():
    gpus = Devices("cuda", 8, 80 * GIB, 1024 * GIB)
    with pytest.raises(FitError) as err:
        check_fit(SEVEN_B, SHAPE_7B, cfg_7b(zero_stage=0), gpus, finetune=False)
    msg = str(err.value)
    assert "8 x CUDA with 80.00 GiB free each" in msg and "optimizer 78.23 GiB" in msg
    assert "These would fit: zero_stage: 3" in msg
    assert check_fit(SEVEN_B, SHAPE_7B, cfg_7b(zero_stage=3), gpus, finetune=False).device < 80 * GIB
    with pytest.raises(FitError, match="num_procs is 8 but this machine has 4 GPU"):
        check_fit(SEVEN_B, SHAPE_7B, cfg_7b(zero_stage=3), Devices("cuda", 4, 80 * GIB, GIB), finetune=False)


# -- building blocks -----------------------------------------------------------------------------------------

def test_cuda_arch_list_suffixes_are_dropped_for_deepspeed():
    assert sanitize_cuda_arch_list("9.0a") == "9.0"
    assert sanitize_cuda_arch_list("8.0;9.0a+PTX") == "8.0;9.0+PTX"
    assert sanitize_cuda_arch_list("7.5 8.6") == "7.5 8.6"
    env = sanitized_env({"TORCH_CUDA_ARCH_LIST": "9.0a", "X": "1"})
    assert (env["TORCH_CUDA_ARCH_LIST"], env["X"]) == ("9.0", "1")


def test_deepspeed_ops_are_built_per_virtual_environment():
    import sys

    assert sanitized_env({})["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    assert sanitized_env({"TORCH_EXTENSIONS_DIR": "/mine"})["TORCH_EXTENSIONS_DIR"] == "/mine"
    # with the system's first on PATH (a run not from an activated venv), the environment's ninja still builds them
    import shutil

    env = sanitized_env({"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert shutil.which("ninja", path=env["PATH"]) == str(Path(sys.executable).parent / "ninja")
    assert env["PATH"].endswith(":/usr/local/bin:/usr/bin:/bin")
    assert sanitized_env(env)["PATH"] == env["PATH"]  # the trainer sanitizes what the stage sanitized


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    """torch's JIT build waits forever on a lock whose builder was killed; a build in progress keeps writing."""
    import os
    import time

    killed, building, built = (tmp_path / name for name in ("fused_adam", "cpu_adam", "shm_comm"))
    for op in (killed, building, built):
        op.mkdir()
        (op / "build.ninja").write_text("")
    for op in (killed, building):
        (op / "lock").touch()
    long_ago = time.time() - 3600
    for f in (killed / "build.ninja", killed / "lock", building / "build.ninja"):
        os.utime(f, (long_ago, long_ago))
    (building / "fused_adam.o").write_text("")  # written a moment ago: this build is alive
    assert clear_stale_build_locks(tmp_path) == [killed]
    assert not (killed / "lock").exists() and (building / "lock").exists()
    assert clear_stale_build_locks(tmp_path) == []


def test_deepspeed_config_follows_params():
    cfg = FinetuneParams(steps=100, lr=1e-4, warmup_steps=10, lr_schedule="linear", micro_batch=4, grad_accum=8,
                         grad_clip=0.5, deepspeed={"zero_stage": 3, "offload_optimizer": True,
                                                   "offload_params": True, "precision": "bf16"})
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}}
    assert ds["bf16"] == {"enabled": True}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (4, 8, 0.5)
    assert ds["scheduler"]["type"] == "WarmupDecayLR" and ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["optimizer"]["params"]["lr"] == 1e-4
    assert deepspeed_config(PretrainParams())["scheduler"]["type"] == "WarmupCosineLR"


def test_loss_counts_only_response_tokens(tokenizer):
    rows = [{"prompt": "Reverse the word 'apple'.", "response": "elppa"}, {"prompt": "What is 2 + 2?", "response": "4"}]
    data, truncated = instruction_tensors(tokenizer, rows, 64, "refuse", "test")
    assert truncated == 0
    for i, row in enumerate(rows):
        ids, trained = encode_row(tokenizer, row, "test")
        head = trained.index(True)
        labels = data["labels"][i]
        assert (labels[:head] == IGNORE).all()
        kept = labels[labels != IGNORE].tolist()
        assert kept == ids[head:] and tokenizer.decode(kept) == row["response"] + "<|endoftext|>"
        # the demo's chat template is the instruction template: a prompt, then the answer and end of text
        assert tokenizer.decode(ids[:head]) == f"### Instruction:\n{row['prompt']}\n\n### Response:\n"
        assert data["attention_mask"][i].sum() == len(ids)


def test_batches_are_a_function_of_seed_and_step():
    tensors = {"input_ids": torch.arange(50).view(10, 5), "attention_mask": torch.ones(10, 5)}
    cfg = PretrainParams(micro_batch=3, grad_accum=2)
    a, b = Batches(tensors, cfg, world=2), Batches(tensors, cfg, world=2)
    assert torch.equal(a(7, 1, 1, "cpu")["input_ids"], b(7, 1, 1, "cpu")["input_ids"])  # no hidden state
    seen = [int(x) for s in range(5) for m in range(2) for r in range(2) for x in a(s, m, r, "cpu")["input_ids"][:, 0]]
    assert sorted(seen[:10]) == list(range(0, 50, 5))  # each epoch visits every example once


def test_incomplete_checkpoints_are_never_used(tmp_path):
    root = tmp_path / "ckpt"
    for step in (10, 20, 30):
        (root / checkpoints.partial_name(step)).mkdir(parents=True)
        checkpoints.commit(root, step, "fp", keep=2, info={})
    assert [s for s, _ in checkpoints.complete(root, "fp")] == [20, 30]  # pruned to keep=2
    (root / checkpoints.partial_name(40)).mkdir()  # a save that was killed
    (root / checkpoints.name(50)).mkdir()  # renamed but without its marker
    assert checkpoints.verified(root, "fp")[0] == 30
    assert checkpoints.verified(root, "other-params") is None
    assert checkpoints.clean(root, "fp") == [".partial-step-00000040", "step-00000050"]


def test_checkpoint_files_are_verified_before_loading(tmp_path):
    root = tmp_path / "ckpt"
    for step in (10, 20):
        (root / checkpoints.partial_name(step) / "global").mkdir(parents=True)
        (root / checkpoints.partial_name(step) / "global" / "model.pt").write_bytes(b"weights %d" % step)
        checkpoints.commit(root, step, "fp", keep=2, info={})
    assert checkpoints.verified(root, "fp")[0] == 20
    (root / checkpoints.name(20) / "global" / "model.pt").write_bytes(b"planted")
    warnings: list[str] = []
    assert checkpoints.verified(root, "fp", warn=warnings.append)[0] == 10  # falls back, does not fail
    assert "step-00000020 skipped" in warnings[0] and "global/model.pt" in warnings[0]
    (root / checkpoints.name(10) / "extra.pkl").write_bytes(b"planted")  # a file added is a change too
    assert checkpoints.verified(root, "fp", warn=warnings.append) is None


@pytest.mark.training
def test_diverging_training_stops_with_a_clear_error_and_publishes_nothing(project):
    llmops(project, "prepare_data")
    set_params(project, "train.pretrain.lr=1.0", "train.pretrain.grad_clip=0.0")
    proc = llmops(project, "train", "pretrain")
    assert_refused(proc, "error: train@pretrain: training diverged at step ", "Lower train.pretrain.lr (now 1)")
    assert len(proc.stderr.strip().splitlines()) == 1 and "ChildFailedError" not in proc.stdout + proc.stderr
    assert not (project / "models/pretrain").exists() and not (project / "reports/train").exists()
    assert not list((project / "models").iterdir())  # no temporary directory left either
