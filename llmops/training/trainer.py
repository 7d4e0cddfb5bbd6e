"""The training core: one DeepSpeed loop for pretraining and every fine-tuning method.

Runs in each training process (`python -m llmops.training.trainer job.json`, started by torchrun where there are
several: llmops/training/launch.py).
The parent (llmops/pipeline/stages/train.py) has already tokenized the data, checked the fit and
written the job; this module builds the model, wraps it in a DeepSpeed engine,
resumes from the latest complete checkpoint, trains, and saves safetensors.

Determinism, which is what makes resume exact: the batch of (step, micro-step,
rank) is a pure function of the seed, and the RNG (dropout) is re-seeded from
(seed, step, rank) at every step, so a resumed run sees the same batches and
the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel

from llmops.core.config import FinetuneParams, PretrainParams, TrainRunParams
from llmops.core.peft_methods import METHODS
from llmops.core.procs import die_with_parent
from llmops.training import checkpoints

LOG_COLUMNS = ["step", "loss", "eval_loss", "grad_norm", "lr", "tokens_per_s", "elapsed_s"]
FAILURE = "failure.json"  # what rank 0 writes when training stops on an expected failure (e.g. divergence)


class TrainJob(BaseModel):
    """What the parent hands every training process (as job.json)."""

    mode: Literal["pretrain", "finetune"]
    cfg: dict[str, Any]
    data: str  # safetensors: input_ids, labels, attention_mask, each [examples, seq]
    eval_data: str | None = None  # the same for held-out examples: eval loss every cfg.eval_every steps
    model: str  # pretrain: a directory with config.json; finetune: the base model directory or hub id
    out_dir: str  # rank 0 writes the final weights here
    ckpt_dir: str
    resume_from: str | None = None  # a complete, verified checkpoint's tag (the parent checked its hashes)
    log_file: str
    fingerprint: str
    kernels: Literal["none", "liger", "compile"] = "none"  # cfg.kernels as llmops.training.launch resolved it for this machine
    from_weights: bool = False  # pretrain: start from the weights in `model` (continued pretraining), not at random

    def params(self) -> TrainRunParams:
        return (PretrainParams if self.mode == "pretrain" else FinetuneParams).model_validate(self.cfg)


def sanitize_cuda_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST without arch-specific suffixes ("9.0a" -> "9.0").

    NVIDIA's images set "9.0a"; DeepSpeed's op builder parses each entry as
    major.minor integers and crashes on it when it JIT-builds an op.
    """
    return re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)


def sanitized_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The training processes' environment: a sanitized TORCH_CUDA_ARCH_LIST, and DeepSpeed's ops built per venv.

    DeepSpeed JIT-builds its C++ ops into TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions
    by default) and rebuilds them whenever another environment built them last; one
    directory per virtual environment keeps each build. The build runs the first `ninja`
    on PATH, and two ninjas (the environment's and the system's, of other log versions)
    take each other's build logs for stale: the environment's own comes first, so a run from
    an activated venv and one from cron or a service no longer rebuild each other's ops.
    """
    env = dict(os.environ if environ is None else environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    own = str(Path(sys.executable).parent)  # once, however often the environment is sanitized (stage, then trainer)
    env["PATH"] = os.pathsep.join([own, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != own)])
    if env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = sanitize_cuda_arch_list(env["TORCH_CUDA_ARCH_LIST"])
    return env


def clear_stale_build_locks(extensions_dir: Path, idle_s: float = 600) -> list[Path]:
    """Remove the build locks of DeepSpeed ops whose build was killed; return the ops' directories.

    torch's JIT build (FileBaton) creates `<op>/lock` and deletes it when the build ends, even
    on Ctrl-C; a SIGKILL, an OOM kill or a SIGTERM mid-build leaves it, and every later run
    then waits on it forever, silently. A lock is stale when nothing in its op's directory
    changed for idle_s (a build writes object files as it goes; one op takes about two minutes).
    """
    stale = []
    for lock in extensions_dir.glob("*/lock"):
        newest = max((f.stat().st_mtime for f in lock.parent.iterdir()), default=0)
        if time.time() - newest > idle_s:
            lock.unlink(missing_ok=True)
            stale.append(lock.parent)
    return stale


def deepspeed_config(cfg: TrainRunParams) -> dict[str, Any]:
    """The DeepSpeed config for `cfg`: ZeRO stage and offload, precision, batch, clipping, AdamW, schedule."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    warmup = {"warmup_num_steps": cfg.warmup_steps, "warmup_type": "linear"}
    # Warmup starts at lr / warmup_steps, not 0: a first step at lr 0 computes a batch and learns nothing.
    start = 1 / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.steps, "warmup_min_ratio": start, "cos_min_ratio": cfg.min_lr_ratio, **warmup}}
    elif cfg.lr_schedule == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": cfg.steps, "warmup_min_lr": cfg.lr * start, "warmup_max_lr": cfg.lr, **warmup}}
    else:
        scheduler = {"type": "WarmupLR", "params": {
            "warmup_min_lr": cfg.lr * start, "warmup_max_lr": cfg.lr, **warmup}}
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
        # Each node runs in its own checkout: its first rank writes the model states there too, so every node
        # can resume from its own disk (one node: the same files as without).
        "checkpoint": {"use_node_local_storage": ds.nnodes > 1},
    }


def build_model(job: TrainJob, cfg: TrainRunParams) -> Any:
    """Pretrain: a randomly initialised model from config, or (continued pretraining) the base's weights.
    Finetune: the base with a new or saved peft adapter.

    With kernels 'liger', Liger's kernels replace the model's RoPE, RMSNorm, SwiGLU and its
    loss (fused with the output layer, so the logits are never held), before peft wraps it.
    With qlora the base is loaded in 4-bit NF4 on this rank's GPU; its packed weights are
    stored as bf16 so that DeepSpeed's cast of the module to bf16 leaves them as they are.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    if job.mode == "pretrain":
        model = AutoModelForCausalLM.from_pretrained(job.model, use_safetensors=True, dtype=torch.float32) \
            if job.from_weights else AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(job.model),
                                                                      dtype=torch.float32)
        return with_checkpointing(with_kernels(model, job.kernels), cfg)
    from peft import PeftModel, get_peft_model

    assert isinstance(cfg, FinetuneParams)
    load: dict[str, Any] = {"dtype": torch.float32}
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        load = {"dtype": torch.bfloat16, "device_map": {"": torch.cuda.current_device()},
                "quantization_config": BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)}
    # safetensors only (pickle can run code); the parent verified the base and the adapter before launch
    base = with_kernels(AutoModelForCausalLM.from_pretrained(job.model, use_safetensors=True, **load), job.kernels)
    base = with_checkpointing(base, cfg)
    if cfg.adapter:
        return PeftModel.from_pretrained(base, cfg.adapter, is_trainable=True)
    return get_peft_model(base, METHODS[cfg.method].peft_config(cfg.method_params))


def with_checkpointing(model: Any, cfg: TrainRunParams) -> Any:
    """The model recomputing each layer's activations in the backward pass when cfg asks for it.

    Non-reentrant checkpointing, so a frozen base (LoRA) needs no inputs that require grad.
    """
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def with_kernels(model: Any, kernels: str) -> Any:
    """The model with Liger's kernels patched into this instance (kernels 'liger'); as it is otherwise."""
    if kernels == "liger":
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

        if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            raise RuntimeError(f"kernels: liger has no kernels for model type {model.config.model_type!r}; "
                               "set kernels: none or compile")
        _apply_liger_kernel_to_instance(model=model)
    return model


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model gets of a batch in training: no KV cache, and packed rows without their attention_mask.

    Packed rows carry position_ids that restart at each example; transformers keeps attention
    within each example only when it gets them with no attention_mask and no cache (it would
    otherwise let one packed example read the one before it).
    """
    if "position_ids" in batch:
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return {**batch, "use_cache": False}


def start_engine(model: Any, cfg: TrainRunParams, kernels: str) -> Any:
    """The DeepSpeed engine over the model's trainable parameters, its schedule at step 1, compiled for 'compile'."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=deepspeed_config(cfg))
    # from_pretrained hands the base over in eval mode, and DeepSpeed leaves the mode alone: a fine-tune would
    # run without activation checkpointing (transformers skips it outside training mode) and without dropout
    engine.train()
    # DeepSpeed's schedulers start before iteration 0, at lr 0: without this step 1 would learn nothing.
    # (A resumed run loads the scheduler's state from its checkpoint over this.)
    engine.lr_scheduler.step()
    if kernels == "compile":
        engine.compile()
    return engine


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
                on_step: Callable[..., None]) -> None:
    """Run optimizer steps start..steps-1; after each, on_step(step, mean loss, lr, global tokens, seconds, grad norm).

    The lr passed is the one the step ran with. The same loop serves pretraining, every
    fine-tuning method and the throughput benchmark.
    """
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    gas = engine.gradient_accumulation_steps()
    for step in range(start, steps):
        t0 = time.perf_counter()
        torch.manual_seed(seed * 1_000_003 + step * world + rank)
        lr = engine.get_lr()[0]  # engine.step() moves the scheduler on to the next step's lr
        loss_sum, tokens = 0.0, 0
        for micro in range(gas):
            batch = batches(step, micro)
            loss = engine(**model_inputs(batch)).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        # on the engine's device: NCCL, the GPU backend, has no CPU tensors
        stats = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=engine.device)
        dist.all_reduce(stats)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        on_step(step + 1, stats[0].item() / (gas * world), lr, int(stats[1].item()), time.perf_counter() - t0,
                grad_norm)


def eval_loss(engine: Any, tensors: dict[str, Any], micro_batch: int) -> float:
    """Token-weighted mean loss on held-out tensors, shared out over the ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters in
    each one), the last ones on an empty share when the examples run out.
    """
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    n = tensors["input_ids"].shape[0]
    rounds = -(-n // (micro_batch * world))
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    engine.eval()
    with torch.no_grad():
        for r in range(rounds):
            lo = (r * world + rank) * micro_batch
            idx = torch.arange(lo, min(lo + micro_batch, n)) if lo < n else torch.arange(0, 1)
            batch = {k: v[idx].to(engine.device) for k, v in tensors.items()}
            loss = engine(**model_inputs(batch)).loss
            counted = int((batch["labels"][:, 1:] != -100).sum()) if lo < n else 0
            if counted:
                total += torch.tensor([loss.item() * counted, counted], dtype=torch.float64, device=engine.device)
    engine.train()
    dist.all_reduce(total)
    return total[0].item() / max(total[1].item(), 1)


class Stopped(Exception):
    """An expected failure, explained in one line: rank 0 leaves it for the launcher."""


class Diverged(Stopped):
    """The loss or the gradient norm left the range of a model that is learning."""


def check_finite(step: int, loss: float, grad_norm: float | None, first_loss: float, vocab_size: int,
                 cfg: TrainRunParams, mode: str) -> None:
    """Stop a run whose loss is not finite, or above twice both a uniform guess and its own first loss.

    ln(vocab) is the loss of a uniform guess, about where a model starts from scratch; a
    fine-tuning run may start above it (a base that is confidently wrong on a new format).
    No model that is learning goes above twice the larger of the two. Every rank sees the
    same all-reduced loss and global grad norm, so every rank stops at the same step.
    """
    uniform = math.log(vocab_size)
    bound = 2 * max(uniform, first_loss)
    norm = f", grad norm {grad_norm:.3g}" if grad_norm is not None else ""
    if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)) or loss > bound:
        raise Diverged(
            f"training diverged at step {step}: loss {loss:.4g}{norm}, above {bound:.3g} (twice the larger of a "
            f"uniform guess over {vocab_size} tokens, {uniform:.3g}, and the first loss, {first_loss:.3g}); "
            f"nothing was published. Lower train.{mode}.lr (now {cfg.lr:g}), raise "
            f"warmup_steps (now {cfg.warmup_steps}) or set grad_clip (now {cfg.grad_clip:g})")


def _resume(engine: Any, job: TrainJob, finetune: bool) -> int:
    import torch
    import torch.distributed as dist

    # Each node's launcher picked the latest complete checkpoint in its own checkout: they must agree.
    start = checkpoints.step_of(job.resume_from) if job.resume_from else 0
    bounds = torch.tensor([start, -start], device=engine.device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    latest, earliest = int(bounds[0]), -int(bounds[1])
    if latest != earliest:
        raise Stopped(f"the nodes would resume from different checkpoints (steps {earliest} and {latest}): "
                      "a node stopped while others saved. Delete the newer one "
                      f"(checkpoints/train/{job.mode}/checkpoints/{checkpoints.name(latest)}) on the nodes that have "
                      "it, then run again")
    if not job.resume_from:
        return 0
    # fine-tuning checkpoints hold only the trainable (adapter) weights; the frozen base comes from the base model.
    # Every file DeepSpeed unpickles goes through its checkpoint engine's load: there, its bytes are checked first
    deepspeeds, engine.checkpoint_engine.load = engine.checkpoint_engine.load, checkpoints.loader(
        job.ckpt_dir, job.resume_from)
    try:
        loaded, _ = engine.load_checkpoint(job.ckpt_dir, tag=job.resume_from, load_module_strict=not finetune)
    except checkpoints.Tampered as exc:
        raise Stopped(str(exc)) from None
    finally:
        engine.checkpoint_engine.load = deepspeeds
    if loaded is None:
        raise RuntimeError(f"checkpoint {job.resume_from} could not be loaded")
    return checkpoints.step_of(job.resume_from)


def _save_checkpoint(engine: Any, job: TrainJob, cfg: TrainRunParams, step: int, loss: float, finetune: bool) -> None:
    import torch.distributed as dist

    engine.save_checkpoint(job.ckpt_dir, tag=checkpoints.partial_name(step), save_latest=False,
                           exclude_frozen_parameters=finetune)
    dist.barrier()  # every rank's shard is on disk before the checkpoint is declared complete
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # each node declares its own checkout's copy
        checkpoints.commit(job.ckpt_dir, step, job.fingerprint, cfg.keep_checkpoints, {"loss": loss})
    dist.barrier()


def _log_writer(path: Path, start: int) -> tuple[Any, float]:
    """Append rows to the CSV log, first dropping rows after `start` (left by a run that was killed later).

    Returns the open log and the training time its kept rows already account for.
    """
    rows = []
    if start and path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return open(path, "a", newline=""), float(rows[-1]["elapsed_s"]) if rows else 0.0


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


def _stop(exc: Stopped, job: TrainJob, rank: int) -> int:
    """An expected failure: rank 0 leaves its reason for the launcher, and every rank exits 0, because
    torchrun turns any non-zero worker exit into a ChildFailedError traceback the user need not see."""
    import torch.distributed as dist

    if rank == 0:
        Path(job.out_dir, FAILURE).write_text(json.dumps({"error": str(exc)}))
    dist.destroy_process_group()
    return 0


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _ask_for_the_cpu_once() -> None:
    """DeepSpeed asks py-cpuinfo what the CPU is in its op loader and again in its CPU Adam, and each ask starts a
    Python interpreter that probes the CPU (about a second of CPU time): the first answer is kept for the process."""
    import functools

    import cpuinfo

    cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


def main(argv: list[str]) -> int:
    # torchrun starts every worker in a session of its own: without this, killing the launcher's (or the stage's)
    # process group would leave workers training on, writing into the checkpoints a re-run resumes from
    die_with_parent()
    job = TrainJob.model_validate_json(Path(argv[0]).read_text())
    os.environ.update(sanitized_env())
    ops = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if os.environ.get("RANK", "0") == "0" and not any(ops.glob("*/*.so")):
        # the build is silent for minutes: say why nothing moves
        print(f"train@{job.mode}: DeepSpeed builds its C++ ops once for this environment (about 2 minutes on "
              f"2 CPU cores) into {ops}", flush=True)
    _ask_for_the_cpu_once()
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
    name = f"train@{job.mode}"

    model = build_model(job, cfg)
    vocab = model.config.vocab_size
    engine = start_engine(model, cfg, job.kernels)
    batches = Batches(load_file(job.data), cfg, world)
    held_out = load_file(job.eval_data) if job.eval_data else None
    try:
        start = _resume(engine, job, finetune)
    except Stopped as exc:
        return _stop(exc, job, rank)
    if rank == 0:
        print(f"{name}: {'resumed from step ' + str(start) if start else 'starting at step 0'} "
              f"of {cfg.steps}, {world} process(es), ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}",
              flush=True)

    log, elapsed_before = _log_writer(Path(job.log_file), start) if rank == 0 else (None, 0.0)
    writer = csv.DictWriter(log, LOG_COLUMNS) if log else None
    elapsed, last_print = 0.0, time.monotonic()  # this process's training time: the ETA's base
    every = max(1, cfg.steps // 20)

    first_loss: float | None = None

    def on_step(step: int, loss: float, lr: float, tokens: int, seconds: float, grad_norm: float | None) -> None:
        nonlocal elapsed, last_print, first_loss
        elapsed += seconds
        first_loss = loss if first_loss is None else first_loss
        check_finite(step, loss, grad_norm, first_loss, vocab, cfg, job.mode)
        evaluated = held_out is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps)
        held = eval_loss(engine, held_out, cfg.micro_batch) if evaluated else None
        if writer:
            writer.writerow({"step": step, "loss": f"{loss:.6f}", "eval_loss": "" if held is None else f"{held:.6f}",
                             "grad_norm": "" if grad_norm is None else f"{grad_norm:.6g}", "lr": f"{lr:.6g}",
                             "tokens_per_s": f"{tokens / seconds:.1f}", "elapsed_s": f"{elapsed_before + elapsed:.3f}"})
            log.flush()
            # a line every 5% of the run, and at least every 30 s: progress a person can follow
            if step % every == 0 or step == cfg.steps or held is not None or time.monotonic() - last_print > 30:
                last_print = time.monotonic()
                eta = elapsed / (step - start) * (cfg.steps - step)
                print(f"{name}: step {step}/{cfg.steps} loss {loss:.4f}"
                      + (f" eval_loss {held:.4f}" if held is not None else "")
                      + (f" grad_norm {grad_norm:.3g}" if grad_norm is not None else "")
                      + f" lr {lr:.3g} {tokens / seconds:,.0f} tokens/s ETA {_format_eta(eta)}", flush=True)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save_checkpoint(engine, job, cfg, step, loss, finetune)

    device = engine.device
    try:
        train_steps(engine, lambda step, micro: batches(step, micro, rank, device), start, cfg.steps, cfg.seed,
                    on_step)
    except Stopped as exc:
        return _stop(exc, job, rank)
    finally:
        if log:
            log.close()
    _save_final(engine, job.out_dir, cfg.deepspeed.zero_stage)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
