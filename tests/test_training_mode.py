"""The trainer's engine trains its model in training mode, whatever mode the model was loaded in."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from llmops.core.config import DeepSpeedParams, FinetuneParams
from llmops.training.trainer import Batches, TrainJob, build_model, sanitized_env, start_engine, train_steps
from conftest import free_port

pytestmark = pytest.mark.training  # DeepSpeed optimizer steps, in this process


@pytest.fixture(scope="module")
def one_rank():
    """A process group of this process alone, as torchrun would describe it, in the trainer's environment (where
    DeepSpeed builds its ops); one per module, as DeepSpeed keeps its groups for the life of the process."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in dict(sanitized_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                               LOCAL_RANK="0", WORLD_SIZE="1").items():
            env.setenv(key, value)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_loaded_base_is_fine_tuned_in_training_mode(tmp_path, one_rank, checkpointing):
    """from_pretrained returns the base in eval mode, where transformers skips activation checkpointing.

    With checkpointing on, each layer's parts must run twice per step: once in the forward
    pass, once again in the backward pass to recompute what the layer did not keep.
    """
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    cfg = FinetuneParams(method="lora", activation_checkpointing=checkpointing, packing=False, steps=2, warmup_steps=1,
                         micro_batch=2, max_seq_len=16, checkpoint_every=0, eval_every=0,
                         deepspeed=DeepSpeedParams(zero_stage=2, precision="fp32"))
    job = TrainJob(mode="finetune", cfg=cfg.model_dump(mode="json"), data="-", model=str(tmp_path / "base"),
                   out_dir="-", ckpt_dir="-", log_file="-", fingerprint="-")
    engine = start_engine(build_model(job, cfg), cfg, job.kernels)
    assert all(module.training for module in engine.module.modules())

    calls: list[bool] = []
    engine.module.base_model.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(True))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    batches = Batches({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}, cfg, world=1)
    train_steps(engine, lambda step, micro: batches(step, micro, 0, engine.device), 0, 1, cfg.seed,
                lambda *_, **__: None)
    assert len(calls) == (2 if checkpointing else 1)
