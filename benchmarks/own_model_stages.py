"""The pipeline on your own base model, stage by stage: time and memory of each stage command on a real model's shape.

    python benchmarks/own_model_stages.py --size qwen2.5-0.5b --data ../shared/data/gsm8k   # on a CUDA GPU
    python benchmarks/own_model_stages.py --size tiny --data ../shared/data/gsm8k          # CPU smoke test

benchmarks/README.md says how to run it on the lent GPU and what it measured there.

A stand-in base of the named model's architecture and shape (random weights: nothing can be downloaded here; its
BPE tokenizer trained on the data, its family's chat template, a licence in its card) is saved as a local model
directory, and a fresh copy of this project is pointed at it with `llmops params --apply`. Then every stage runs
as a user runs it, by its command (`llmops prepare_data`, ... `llmops release`), and the release is served
(`llmops serve start --model models/release`) and sent chat requests through the `openai` client, `--concurrency` at a
time. Each stage is timed from its command's start to its exit (Python start-up, imports, model loading and the
work; the first fine-tune on a machine also JIT-builds DeepSpeed's fused Adam). Peak memory: the host's, the
resident memory of the command's process tree; the GPU's, what nvidia-smi reports in use on the card, minus what
was in use before the stage (so it counts the CUDA context, as a user's card does). Both are sampled every 0.1 s.

The data: GSM8K (`--data DIR` holding train.jsonl and test.jsonl, as ../shared/data/gsm8k) as OpenAI `messages`
rows with a system prompt, scored with the numeric metric; without it, the demo's generated data. The weights are
random, so the scores mean nothing: the gate's thresholds are opened so the release and serving run too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# transformers config arguments of real bases (their config.json), for stand-ins of their shape
SIZES = {
    # the tests' 2-layer stand-in, its embedding padded past the tokenizer as real bases' are
    "tiny": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, vocab_size=1024)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1e6, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1e6, vocab_size=151936, tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                   rope_theta=5e5, vocab_size=128256, tie_word_embeddings=True)),
}
SYSTEM = "Solve the grade-school math problem. End with #### and the answer."
STAGES = [["prepare_data"], ["validate_data"], ["train", "pretrain"], ["train", "finetune"], ["evaluate"],
          ["audit_bias"], ["quantize"], ["gate"], ["release"]]
# random weights score nothing: every check passes, so the release is made and served
OPEN_GATE = dict(min_score=0, min_gain_over_base=-1, min_gain_over_baseline=-1, max_perplexity=1e12,
                 max_stereotype_deviation=50, max_stereotype_increase=50, max_stereotype_deviation_per_type=50,
                 max_regression=1, max_quantized_exact_match_drop=1, max_quantized_perplexity_increase=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="qwen2.5-0.5b")
    ap.add_argument("--data", type=Path, help="a folder of GSM8K's train.jsonl and test.jsonl; default: the demo data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/own-model-stages"), help="emptied first")
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--eval-rows", type=int, default=128)
    ap.add_argument("--requests", type=int, default=64, help="chat requests sent to the server")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128, help="per chat request")
    ap.add_argument("--out", type=Path, help="also write the results here as JSON")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="a params override, key=value")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    project = _project(work / "project")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GX_ANALYTICS_ENABLED="false",
               DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    results = {"size": args.size, "device": torch.cuda.get_device_name() if gpu else "cpu",
               "versions": _versions(), "stages": []}

    t0 = time.perf_counter()
    data = _data(args.data, work, args.train_rows, args.eval_rows)
    arch, sizes = SIZES[args.size]
    import standin

    with torch.device("cuda" if gpu else "cpu"):  # random init of a large model is slow on the CPU
        base = standin.build(arch, work / f"stand-in-{args.size}", sizes=sizes, texts=data and _texts(data),
                             vocab_size=600 if args.size == "tiny" else 32000,
                             dtype="float32" if args.size == "tiny" else "bfloat16")
    n = _parameters(base)
    results["stand_in"] = {"parameters": n, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"stand-in {args.size}: {arch}, {n / 1e6:,.1f}M parameters, built in {results['stand_in']['seconds']} s",
          flush=True)

    (work / "overlay.yaml").write_text(json.dumps(_overlay(base, data, gpu, args)))  # YAML reads JSON
    _cli(["params", "--apply", str(work / "overlay.yaml"), *[a for o in args.overrides for a in ("-S", o)]],
         project, env)

    for stage in STAGES:
        row = _measured(stage, project, env)
        results["stages"].append(row)
        _write(args.out, results)
        if row["exit"] != 0:
            print(f"stopped: {' '.join(stage)} exited {row['exit']}", flush=True)
            return 1
    results["serve"] = _serve(project, env, work, args)
    _write(args.out, results)
    print(_table(results), flush=True)
    return 0


def _project(dest: Path) -> Path:
    """This project's files (not its data, models or reports) in a fresh git repository."""
    skip = ("data/prepared", "reports/", "models/", "benchmarks/", ".whl", ".bench", ".llmops", ".dvc/cache", ".dvc/tmp")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            text=True)
    names = listed.stdout.split("\0") if listed.returncode == 0 else [  # a copy without .git (the GPU machine's)
        str(p.relative_to(REPO)) for p in REPO.rglob("*") if ".git" not in p.parts]
    for name in filter(None, names):
        if (REPO / name).is_file() and not name.startswith(skip) and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@localhost")
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "benchmark project"]):
        subprocess.run(["git", *cmd], cwd=dest, env=git, check=True)
    return dest


def _data(folder: Path | None, work: Path, train_rows: int, eval_rows: int) -> dict[str, Path] | None:
    """GSM8K's first rows as `messages` JSONL files (a system prompt, the question, the worked answer)."""
    if folder is None:
        return None
    files = {}
    for split, rows in (("train", train_rows), ("test", eval_rows)):
        files[split] = work / f"gsm8k-{split}.jsonl"
        with open(folder / f"{split}.jsonl") as src, open(files[split], "w") as dst:
            for line in list(src)[:rows]:
                r = json.loads(line)
                dst.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                                   {"role": "user", "content": r["question"]},
                                                   {"role": "assistant", "content": r["answer"]}]}) + "\n")
    return files


def _texts(files: dict[str, Path]) -> list[str]:
    return [m["content"] for line in open(files["train"]) for m in json.loads(line)["messages"]]


def _overlay(base: Path, data: dict[str, Path] | None, gpu: bool, args) -> dict:
    """The params a user of this base would set (configs/chat-lora-hub-model.yaml's kind), sized for a benchmark."""
    finetune = {"base_model": str(base), "method": "lora", "steps": 100, "warmup_steps": 10, "lr": 2e-4,
                "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                "prompt_overflow": "drop", "micro_batch": 8 if gpu else 2, "checkpoint_every": 0, "eval_every": 0,
                "deepspeed": {"zero_stage": 2, "precision": "bf16" if gpu else "fp32"}}
    overlay = {
        "train": {"finetune": finetune},
        "evaluate": {"max_examples": args.eval_rows, "max_new_tokens": 256 if data else 24, "batch_size": 32},
        "audit_bias": {"pairs_per_type": 50},
        "quantize": {"methods": ["int8_weight_only", "fp8"] if gpu else ["int8_weight_only"],
                     "max_examples": 64, "latency_new_tokens": 64, "latency_repeats": 3},
        "gate": {**OPEN_GATE, "release_candidate": "none"},
        "governance": {"data_licence": "MIT"},
        "deploy": {"target": "none"},
    }
    if data:
        overlay["data"] = {"instructions": str(data["train"]), "eval_instructions": str(data["test"]),
                           "format": "messages"}
        overlay["evaluate"]["metrics"] = ["numeric", "chrf"]
        overlay["validate_data"] = {"max_response_chars": 4096}
    if not gpu:  # a smoke test: a few steps, a few answers
        finetune.update(steps=4, warmup_steps=1, max_seq_len=512)
        overlay["evaluate"].update(max_examples=8, max_new_tokens=8)
        overlay["quantize"].update(max_examples=4, latency_new_tokens=4, latency_repeats=1)
        overlay["audit_bias"]["pairs_per_type"] = 4
    return overlay


def _cli(argv: list[str], cwd: Path, env: dict, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(["llmops", *argv], cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"llmops {' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class Peaks:
    """Peak host memory of a process tree and peak GPU memory in use, sampled every 0.1 s while it runs."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.host, self.gpu, self._stop = psutil.Process(pid), 0, 0, threading.Event()
        self.gpu_before = _gpu_used()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.1):
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.host = max(self.host, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            used = _gpu_used()
            if used is not None:
                self.gpu = max(self.gpu, used - self.gpu_before)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        gib = 1 << 30
        return {"host_gib": round(self.host / gib, 2),
                "gpu_gib": None if self.gpu_before is None else round(self.gpu / gib, 2)}


def _gpu_used() -> int | None:
    """Bytes in use on GPU 0, as nvidia-smi reports them (every process, the CUDA contexts included)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True).stdout
    return int(out.split()[0]) << 20 if out.strip() else None


def _measured(stage: list[str], project: Path, env: dict) -> dict:
    log = project / f"stage-{'-'.join(stage)}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(["llmops", *stage], cwd=project, env=env, stdout=fh, stderr=subprocess.STDOUT)
        peaks = Peaks(proc.pid)
        code = proc.wait()
    row = {"stage": " ".join(stage), "seconds": round(time.perf_counter() - start, 1), **peaks.stop(), "exit": code}
    text = log.read_text()
    row["summary"] = next((line for line in text.splitlines() if line.startswith((f"{stage[0]}:", f"{stage[0]}@"))), "")
    print(f"{row['stage']:<16} {row['seconds']:>7.1f} s  host {row['host_gib']:>6.2f} GiB  "
          f"gpu {row['gpu_gib'] if row['gpu_gib'] is not None else '-':>6} GiB  exit {code}", flush=True)
    if code != 0:
        print(text[-4000:], flush=True)
    return row


def _serve(project: Path, env: dict, work: Path, args) -> dict:
    """`llmops serve start --model models/release`, then `--requests` chat requests, `--concurrency` at a time, each a
    different eval question (no response-cache hits), `--max-tokens` each, greedy."""
    from openai import OpenAI

    from llmops.serving.instances import free_port

    key = _cli(["serve", "keygen", "bench"], project, env).stdout.split()[0]
    port = free_port()
    questions = _questions(project, args.requests)
    start = time.perf_counter()
    log = open(project / "serve.log", "w")
    proc = subprocess.Popen(["llmops", "serve", "start", "--model", "models/release", "--port", str(port),
                             "--max-concurrency", str(args.concurrency)],
                            cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks = Peaks(proc.pid)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)
    try:
        while True:  # ready: the model is loaded and answering
            if proc.poll() is not None:
                sys.exit(f"llmops serve exited {proc.returncode}:\n{(project / 'serve.log').read_text()[-4000:]}")
            try:
                name = client.models.list().data[0].id
                break
            except Exception:
                time.sleep(0.5)
        ready = time.perf_counter() - start

        def ask(question: list[dict]) -> tuple[float, int]:
            t = time.perf_counter()
            answer = client.chat.completions.create(model=name, messages=question, temperature=0,
                                                    max_tokens=args.max_tokens)
            return time.perf_counter() - t, answer.usage.completion_tokens

        ask(questions[0])  # one warm-up request
        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            done = list(pool.map(ask, questions))
        wall = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    latencies = sorted(d for d, _ in done)
    tokens = sum(n for _, n in done)
    row = {"stage": "serve", "ready_seconds": round(ready, 1), **peaks.stop(), "requests": len(done),
           "concurrency": args.concurrency, "completion_tokens": tokens, "seconds": round(wall, 2),
           "tokens_per_s": round(tokens / wall, 1), "p50_s": round(latencies[len(latencies) // 2], 3),
           "p95_s": round(latencies[int(len(latencies) * 0.95) - 1], 3)}
    print(f"serve: ready in {row['ready_seconds']} s; {len(done)} requests, {args.concurrency} at a time: "
          f"{row['tokens_per_s']} tokens/s, p50 {row['p50_s']} s, p95 {row['p95_s']} s", flush=True)
    return row


def _questions(project: Path, n: int) -> list[list[dict]]:
    """The eval split's prompts as chat requests (with their system prompt), repeated up to n."""
    rows = [json.loads(line) for line in (project / "data/prepared/eval.jsonl").read_text().splitlines()]
    chats = [[m for m in r["messages"] if m["role"] != "assistant"] if "messages" in r
             else [{"role": "user", "content": r["prompt"]}] for r in rows]
    return [chats[i % len(chats)] for i in range(n)]


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "deepspeed", "torchao", "liger-kernel", "prefect"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _write(path: Path | None, results: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=1))


def _table(results: dict) -> str:
    lines = [f"{results['size']} stand-in ({results['stand_in']['parameters'] / 1e6:,.1f}M parameters) on "
             f"{results['device']}", "", "| stage | seconds | peak host GiB | peak GPU GiB |", "|---|---:|---:|---:|"]
    serve = results["serve"]
    for r in results["stages"] + [{**serve, "stage": "serve: start until answering", "seconds": serve["ready_seconds"]}]:
        lines.append(f"| {r['stage']} | {r['seconds']} | {r['host_gib']} | "
                     f"{r['gpu_gib'] if r['gpu_gib'] is not None else '-'} |")
    lines.append(f"| serve: {serve['requests']} requests, {serve['concurrency']} at a time | {serve['seconds']} | | |")
    lines.append(f"\n{serve['tokens_per_s']} generated tokens/s; p50 {serve['p50_s']} s, p95 {serve['p95_s']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
