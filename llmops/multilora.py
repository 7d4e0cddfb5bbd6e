"""Many LoRA adapters on one base model, mixed token by token inside continuous batching.

transformers' continuous batching packs every request of a forward pass into one row of tokens,
so peft's mixed-adapter batching (`adapter_names=`, one name per batch row) cannot see which
request a token belongs to, and the batching manager uses only the active adapter. Here the
adapters are loaded by peft (its key mapping, scaling and checks) but its own adapter path is
switched off; a forward hook on each LoRA layer adds, for each adapter, its update to the tokens
of the requests that asked for it. Before each forward pass the engine hands `plan()` the layout
of the pass (which request owns which span of tokens), so the grouping is computed once per
pass, not once per layer as peft's `_mixed_batch_forward` would (it groups by a Python list each
time). Tokens of a request for the base model get no update. A request's answer is the answer of
its adapter served alone: tests/test_multilora.py checks it.

Loading and unloading happen between forward passes (the engine holds `lock` around each).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from llmops.errors import LlmopsError
from llmops.modeling import ModelError, verify_model_dir


class AdapterError(LlmopsError):
    """An adapter that cannot be served on this base; what is served now is unchanged."""


class MixedLora:
    """The LoRA adapters served on `model` (a transformers causal LM), by name."""

    def __init__(self, model: Any) -> None:
        self.model = model  # the base; peft injects its LoRA layers into it, in place
        self.peft = None  # the PeftModel around it, once an adapter is loaded
        self.lock = threading.Lock()
        self._plan: dict[str, Any] = {}  # adapter name -> index tensor of its tokens in this forward pass
        self._hooked: set[int] = set()

    @property
    def names(self) -> list[str]:
        return sorted(self.peft.peft_config) if self.peft is not None else []

    def load(self, name: str, adapter_dir: str | os.PathLike) -> None:
        """Load the LoRA adapter in `adapter_dir` as `name` (replacing one of that name).

        Raises:
            AdapterError: not a plain LoRA adapter, or its shapes do not fit this base (another base's adapter).
        """
        from peft import PeftConfig, PeftModel
        from peft.tuners.lora import LoraLayer

        adapter_dir = Path(adapter_dir)
        try:
            verify_model_dir(adapter_dir)
            config = PeftConfig.from_pretrained(str(adapter_dir))
        except (ModelError, OSError, ValueError) as exc:
            raise AdapterError(f"adapter {name!r} ({adapter_dir}): {exc}") from None
        if config.peft_type != "LORA":
            # a prompt-tuning adapter changes the input sequence itself, which a shared batch cannot do per request
            raise AdapterError(f"adapter {name!r} is {config.peft_type.value.lower()}; only LoRA adapters share a "
                               "base (serve a prompt-tuning version on its own)")
        if getattr(config, "use_dora", False) or config.modules_to_save or config.bias != "none":
            raise AdapterError(f"adapter {name!r}: DoRA, modules_to_save and LoRA biases change the base itself; "
                               "only plain LoRA adapters share a base")
        with self.lock:
            if name in self.names:
                self._delete(name)
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name)
                else:
                    self.peft.load_adapter(str(adapter_dir), adapter_name=name)
            except (OSError, ValueError, RuntimeError) as exc:  # a size mismatch: the adapter was trained on another base
                if self.peft is not None and name in self.peft.peft_config:
                    self._delete(name)
                raise AdapterError(f"adapter {name!r} does not fit this base: {str(exc).splitlines()[0][:300]}") \
                    from None
            self.peft.base_model.disable_adapter_layers()  # peft's own path off: the hook adds the updates
            for module in self.model.modules():
                if isinstance(module, LoraLayer) and id(module) not in self._hooked:
                    module.register_forward_hook(self._add_updates)
                    self._hooked.add(id(module))

    def unload(self, name: str) -> None:
        with self.lock:
            if name in self.names:
                self._delete(name)

    def _delete(self, name: str) -> None:
        self.peft.delete_adapter(name)
        self.peft.base_model.disable_adapter_layers()

    def plan(self, spans: list[tuple[str | None, int, int]], device: Any) -> None:
        """The next forward pass: each request's adapter (None: the base) and its tokens [start, end)."""
        import torch

        groups: dict[str, list[int]] = {}
        for name, start, end in spans:
            if name is not None:
                groups.setdefault(name, []).extend(range(start, end))
        self._plan = {name: torch.tensor(ix, device=device) for name, ix in groups.items()}

    def _add_updates(self, module: Any, args: tuple, output: Any) -> Any:
        if not self._plan:
            return output
        x = args[0].reshape(-1, args[0].shape[-1])
        flat = output.view(-1, output.shape[-1])
        for name, index in self._plan.items():
            if name in module.lora_A:  # an adapter may leave some layers alone
                update = module.lora_B[name](module.lora_A[name](x.index_select(0, index).to(
                    module.lora_A[name].weight.dtype))) * module.scaling[name]
                flat.index_add_(0, index, update.to(flat.dtype))
        return output

