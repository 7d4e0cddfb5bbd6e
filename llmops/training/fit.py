"""Will this training configuration fit? Checked before launch, with ZeRO's bytes-per-parameter arithmetic.

Per process, for Psi parameters of which Psi_t are trainable, N processes
(Rajbhandari et al., "ZeRO", 2020, section 5; DeepSpeed's estimate_zero*_model_states_mem_needs):

    bf16 mixed precision: weights 2 Psi, gradients 2 Psi_t, optimizer 12 Psi_t (fp32 master + Adam m, v)
    fp32:                 weights 4 Psi, gradients 4 Psi_t, optimizer  8 Psi_t (Adam m, v)

    ZeRO-1 divides the optimizer states by N, ZeRO-2 also the gradients, ZeRO-3 also the weights.
    Offloading moves the optimizer states (and, with ZeRO-3, the weights) to CPU memory.

Activations per micro-batch b, sequence s, hidden h, heads a, L layers, without
recomputation (Korthikanti et al., "Reducing Activation Recomputation", 2022):
s * b * h * (34 + 5 a s / h) bytes per layer in 16-bit (twice that in fp32),
plus the logits and their gradient: 2 * b * s * vocab * 4 bytes. On a GPU, SDPA's fused
attention kernels never hold the a * s * s scores (the 5 a s / h term goes), and Liger's
loss fused with the output layer never holds the logits (kernels: liger).
A 10% margin covers the allocator, the communication buffers and the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmops.core.config import TrainRunParams
from llmops.core.errors import LlmopsError
from llmops.training.modeling import ParamCount

GIB = 1 << 30
MARGIN = 1.10


class FitError(LlmopsError):
    """The configuration cannot fit on the devices present; the message has the numbers and what to change."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    vocab: int


@dataclass(frozen=True)
class Devices:
    kind: str  # "cuda" or "cpu"
    count: int  # GPUs; for CPU, 1 (all ranks share host memory)
    bytes_each: int
    host_bytes: int  # CPU memory available for offloaded state


@dataclass(frozen=True)
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    host: float  # offloaded to CPU memory, all processes together

    @property
    def device(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations) * MARGIN


def estimate(params: ParamCount, shape: Shape, cfg: TrainRunParams, micro_batch: int | None = None,
             zero_stage: int | None = None, offload_optimizer: bool | None = None,
             offload_params: bool | None = None, kernels: str = "none", fused_attention: bool = False) -> Estimate:
    """Bytes per training process for `cfg` (keyword arguments try alternatives to it)."""
    ds = cfg.deepspeed
    stage = ds.zero_stage if zero_stage is None else zero_stage
    off_opt = ds.offload_optimizer if offload_optimizer is None else offload_optimizer
    off_par = ds.offload_params if offload_params is None else offload_params
    b = cfg.micro_batch if micro_batch is None else micro_batch
    n = ds.num_procs
    bf16 = ds.precision == "bf16"
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if bf16 else (4, 4, 8)

    weights = w_bytes * params.total / (n if stage >= 3 else 1)
    gradients = g_bytes * params.trainable / (n if stage >= 2 else 1)
    optimizer = o_bytes * params.trainable / (n if stage >= 1 else 1)
    s, h = cfg.max_seq_len, shape.hidden
    scores = 0 if fused_attention else 5 * shape.heads * s / h
    per_layer = s * b * h * (34 + scores) * (1 if bf16 else 2)
    activations = per_layer * shape.layers + (0 if kernels == "liger" else 2 * b * s * shape.vocab * 4)
    host = 0.0
    if off_opt:
        host += optimizer * n
        optimizer = 0.0
    if off_par:
        host += weights * n
        weights = 0.0
    return Estimate(weights, gradients, optimizer, activations, host)


def devices(num_procs: int) -> Devices:
    """The memory of the devices this machine has: its GPUs, or else its CPU memory."""
    import psutil
    import torch

    host = psutil.virtual_memory().available
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        each = min(torch.cuda.mem_get_info(i)[0] for i in range(count))
        return Devices("cuda", count, each, host)
    # CPU ranks share one pool: each gets its share (offloaded state comes out of the same pool)
    return Devices("cpu", 1, host // max(num_procs, 1), host)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def describe(e: Estimate) -> str:
    parts = f"weights {_gib(e.weights)}, gradients {_gib(e.gradients)}, optimizer {_gib(e.optimizer)}, " \
            f"activations {_gib(e.activations)}"
    return f"{_gib(e.device)} per process ({parts}, +10% margin)"


def _fits(e: Estimate, dev: Devices, num_procs: int) -> bool:
    if dev.kind == "cpu":  # offloaded state comes out of the same memory the ranks share
        return e.device + e.host / num_procs <= dev.bytes_each
    return e.device <= dev.bytes_each and e.host <= dev.host_bytes


def check_fit(params: ParamCount, shape: Shape, cfg: TrainRunParams, dev: Devices, finetune: bool,
              kernels: str = "none") -> Estimate:
    """Refuse before launch a configuration that cannot fit (kernels: as resolved for this machine).

    Raises:
        FitError: too few GPUs for num_procs, or too little memory, with suggestions that would fit.
    """
    ds = cfg.deepspeed
    if dev.kind == "cuda" and ds.num_procs > dev.count:
        raise FitError(f"deepspeed.num_procs is {ds.num_procs} but this machine has {dev.count} GPU(s)")
    how = {"kernels": kernels, "fused_attention": dev.kind == "cuda"}
    e = estimate(params, shape, cfg, **how)
    if _fits(e, dev, ds.num_procs):
        return e
    where = f"{dev.count} x {dev.kind.upper()} with {_gib(dev.bytes_each)} free each" if dev.kind == "cuda" \
        else f"CPU memory: {_gib(dev.bytes_each)} available per process"
    need = describe(e) + (f"; {_gib(e.host)} offloaded to CPU memory" if e.host else "")
    raise FitError(
        f"this configuration does not fit: it needs {need}; the machine has {where} "
        f"({params.total:,} parameters, {params.trainable:,} trainable). "
        f"{_suggest(params, shape, cfg, dev, finetune, how)}"
    )


def _suggest(params: ParamCount, shape: Shape, cfg: TrainRunParams, dev: Devices, finetune: bool,
             how: dict) -> str:
    ds = cfg.deepspeed
    tries: list[tuple[str, dict]] = []
    if ds.zero_stage < 3:
        tries.append(("zero_stage: 3", {"zero_stage": 3}))
    if not ds.offload_optimizer:
        tries.append(("offload_optimizer: true", {"zero_stage": max(ds.zero_stage, 1), "offload_optimizer": True}))
    tries.append(("zero_stage: 3 with offload_optimizer and offload_params",
                  {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}))
    if cfg.micro_batch > 1:
        tries.append((f"micro_batch: 1 (grad_accum: {cfg.grad_accum * cfg.micro_batch} keeps the batch)",
                      {"micro_batch": 1}))
    fits = []
    for label, alt in tries:
        e = estimate(params, shape, cfg, **alt, **how)
        if _fits(e, dev, ds.num_procs):
            fits.append(f"{label} ({_gib(e.device)} per process)")
    hints = []
    if fits:
        hints.append("These would fit: " + "; ".join(fits) + ".")
    else:
        hints.append("No ZeRO stage, offload or micro_batch setting fits on these devices.")
    if not finetune:
        hints.append("A smaller model, or fine-tuning an existing one with LoRA, trains far fewer parameters.")
    elif ds.num_procs < max(dev.count, 1) and dev.kind == "cuda":
        hints.append(f"More processes (num_procs up to {dev.count}) divide the sharded states further.")
    return " ".join(hints)
