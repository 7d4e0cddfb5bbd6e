"""`llmops serve` under load: generated tokens/s at 16 concurrent clients vs 1, and vs a one-request-at-a-time
`generate()` loop on the same model and prompts, with p50/p99 latency and time to first token.

    python benchmarks/serve_throughput.py                # GPU: the ~374M Llama of GPU.md, bf16
    python benchmarks/serve_throughput.py --device cpu   # CPU: a ~40M Llama (compute dominates), float32

The server is the real one (`llmops serve start --model DIR` in its own process, continuous batching,
API key, SSE streaming); clients are threads of the official `openai` client, each sending its
requests one after another. Every request asks for exactly --new-tokens tokens (`ignore_eos`),
greedy, so the work is the same at every concurrency. The `generate()` loop runs first, in this
process, on the same device and dtype as the server (bf16 on a GPU, float32 on CPU), and is
freed before the server starts. Weights are random (no hub here): throughput does not depend on
what the tokens say.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmops.training.modeling import train_tokenizer  # noqa: E402
from llmops.governance.apikeys import hash_key  # noqa: E402

MODELS = {
    "cuda": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816,
                 vocab_size=32000, max_position_embeddings=1024),
    "cpu": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536,
                vocab_size=16000, max_position_embeddings=512),
}
TARGETS = {"cuda": 6.0, "cpu": 3.0}  # 16 clients vs 1
TARGET_VS_GENERATE = 2.0
KEY = "sk-bench"


def build(work: Path, spec: dict) -> tuple[Path, object, int]:
    """A random-weight Llama and a tokenizer trained here, saved as the server loads them (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lines = [f"Request {i}: how many letters are in word number {i * 7919 % 10007}, and what follows {i}?"
             for i in range(5000)]
    tok = train_tokenizer(lines, spec["vocab_size"], spec["max_position_embeddings"])
    config = LlamaConfig(**{**spec, "vocab_size": len(tok)}, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    out = work / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok, sum(p.numel() for p in model.parameters())


def prompts(n: int, length: int, tok) -> list[str]:
    """n different prompts of about `length` tokens."""
    found = []
    for i in range(n):
        words, text = [], ""
        while len(tok(text)["input_ids"]) < length:
            words.append(f"item{(i * 131 + len(words) * 17) % 997}")
            text = "Summarize: " + " ".join(words)
        found.append(text)
    return found


def generate_loop(model_dir: Path, device: str, texts: list[str], new_tokens: int) -> float:
    """tokens/s of plain transformers generate(), one request at a time, greedy, exactly new_tokens each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def one(text: str) -> None:
        ids = torch.tensor([tok(text)["input_ids"]], device=device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        assert out.shape[1] - ids.shape[1] == new_tokens

    one(texts[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for text in texts:
        one(text)
    if device == "cuda":
        torch.cuda.synchronize()
    return len(texts) * new_tokens / (time.perf_counter() - started)  # the model is freed on return


class Server:
    def __init__(self, model_dir: Path, port: int, concurrency: int, log: Path, cache_entries: int = 0):
        repo = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, LLMOPS_API_KEY_HASHES=hash_key(KEY),
                   PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        self.url = f"http://127.0.0.1:{port}"
        # `llmops serve`, through its entry point (the console script may not be installed where this runs)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from llmops.cli.main import main; sys.exit(main())", "serve", "start",
             "--model", str(model_dir), "--port", str(port), "--max-concurrency", str(concurrency),
             "--cache-entries", str(cache_entries)],  # 0 here: the prompts repeat across the runs
            cwd=model_dir.parent,
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise SystemExit("the server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def load(url: str, texts: list[str], clients: int, per_client: int, new_tokens: int) -> dict:
    """`clients` threads, each sending `per_client` streamed requests one after another; throughput and latencies."""
    from openai import OpenAI

    latencies, ttfts, errors = [], [], []

    def client(index: int) -> None:
        api = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
        for j in range(per_client):
            text = texts[(index * per_client + j) % len(texts)]
            started = time.perf_counter()
            first, pieces = None, 0
            try:
                for chunk in api.completions.create(model="model", prompt=text, max_tokens=new_tokens, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True}):
                    if chunk.choices and chunk.choices[0].text and first is None:
                        first = time.perf_counter() - started
                    pieces += 1
            except Exception as exc:  # a failed request is reported, not hidden in the throughput
                errors.append(repr(exc))
                continue
            latencies.append(time.perf_counter() - started)
            ttfts.append(first if first is not None else latencies[-1])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"clients": clients, "requests": len(latencies), "tokens_per_s": len(latencies) * new_tokens / elapsed,
            "p50": _pct(latencies, 50), "p99": _pct(latencies, 99), "ttft_p50": _pct(ttfts, 50),
            "ttft_p99": _pct(ttfts, 99)}


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client at the high concurrency")
    ap.add_argument("--single-requests", type=int, default=8, help="requests of the single client (and generate)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; pass --device cpu")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the server process too

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok, n_params = build(Path(tmp), MODELS[args.device])
        texts = prompts(max(args.clients * args.requests, args.single_requests), args.prompt_tokens, tok)
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
        print(f"device: {device_name}; torch {version('torch')}, transformers {version('transformers')}")
        print(f"model: Llama, {n_params / 1e6:.1f}M parameters, {MODELS[args.device]}")
        print(f"each request: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens (greedy, ignore_eos)")
        baseline = generate_loop(model_dir, args.device, texts[:args.single_requests], args.new_tokens)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the server gets the whole GPU
        server = Server(model_dir, args.port, args.clients, Path(tmp) / "server.log")
        try:
            load(server.url, texts, 2, 1, 8)  # warm-up: the batching thread and its kernels
            one = load(server.url, texts, 1, args.single_requests, args.new_tokens)
            many = load(server.url, texts, args.clients, args.requests, args.new_tokens)
        finally:
            server.stop()

    print(f"\n{'run':<28}{'requests':>9}{'tokens/s':>11}{'p50 s':>9}{'p99 s':>9}{'TTFT p50':>10}{'TTFT p99':>10}")
    print(f"{'generate() loop, 1 at a time':<28}{args.single_requests:>9}{baseline:>11.1f}")
    for row in (one, many):
        print(f"{'server, ' + str(row['clients']) + ' client' + ('s' if row['clients'] > 1 else ''):<28}"
              f"{row['requests']:>9}{row['tokens_per_s']:>11.1f}{row['p50']:>9.2f}{row['p99']:>9.2f}"
              f"{row['ttft_p50']:>10.3f}{row['ttft_p99']:>10.3f}")
    scale, vs_generate = many["tokens_per_s"] / one["tokens_per_s"], many["tokens_per_s"] / baseline
    target = TARGETS[args.device]
    print(f"\n{args.clients} clients / 1 client: x{scale:.2f} (target >= {target:.0f}: "
          f"{'met' if scale >= target else 'NOT met'})")
    print(f"{args.clients} clients / generate() loop: x{vs_generate:.2f} (target >= {TARGET_VS_GENERATE:.0f}: "
          f"{'met' if vs_generate >= TARGET_VS_GENERATE else 'NOT met'})")
    print(f"1 client / generate() loop: x{one['tokens_per_s'] / baseline:.2f} (HTTP and batching overhead against "
          "the engine's own speed-ups: CUDA graphs on a GPU)")
    return 0 if scale >= target and vs_generate >= TARGET_VS_GENERATE else 1


if __name__ == "__main__":
    sys.exit(main())
