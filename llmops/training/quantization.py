"""Weight quantization methods: name -> the transformers quantization config that does it, and where it runs.

Each method quantizes at load time (`from_pretrained(..., quantization_config=...)`), saves with
`save_pretrained` to safetensors only, and reloads with a plain
`AutoModelForCausalLM.from_pretrained(dir, use_safetensors=True)` (the config is stored in
config.json). Checked on CPU (torch 2.13, transformers 5.24): torchao 0.18 int8 weight-only and
bitsandbytes 0.50 nf4. torchao's int4 weight-only needs a CUDA GPU; its CPU prototype cannot be
saved, and optimum-quanto cannot save at all, so neither is offered on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from llmops.core.config import ConfigError


def _torchao_int8() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def _torchao_int4() -> Any:
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import TorchAoConfig

    # tile-packed for torch's own tinygemm kernel; the default "plain" format needs the separate mslk package
    return TorchAoConfig(quant_type=Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))


def _torchao_fp8() -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def _bnb_nf4() -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@dataclass(frozen=True)
class Method:
    library: str
    what: str
    config: Callable[[], Any]
    needs_cuda: bool = False
    # the layer classes it converts: torchao's quantize_ swaps nn.Linear weights only; transformers' bitsandbytes
    # integration also converts GPT-2's Conv1D (a linear layer with its weight transposed)
    layers: tuple[str, ...] = ("Linear",)


METHODS: dict[str, Method] = {
    "int8_weight_only": Method("torchao", "int8 weights, per-channel scales; activations stay float", _torchao_int8),
    "nf4": Method("bitsandbytes", "4-bit NormalFloat weights in blocks of 64, float compute", _bnb_nf4,
                  layers=("Linear", "Conv1D")),
    "int4_weight_only": Method("torchao", "int4 weights, groups of 128 (tinygemm kernels)", _torchao_int4,
                               needs_cuda=True),
    "fp8": Method("torchao", "float8 weights and activations, per-row scales (Hopper or newer)", _torchao_fp8,
                  needs_cuda=True),
}


def _layers(model: Any) -> dict[str, str]:
    """The model's linear layers (nn.Linear and GPT-2's Conv1D) but its output layer: name -> class name."""
    import torch

    out = model.get_output_embeddings()
    return {name: type(m).__name__ for name, m in model.named_modules()
            if m is not out and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")}


def check_architecture(methods: list[str], model: Any) -> None:
    """Refuse, before any training, a method that would quantize no layer of this architecture (e.g. torchao's,
    which convert nn.Linear only, on GPT-2, whose layers are Conv1D): it would ship the float model as quantized.

    Args:
        model: the model, or an empty copy of it (on the meta device).

    Raises:
        ConfigError: naming the method, the layers it converts and the ones the model has.
    """
    layers = _layers(model)
    for name in methods:
        if not any(kind in METHODS[name].layers for kind in layers.values()):
            raise ConfigError(
                f"quantize.methods: {name} ({METHODS[name].library}) converts {'/'.join(METHODS[name].layers)} layers "
                f"and this {model.config.model_type} model has none (its linear layers are "
                f"{', '.join(sorted(set(layers.values()))) or 'none'}): it would change nothing. Remove it from "
                "quantize.methods" + ("" if name == "nf4" else " (nf4 converts Conv1D too)"))


def quantized(model: Any) -> tuple[int, int]:
    """(layers whose weight is now a quantized tensor, linear layers), the output layer left out."""
    import torch

    modules = dict(model.named_modules())
    names = _layers(model)
    done = sum(type(modules[n].weight) not in (torch.Tensor, torch.nn.Parameter) for n in names)
    return done, len(names)


def check_runnable(methods: list[str]) -> None:
    """Refuse, before any work, a method this machine cannot run.

    Raises:
        ConfigError: naming the method and the key, and what runs here instead.
    """
    gpu_only = [m for m in methods if METHODS[m].needs_cuda]
    if not gpu_only:
        return
    import torch  # only asked when it matters: importing torch costs seconds before a run starts

    if not torch.cuda.is_available():
        here = ", ".join(m for m, spec in METHODS.items() if not spec.needs_cuda)
        raise ConfigError(f"quantize.methods: {', '.join(gpu_only)} needs a CUDA GPU and this machine has none; "
                          f"methods that run on CPU: {here}")


def quantize(src: str, method: str, device: str, dtype: Any = None) -> Any:
    """The model in `src` (a float model directory) loaded with `method`'s weight quantization, in eval mode.

    `dtype` is the compute dtype of what stays float (default float32; bfloat16 on a GPU).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from llmops.training.modeling import safe_4bit_on_cpu

    return safe_4bit_on_cpu(AutoModelForCausalLM.from_pretrained(
        src, quantization_config=METHODS[method].config(), device_map=device, dtype=dtype or torch.float32,
        use_safetensors=True,
    )).eval()
