"""Generation for the server: one loaded model, transformers' continuous batching, results on the asyncio loop.

Requests share forward passes: transformers' ContinuousBatchingManager schedules them (a new
request joins the batch while others decode; a finished one leaves at once), not a batcher of
ours. Its paged KV cache is sized from the server's concurrency and the model's context: the
default takes 60% of free memory and is very slow on CPU. Sampling parameters are per request
(`per_request_processors`); temperature 0 is greedy (top-k 1), and gives what `generate()` gives.
"""

from __future__ import annotations

import asyncio
import math
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.core.errors import LlmopsError
from llmops.evaluation.inference import compute_dtype
from llmops.serving.multilora import AdapterError, MixedLora
from llmops.training.modeling import load_causal_lm, load_tokenizer, verify_model_dir

PAGE_SIZE = 16  # tokens per KV-cache page
GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding
_FREE_MARGIN = 0.85  # the scheduler keeps ~15% of the cache free for decoding


class EngineError(LlmopsError):
    """Generation cannot be done: the request failed inside the engine (which may have died with it)."""


class EngineUnavailable(EngineError):
    """The request was not taken: the engine is not running (stopped, or restarting after a failure), or its adapter
    is no longer loaded. Nothing of it ran, so sending it again, later or elsewhere, is safe."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks, load tests)


@dataclass
class Stats:
    """What the scheduler holds now (for the server's gauges)."""
    running: int
    waiting: int


class Engine:
    """A model directory (safetensors only) served with continuous batching; start() before use, stop() after."""

    def __init__(self, model_dir: str | os.PathLike, max_concurrency: int = 16, adapters: bool = False,
                 tokenizer_dir: str | os.PathLike | None = None, device: str | None = None,
                 max_context: int | None = None):
        """`adapters`: serve LoRA adapters on this model (see multilora; `add_adapter`); `tokenizer_dir`: the tokenizer
        to use, when not the model's own (a release's, which carries the chat template); `device`: cpu or cuda
        (default: a GPU when there is one); `max_context`: fewer tokens per request than the model takes (its KV
        cache shrinks with it: a replica with little memory).

        Raises:
            EngineError: `device` is cuda on a machine without one, or an unknown device.
        """
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if device not in (None, "cpu", "cuda"):
            raise EngineError(f"unknown device {device!r}: cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda: this machine has no CUDA GPU that torch can use "
                              "(torch.cuda.is_available() is false)")
        cuda = device == "cuda" or (device is None and torch.cuda.is_available())
        verify_model_dir(model_dir)  # ModelError: a pickle, a missing or changed weights file
        self.model_dir = Path(model_dir)
        self.tokenizer_dir = Path(tokenizer_dir or model_dir)
        self.tokenizer = load_tokenizer(str(self.tokenizer_dir))
        # hardware-aware: a GPU when there is one, in its compute dtype
        self.model = load_causal_lm(str(model_dir), dtype=compute_dtype("cuda" if cuda else "cpu"))
        self.model = self.model.to("cuda" if cuda else "cpu").eval()
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        if max_context is not None:
            self.context = min(self.context, max_context)
        self.hardware = _hardware(cuda)
        self.variant = _variant(self.model_dir, self.model)
        self.vocab = int(self.model.config.vocab_size)
        # do_sample with all three processors present (transformers makes one only for a non-neutral default),
        # so that each request sets its own values; every request passes all three
        generation = GenerationConfig(do_sample=True, temperature=0.7, top_k=self.vocab, top_p=0.95,
                                      eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        cache = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=math.ceil(max_concurrency * self.context / PAGE_SIZE / _FREE_MARGIN),
            max_batch_tokens=max(self.context, 256), max_requests_per_batch=max_concurrency,
            # CUDA graphs replay a step's kernels without launching each from Python: on an H200 a ~300M model's
            # decode step went from 64 ms to 11 ms (benchmarks/serve_throughput.py); there is nothing to replay on CPU
            # (the adapters' per-token updates index different tokens each pass: nothing a graph could replay)
            per_request_processors=True, auto_switch_to_flash=False, use_cuda_graph=cuda and not adapters,
            use_async_batching=False,
            # a prompt's cached KV pages are shared with later requests starting with the same tokens (prefix
            # caching), keyed by the tokens alone: with adapters, a page holds one adapter's keys and values, and
            # another adapter's request must not read it (a test saw the wrong answers)
            allow_block_sharing=not adapters,
        )
        self.manager = self.model.init_continuous_batching(generation_config=generation,
                                                           continuous_batching_config=cache)
        self.max_concurrency = max_concurrency
        self.active = 0  # requests being generated (a reload stops this engine when it reaches 0)
        self.lora = MixedLora(self.model) if adapters else None
        self._adapter_of: dict[str, str | None] = {}  # request id -> its adapter (None: the model itself)
        self.using: Counter[str] = Counter()  # adapter -> its requests in flight
        self.on_step: Callable[[int], None] | None = None  # hears each forward pass's number of requests
        step = self.manager._generation_step

        def counted_step() -> None:
            # the manager's step is the one place a forward pass's batch is known (transformers has no hook for
            # it; its version is pinned in requirements.lock): the adapters' token layout and the server's
            # batch-size histogram are taken from here
            batch = self.manager.batch_processor.inputs_and_outputs
            if self.lora is None:
                step()
            else:
                spans, start = [], 0
                for state in batch.requests_in_batch:  # in the order their tokens are packed (cumulative_seqlens_q)
                    spans.append((self._adapter_of.get(state.state.request_id), start, start + state.query_length))
                    start += state.query_length
                with self.lora.lock:
                    self.lora.plan(spans, self.model.device)
                    step()
            if self.on_step is not None:
                self.on_step(batch.num_request_in_batch)

        self.manager._generation_step = counted_step
        self._stopped = False

    def start(self) -> None:
        self.manager.start()

    def stop(self, timeout: float = 30) -> None:
        """Finish what is in flight (up to `timeout` s), then stop the batching thread."""
        self._stopped = True
        self.manager.stop(block=True, timeout=timeout)

    @property
    def failure(self) -> BaseException | None:
        """Why the generation loop died once its thread is gone (it fails every request it held), else None: it
        runs, it is still exiting, or it was stopped on purpose."""
        if self._stopped or self.manager.is_running():
            return None
        status = self.manager.background_thread_status
        return status.fatal_error or EngineError("the generation thread exited")

    def restart(self) -> None:
        """Start a new generation loop after `failure` (the model and its adapters stay loaded; the KV cache is
        made anew): transformers' manager can be started again once its thread has exited."""
        self.manager.start()

    async def drain(self, timeout: float = 600) -> None:
        """Wait until the requests in flight are done (or `timeout` s)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    @property
    def healthy(self) -> bool:
        status = getattr(self.manager, "background_thread_status", None)
        return self.manager.is_running() and getattr(status, "fatal_error", None) is None

    def stats(self) -> Stats:
        processor = self.manager.batch_processor  # None until the batching thread built it
        if processor is None:
            return Stats(0, self.manager.input_queue.qsize())
        scheduler = processor.scheduler
        return Stats(len(scheduler.active_requests), len(scheduler.waiting_requests) + self.manager.input_queue.qsize())

    async def add_adapter(self, name: str, adapter_dir: str | os.PathLike) -> None:
        """Serve the LoRA adapter in `adapter_dir` as `name` (between two forward passes; see multilora).

        Raises:
            AdapterError: it cannot be served on this model; nothing changed.
        """
        if self.lora is None:
            raise AdapterError("this engine serves one model; start it with adapters=True to serve adapters")
        await asyncio.to_thread(self.lora.load, name, adapter_dir)

    async def remove_adapter(self, name: str, timeout: float = 600) -> None:
        """Unload adapter `name` once its requests in flight are done (new ones must not be sent to it any more)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.using[name] and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.lora.unload, name)

    async def generate(self, prompt_ids: list[int], sampling: Sampling,
                       adapter: str | None = None) -> AsyncIterator[list[int]]:
        """The new token ids as they are generated (end-of-text included when the model stops), from the model or,
        with `adapter`, from that adapter on it.

        Leaving the iteration early (a client that went away) cancels the request.

        Raises:
            EngineUnavailable: the engine is not running, or the adapter is not loaded: nothing was generated.
            EngineError: the request failed inside the engine.
        """
        if adapter is not None and (self.lora is None or adapter not in self.lora.names):
            raise EngineUnavailable(f"adapter {adapter!r} is not loaded")
        queue: asyncio.Queue = asyncio.Queue()
        rid = uuid.uuid4().hex
        self._adapter_of[rid] = adapter  # before add_request: the next forward pass may take it
        self.manager.register_result_handler(rid, queue.put_nowait)  # before add_request: no output is missed
        eos = -1 if sampling.ignore_eos else self.tokenizer.eos_token_id  # a negative id never matches
        request = self.manager.add_request(list(prompt_ids), request_id=rid, max_new_tokens=sampling.max_tokens,
                                           streaming=True, eos_token_id=eos, **self._sampling(sampling))
        if request is None:
            self._forget(rid)
            raise EngineUnavailable("the generation engine is not running")
        seen, finished = 0, False
        self.active += 1
        self.using[adapter] += 1
        try:
            while not finished:
                out = await queue.get()
                if out.error:
                    raise EngineError(f"generation failed: {out.error}")
                new, seen = list(out.generated_tokens[seen:]), len(out.generated_tokens)  # outputs are cumulative
                finished = out.is_finished()
                if new:
                    yield new
        finally:
            self.active -= 1
            self.using[adapter] -= 1
            self._adapter_of.pop(rid, None)
            if not finished:
                self.manager.cancel_request(rid)
                self._forget(rid)  # a cancelled request gets no final output, so its handler would stay

    def _sampling(self, s: Sampling) -> dict[str, Any]:
        # greedy: the most likely token, exactly. Temperature 0 itself would divide by 0, and one just above it
        # (5e-324) overflows the logits to inf: the sampler's NaN killed the generation loop for every request.
        # Below 1e-5 sampling is greedy, as vLLM's _SAMPLING_EPS makes it.
        if s.temperature < GREEDY_BELOW:
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {"temperature": float(s.temperature), "top_k": self.vocab, "top_p": float(s.top_p)}

    def describe(self) -> dict[str, Any]:
        """What a router needs to know of this replica: its hardware, variant, context and load."""
        stats = self.stats()
        return {**self.hardware, "variant": self.variant, "context": self.context,
                "max_concurrency": self.max_concurrency, "running": stats.running, "waiting": stats.waiting}

    def _forget(self, rid: str) -> None:
        self._adapter_of.pop(rid, None)
        router = getattr(self.manager, "output_router", None)
        if router is not None:
            router.result_handlers.pop(rid, None)


def _hardware(cuda: bool) -> dict[str, Any]:
    """The device the model runs on, as a replica reports it (llmops/serving/router.py checks it against its class)."""
    import platform

    import torch

    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"hardware": "cuda", "device_name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
    return {"hardware": "cpu", "device_name": platform.processor() or platform.machine(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _variant(model_dir: Path, model: Any) -> str:
    """The served variant: the quantization method of a release (release.json), else the weights' dtype."""
    import json

    try:
        variant = json.loads((model_dir / "release.json").read_text())["variant"]
    except (OSError, ValueError, KeyError, TypeError):
        variant = None
    if isinstance(variant, str) and variant.startswith("quantized/"):
        return variant.removeprefix("quantized/")
    return str(model.dtype).removeprefix("torch.")
