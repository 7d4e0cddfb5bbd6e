"""The training core: one DeepSpeed loop for pretraining and every fine-tuning method.

Runs in each process that torchrun starts (`python -m torch.distributed.run ... -m llmops.trainer job.json`).
The parent (tasks/train.py) has already tokenized the data, checked the fit and
written the job; this module builds the model, wraps it in a DeepSpeed engine,
resumes from the latest complete checkpoint, trains, and saves safetensors.

Determinism, which is what makes resume exact: the batch of (step, micro-step,
rank) is a pure function of the seed, and the RNG (dropout) is re-seeded from
(seed, step, rank) at every step, so a resumed run sees the same batches and
the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel

from llmops import checkpoints
from llmops.adapters import METHODS
from llmops.config import FinetuneParams, PretrainParams, TrainRunParams

LOG_COLUMNS = ["step", "loss", "lr", "tokens_per_s", "elapsed_s"]


class TrainJob(BaseModel):
    """What the parent hands every training process (as job.json)."""

    mode: Literal["pretrain", "finetune"]
    cfg: dict[str, Any]
    data: str  # safetensors: input_ids, labels, attention_mask, each [examples, seq]
    model: str  # pretrain: a directory with config.json; finetune: the base model directory or hub id
    out_dir: str  # rank 0 writes the final weights here
    ckpt_dir: str
    log_file: str
    fingerprint: str

    def params(self) -> TrainRunParams:
        return (PretrainParams if self.mode == "pretrain" else FinetuneParams).model_validate(self.cfg)


def sanitize_cuda_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST without arch-specific suffixes ("9.0a" -> "9.0").

    NVIDIA's images set "9.0a"; DeepSpeed's op builder parses each entry as
    major.minor integers and crashes on it when it JIT-builds an op.
    """
    return re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)


def sanitized_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    if env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = sanitize_cuda_arch_list(env["TORCH_CUDA_ARCH_LIST"])
    return env


def deepspeed_config(cfg: TrainRunParams) -> dict[str, Any]:
    """The DeepSpeed config for `cfg`: ZeRO stage and offload, precision, batch, clipping, AdamW, schedule."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    warmup = {"warmup_num_steps": cfg.warmup_steps, "warmup_type": "linear"}
    if cfg.lr_schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.steps, "warmup_min_ratio": 0.0, "cos_min_ratio": cfg.min_lr_ratio, **warmup}}
    elif cfg.lr_schedule == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": cfg.steps, "warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, **warmup}}
    else:
        scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, **warmup}}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": cfg.weight_decay}},
        "scheduler": scheduler,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_model(job: TrainJob, cfg: TrainRunParams) -> Any:
    """Pretrain: a randomly initialised model from config. Finetune: the base with a new or saved peft adapter."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    if job.mode == "pretrain":
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(job.model), dtype=torch.float32)
    from peft import PeftModel, get_peft_model

    assert isinstance(cfg, FinetuneParams)
    base = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch.float32)
    if cfg.adapter:
        return PeftModel.from_pretrained(base, cfg.adapter, is_trainable=True)
    return get_peft_model(base, METHODS[cfg.method].peft_config(cfg.method_params))


class Batches:
    """The micro-batch of (step, micro-step, rank): a fixed function of the seed, reshuffled every epoch."""

    def __init__(self, tensors: dict[str, Any], cfg: TrainRunParams, world: int):
        self.tensors, self.cfg, self.world = tensors, cfg, world
        self.n = tensors["input_ids"].shape[0]
        self._perms: dict[int, Any] = {}

    def _perm(self, epoch: int) -> Any:
        import torch

        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}
        return self._perms[epoch]

    def __call__(self, step: int, micro: int, rank: int, device: Any) -> dict[str, Any]:
        import torch

        b = self.cfg.micro_batch
        start = ((step * self.cfg.grad_accum + micro) * self.world + rank) * b
        positions = torch.arange(start, start + b)
        idx = torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in positions])
        return {k: v[idx].to(device) for k, v in self.tensors.items()}


def train_steps(engine: Any, batches: Callable[[int, int], dict[str, Any]], start: int, steps: int, seed: int,
                on_step: Callable[[int, float, float, int, float], None]) -> None:
    """Run optimizer steps start..steps-1; after each, on_step(step, mean loss, lr, global tokens, seconds).

    The same loop serves pretraining, every fine-tuning method and the throughput benchmark.
    """
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    gas = engine.gradient_accumulation_steps()
    for step in range(start, steps):
        t0 = time.perf_counter()
        torch.manual_seed(seed * 1_000_003 + step * world + rank)
        loss_sum, tokens = 0.0, 0
        for micro in range(gas):
            batch = batches(step, micro)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        # on the engine's device: NCCL, the GPU backend, has no CPU tensors
        stats = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=engine.device)
        dist.all_reduce(stats)
        on_step(step + 1, stats[0].item() / (gas * world), engine.get_lr()[0], int(stats[1].item()),
                time.perf_counter() - t0)


def _resume(engine: Any, job: TrainJob, finetune: bool) -> int:
    found = checkpoints.latest(job.ckpt_dir, job.fingerprint)
    if not found:
        return 0
    step, path = found
    # fine-tuning checkpoints hold only the trainable (adapter) weights; the frozen base comes from the base model
    loaded, _ = engine.load_checkpoint(job.ckpt_dir, tag=path.name, load_module_strict=not finetune)
    if loaded is None:
        raise RuntimeError(f"checkpoint {path} could not be loaded")
    return step


def _save_checkpoint(engine: Any, job: TrainJob, cfg: TrainRunParams, step: int, loss: float, finetune: bool) -> None:
    import torch.distributed as dist

    engine.save_checkpoint(job.ckpt_dir, tag=checkpoints.partial_name(step), save_latest=False,
                           exclude_frozen_parameters=finetune)
    dist.barrier()  # every rank's shard is on disk before the checkpoint is declared complete
    if dist.get_rank() == 0:
        checkpoints.commit(job.ckpt_dir, step, job.fingerprint, cfg.keep_checkpoints, {"loss": loss})
    dist.barrier()


def _log_writer(path: Path, start: int):
    """Append rows to the CSV log, first dropping rows after `start` (left by a run that was killed later)."""
    rows = []
    if start and path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return open(path, "a", newline="")


def _save_final(engine: Any, out_dir: str, zero_stage: int) -> None:
    import deepspeed
    import torch.distributed as dist

    model = engine.module
    gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None) if zero_stage == 3 \
        else nullcontext()
    with gather:
        if dist.get_rank() == 0:
            model.save_pretrained(out_dir, safe_serialization=True)
    dist.barrier()


def _die_with_launcher() -> None:
    """Have the kernel SIGKILL this process when its launcher dies (Linux).

    torchrun starts every worker in a session of its own, so killing the launcher's
    process group (Ctrl-C, a scheduler's SIGKILL) would otherwise leave the workers
    training on as orphans, writing into the checkpoints the next run resumes from.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before we asked
        os._exit(1)


def main(argv: list[str]) -> int:
    _die_with_launcher()
    job = TrainJob.model_validate_json(Path(argv[0]).read_text())
    os.environ.update(sanitized_env())
    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = job.params()
    finetune = job.mode == "finetune"

    model = build_model(job, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=deepspeed_config(cfg))
    batches = Batches(load_file(job.data), cfg, world)
    start = _resume(engine, job, finetune)
    if rank == 0:
        print(f"train@{job.mode}: {'resumed from step ' + str(start) if start else 'starting at step 0'} "
              f"of {cfg.steps}, {world} process(es), ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}",
              flush=True)

    log = _log_writer(Path(job.log_file), start) if rank == 0 else None
    writer = csv.DictWriter(log, LOG_COLUMNS) if log else None
    elapsed = 0.0

    def on_step(step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        nonlocal elapsed
        elapsed += seconds
        if writer:
            writer.writerow({"step": step, "loss": f"{loss:.6f}", "lr": f"{lr:.6g}",
                             "tokens_per_s": f"{tokens / seconds:.1f}", "elapsed_s": f"{elapsed:.3f}"})
            log.flush()
            if step % 10 == 0 or step == cfg.steps:
                print(f"step {step}/{cfg.steps} loss {loss:.4f} lr {lr:.3g} {tokens / seconds:,.0f} tokens/s", flush=True)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save_checkpoint(engine, job, cfg, step, loss, finetune)

    device = engine.device
    train_steps(engine, lambda step, micro: batches(step, micro, rank, device), start, cfg.steps, cfg.seed, on_step)
    if log:
        log.close()
    _save_final(engine, job.out_dir, cfg.deepspeed.zero_stage)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
