"""Parameter-efficient fine-tuning methods, registered by name (as peft's own method registry).

Each method has a params model (a section of `train.finetune` in params.yaml) and
a function turning it into a peft config. Adding a method is one registration;
the training core never branches on the method's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field


class LoraParams(BaseModel):
    """LoRA: low-rank updates W + (alpha / r) * B @ A on the target linear layers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    r: int = Field(8, ge=1, le=65_536, description="rank of the update")
    alpha: float = Field(16, gt=0, description="scale numerator: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        "all-linear", description="the layers to adapt: all-linear (every linear layer but the output one, whatever "
        "the architecture calls them; GPT-2's Conv1D included), null (peft's default for the architecture, e.g. "
        "q_proj and v_proj on Llama, c_attn on GPT-2), or a list of layer names (last path component)",
    )


class PromptTuningParams(BaseModel):
    """Prompt tuning: trainable virtual-token embeddings prepended to every input; the model stays frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    num_virtual_tokens: int = Field(16, ge=1, le=65_536)


def _lora(p: LoraParams) -> Any:
    from peft import LoraConfig

    targets = list(p.target_modules) if isinstance(p.target_modules, list) else p.target_modules
    return LoraConfig(task_type="CAUSAL_LM", r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets)


def _prompt_tuning(p: PromptTuningParams) -> Any:
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens)


@dataclass(frozen=True)
class Method:
    params: type[BaseModel]
    peft_config: Callable[[Any], Any]
    peft_type: str  # as written in adapter_config.json
    prompt_learning: bool = False  # virtual tokens before each sequence (so a sequence holds one example)


METHODS: dict[str, Method] = {}


def register(name: str, method: Method) -> None:
    METHODS[name] = method


register("lora", Method(LoraParams, _lora, "LORA"))
register("prompt_tuning", Method(PromptTuningParams, _prompt_tuning, "PROMPT_TUNING", prompt_learning=True))
