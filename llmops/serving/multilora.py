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

from llmops.core.errors import LlmopsError
from llmops.training.modeling import ModelError, verify_model_dir


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
        self.dirs: dict[str, Path] = {}  # adapter name -> the directory it was loaded from

    @property
    def names(self) -> list[str]:
        return sorted(self.dirs)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")  # peft's name for it: a torch module name cannot hold dots (v2.0.0)

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
        self._check_fits(name, adapter_dir)  # before peft changes the model: a failed injection cannot be undone
        key = self._key(name)
        with self.lock:
            if name in self.names:
                self._delete(name)
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=key)
                else:
                    self.peft.load_adapter(str(adapter_dir), adapter_name=key)
            except (OSError, ValueError, RuntimeError) as exc:
                if self.peft is not None and key in self.peft.peft_config:
                    self.peft.delete_adapter(key)
                    self.peft.base_model.disable_adapter_layers()
                raise AdapterError(f"adapter {name!r} does not fit this base: {str(exc).splitlines()[0][:300]}") \
                    from None
            self.peft.base_model.disable_adapter_layers()  # peft's own path off: the hook adds the updates
            self.dirs[name] = adapter_dir
            for module in self.model.modules():
                if isinstance(module, LoraLayer) and id(module) not in self._hooked:
                    module.register_forward_hook(self._add_updates)
                    self._hooked.add(id(module))

    def _check_fits(self, name: str, adapter_dir: Path) -> None:
        """Every LoRA matrix of the adapter sits on a linear layer of this base with the shapes it expects."""
        import torch
        from safetensors import safe_open

        try:
            with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as weights:
                shapes = {k: weights.get_slice(k).get_shape() for k in weights.keys()}
        except (OSError, ValueError, RuntimeError) as exc:
            raise AdapterError(f"adapter {name!r}: adapter_model.safetensors cannot be read: {exc}") from None
        for key, shape in shapes.items():
            path, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            try:
                layer = self.model.get_submodule(path)
            except AttributeError:
                raise AdapterError(f"adapter {name!r} does not fit this base: it has no layer {path}") from None
            layer = getattr(layer, "base_layer", layer)  # already wrapped by an adapter loaded before
            # lora_A is (rank, in), lora_B (out, rank)
            want = (shape[0], layer.in_features) if kind.startswith("A") else (layer.out_features, shape[1])
            if not isinstance(layer, torch.nn.Linear) or tuple(shape) != want:
                raise AdapterError(f"adapter {name!r} does not fit this base: {key} is {tuple(shape)}, the base's "
                                   f"{path} takes {want} (an adapter trained on another base)")

    def unload(self, name: str) -> None:
        with self.lock:
            if name in self.names:
                self._delete(name)

    def _delete(self, name: str) -> None:
        self.peft.delete_adapter(self._key(name))
        self.dirs.pop(name, None)
        self.peft.base_model.disable_adapter_layers()

    def plan(self, spans: list[tuple[str | None, int, int]], device: Any) -> None:
        """The next forward pass: each request's adapter (None: the base) and its tokens [start, end)."""
        import torch

        groups: dict[str, list[int]] = {}
        for name, start, end in spans:
            if name is not None:
                groups.setdefault(self._key(name), []).extend(range(start, end))
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

