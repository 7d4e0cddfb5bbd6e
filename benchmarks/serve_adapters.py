"""Many adapters on one base, and the response cache, measured in one run.

    python benchmarks/serve_adapters.py                # GPU: the ~374M Llama of serve_throughput.py, bf16
    python benchmarks/serve_adapters.py --device cpu   # CPU: its ~40M Llama, float32

1. Generated tokens/s of the serving engine (llmops.serving.engine, continuous batching, in this process)
   with --requests concurrent greedy requests of exactly --new-tokens tokens each:
   the model alone (no adapters: CUDA graphs on a GPU), one LoRA adapter for every request, and
   --adapters adapters mixed in the same batches (llmops/serving/multilora.py). The ratios printed are
   mixed / one adapter (the cost of mixing) and one adapter / model alone (the cost of LoRA).
2. The response cache through the real server (`llmops serve start --model DIR`, the openai client):
   the latency of a greedy request that generates (miss) against the same request again (hit).

Weights are random (no hub here); LoRA adapters have random, non-zero weights (r=--rank on every
linear layer), so every adapter does its full work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_throughput import KEY, MODELS, Server, build, prompts  # noqa: E402

TARGET_MIXED = 0.8  # mixed adapters keep at least this share of one adapter's throughput


def make_adapters(model_dir: Path, n: int, rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    found = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]))
        model.save_pretrained(model_dir.parent / f"adapter{i}")
        found.append(model_dir.parent / f"adapter{i}")
    return found


def engine_throughput(model_dir: Path, texts: list[str], new_tokens: int, adapters: list[Path],
                      spread: int, adapter_mode: bool = True) -> float:
    """tokens/s of one Engine answering every text at once; `spread`: how many of the adapters the requests use
    (0: the model alone); `adapter_mode`: the engine is set up for adapters (no CUDA graphs, no prefix caching)."""
    from llmops.serving.engine import Engine, Sampling

    engine = Engine(model_dir, max_concurrency=len(texts), adapters=adapter_mode)
    ids = [engine.tokenizer(t)["input_ids"] for t in texts]
    engine.start()

    async def run() -> float:
        names = []
        for i, path in enumerate(adapters[:spread]):
            await engine.add_adapter(f"a{i}", path)
            names.append(f"a{i}")

        async def one(i: int, prompt: list[int]) -> int:
            pieces = [p async for p in engine.generate(prompt, Sampling(max_tokens=new_tokens, temperature=0,
                                                                        ignore_eos=True),
                                                       names[i % len(names)] if names else None)]
            return sum(len(p) for p in pieces)

        await asyncio.gather(*(one(i, p) for i, p in enumerate(ids[:4])))  # warm-up
        started = time.perf_counter()
        done = await asyncio.gather(*(one(i, p) for i, p in enumerate(ids)))
        assert all(n == new_tokens for n in done)
        return sum(done) / (time.perf_counter() - started)

    try:
        return asyncio.run(run())
    finally:
        engine.stop()


def cache_latency(model_dir: Path, port: int, texts: list[str], new_tokens: int, log: Path) -> tuple[float, float]:
    """Median latency (s) of a greedy request answered by generating (miss), and of the same again (hit)."""
    from openai import OpenAI

    server = Server(model_dir, port, 4, log, cache_entries=1024)
    try:
        api = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

        def timed(text: str) -> tuple[float, str]:
            started = time.perf_counter()
            raw = api.completions.with_raw_response.create(model="model", prompt=text, max_tokens=new_tokens,
                                                           temperature=0, extra_body={"ignore_eos": True})
            return time.perf_counter() - started, raw.headers["x-llmops-cache"]

        timed(texts[-1])  # warm-up
        miss, hit = [], []
        for text in texts[:10]:
            seconds, result = timed(text)
            assert result == "miss", result
            miss.append(seconds)
            seconds, result = timed(text)
            assert result == "hit", result
            hit.append(seconds)
        return statistics.median(miss), statistics.median(hit)
    finally:
        server.stop()


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--no-server", action="store_true",
                    help="the engine only (where the server's dependencies are not installed, e.g. the lent GPU)")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok, n_params = build(Path(tmp), MODELS[args.device])
        adapters = make_adapters(model_dir, args.adapters, args.rank)
        texts = prompts(args.requests, args.prompt_tokens, tok)
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
        print(f"device: {device_name}; torch {version('torch')}, transformers {version('transformers')}, "
              f"peft {version('peft')}")
        print(f"model: Llama, {n_params / 1e6:.1f}M parameters; {args.adapters} LoRA adapters, r={args.rank}, "
              f"every linear layer; {args.requests} concurrent requests, {args.prompt_tokens}-token prompts, "
              f"{args.new_tokens} new tokens each (greedy, ignore_eos)")
        alone = engine_throughput(model_dir, texts, args.new_tokens, adapters, 0, adapter_mode=False)
        alone_mode = engine_throughput(model_dir, texts, args.new_tokens, adapters, 0)
        one = engine_throughput(model_dir, texts, args.new_tokens, adapters, 1)
        mixed = engine_throughput(model_dir, texts, args.new_tokens, adapters, args.adapters)
        if not args.no_server:
            miss, hit = cache_latency(model_dir, args.port, texts, args.new_tokens, Path(tmp) / "server.log")

    print(f"\n{'engine':<36}{'tokens/s':>10}")
    print(f"{'model alone (no adapters)':<36}{alone:>10.1f}")
    print(f"{'model alone, on an adapter engine':<36}{alone_mode:>10.1f}")
    print(f"{'one adapter for every request':<36}{one:>10.1f}")
    print(f"{f'{args.adapters} adapters mixed in each batch':<36}{mixed:>10.1f}")
    print(f"\nmixed / one adapter: x{mixed / one:.2f} (target >= {TARGET_MIXED}: "
          f"{'met' if mixed / one >= TARGET_MIXED else 'NOT met'})")
    print(f"one adapter / model alone: x{one / alone:.2f}; of which the adapter engine's set-up (no CUDA graphs, no "
          f"prefix caching) x{alone_mode / alone:.2f}, and the LoRA updates x{one / alone_mode:.2f}")
    if not args.no_server:
        print(f"\nresponse cache, median of 10 ({args.new_tokens} new tokens): miss {miss * 1000:.1f} ms, "
              f"hit {hit * 1000:.1f} ms, x{miss / hit:.0f} faster")
    return 0 if mixed / one >= TARGET_MIXED else 1


if __name__ == "__main__":
    sys.exit(main())
