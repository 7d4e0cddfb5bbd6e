"""Training-throughput benchmark: our train stage vs a plain PyTorch AMP loop, and LoRA vs full training.

    python benchmarks/train_throughput.py            # GPU: ~374M Llama, seq 2048, micro-batch 8, bf16
    python benchmarks/train_throughput.py --tiny     # CPU smoke test with a toy model

Runs (each in its own process, so one run's GPU memory, CUDA context and
DeepSpeed state cannot leak into the next):

    plain       plain PyTorch loop: fp32 weights, torch.autocast(bf16), fused AdamW, eager
    ours        our train stage: llmops.trainer.deepspeed_config + deepspeed.initialize + train_steps
                (ZeRO-2, bf16, AdamW as DeepSpeed picks it), eager
    ours-lora   the same core on a peft LoRA model (r=16 on q,k,v,o,gate,up,down), built from FinetuneParams
    plain-lora  the plain loop on the same LoRA model

Every run feeds the same random-token batches through llmops.trainer.Batches,
warms up, then times whole optimizer steps (each ends in loss.item() plus a
device synchronize, so the host clock sees finished work).

MFU = tokens/s * (6N + 12 L H T) / peak, N = every parameter of the model
(the same definition as /work/shared/GPU.md's reference table). Peak is the
dense bf16 datasheet rate (989 TFLOP/s for H100/H200 SXM) unless --peak-tflops
says otherwise. For LoRA runs MFU is not printed: the frozen weights get no
weight-gradient matmuls, so 6N over-counts the work.

The script applies llmops.trainer.sanitized_env() before it imports DeepSpeed,
so a TORCH_CUDA_ARCH_LIST such as NVIDIA images' "9.0a" (which crashes
DeepSpeed's FusedAdam JIT build) needs no manual export.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the project
    sys.path.insert(0, str(ROOT))

RUNS = ["plain", "ours", "ours-lora", "plain-lora"]

# ~374M parameters: the Llama config of GPU.md's reference numbers, so they compare directly.
FULL = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=2816, seq=2048, micro_batch=8, warmup=5, steps=25)
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, seq=64, micro_batch=2, warmup=1, steps=3)
LORA_R = 16
LR = 3e-4


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    """Dense bf16 peak of the device, or None where we don't know it (CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if "H100" in device_name or "H200" in device_name:
        return 989e12  # SXM datasheet, dense (no sparsity); H200 is the same compute die
    return None


# ---------------------------------------------------------------------------------------------------------
# child: one run in this process


def _model(spec: dict[str, Any], device: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], intermediate_size=spec["intermediate_size"],
        max_position_embeddings=spec["seq"], attn_implementation="sdpa", tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: CPU init of 374M params costs more than the benchmark
        return LlamaForCausalLM(config).float()


def _lora(model: Any) -> Any:
    from peft import get_peft_model

    from llmops.adapters import METHODS, LoraParams

    return get_peft_model(model, METHODS["lora"].peft_config(LoraParams(r=LORA_R, alpha=2 * LORA_R)))


def _train_cfg(kind: str, spec: dict[str, Any], precision: str) -> Any:
    """The project's own params models, as params.yaml would give them."""
    from llmops.adapters import LoraParams
    from llmops.config import DeepSpeedParams, FinetuneParams, PretrainParams

    common = dict(steps=spec["warmup"] + spec["steps"], lr=LR, lr_schedule="constant", warmup_steps=1,
                  micro_batch=spec["micro_batch"], grad_accum=1, max_seq_len=spec["seq"], checkpoint_every=0,
                  deepspeed=DeepSpeedParams(zero_stage=2, precision=precision))
    if kind == "lora":
        return FinetuneParams(method="lora", lora=LoraParams(r=LORA_R, alpha=2 * LORA_R), **common)
    return PretrainParams(**common)


def _batches(spec: dict[str, Any], cfg: Any) -> Any:
    """Random tokens through the project's Batches (what train_steps gets in the real stage)."""
    import torch

    from llmops.trainer import Batches

    n = 4 * spec["micro_batch"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec["vocab_size"], (n, spec["seq"]), generator=gen)
    return Batches({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}, cfg, world=1)


class Timer:
    """Host clock after a device sync at the end of each step; the window starts after the warm-up steps."""

    def __init__(self, warmup: int, sync: Any):
        self.warmup, self.sync = warmup, sync
        self.t0 = self.t1 = 0.0
        self.tokens = 0
        self.step_s: list[float] = []
        self.losses: list[float] = []
        self._last = 0.0

    def on_step(self, step: int, loss: float, lr: float, tokens: int, seconds: float,
                grad_norm: float | None = None) -> None:
        self.sync()
        now = time.perf_counter()
        if step == self.warmup:
            self.t0 = now
        elif step > self.warmup:
            self.tokens += tokens
            self.step_s.append(now - self._last)
        self._last = self.t1 = now
        self.losses.append(loss)


def child(run: str, spec: dict[str, Any], out: Path) -> None:
    raw_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    from llmops.trainer import sanitized_env

    os.environ.update(sanitized_env())  # before DeepSpeed is imported: its op builder reads this at JIT time
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # bf16 is the requirement; the CPU smoke test keeps it too (DeepSpeed and autocast both run bf16 on CPU)
    precision = "bf16"

    model = _model(spec, device)
    n_params = sum(p.numel() for p in model.parameters())
    lora = run.endswith("lora")
    if lora:
        model = _lora(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    cfg = _train_cfg("lora" if lora else "full", spec, precision)
    batches = _batches(spec, cfg)
    timer = Timer(spec["warmup"], sync)
    total = spec["warmup"] + spec["steps"]
    optimizer_name = ""

    if run.startswith("ours"):
        import logging

        import deepspeed
        import torch.distributed as dist

        from llmops.trainer import deepspeed_config, train_steps

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # as trainer.main does
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=deepspeed_config(cfg))
        optimizer_name = type(engine.basic_optimizer).__name__
        train_steps(engine, lambda step, micro: batches(step, micro, 0, engine.device), 0, total, cfg.seed,
                    timer.on_step)
        del engine
        dist.destroy_process_group()
    else:
        # The plain loop: what a user writes by hand. Same batches, clipping and optimizer hyper-parameters
        # as the DeepSpeed config, so the only difference is the framework.
        opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
        optimizer_name = "torch.optim.AdamW(fused=True)"
        model.train()
        for step in range(total):
            t = time.perf_counter()
            batch = batches(step, 0, 0, device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            timer.on_step(step + 1, loss.item(), LR, int(batch["attention_mask"].sum()), time.perf_counter() - t)

    import deepspeed  # noqa: F401  (only for its version; imported after sanitising, as above)
    import peft
    import transformers

    elapsed = timer.t1 - timer.t0
    result = {
        "run": run, "tokens_per_s": timer.tokens / elapsed, "elapsed_s": elapsed, "tokens": timer.tokens,
        "step_s_median": statistics.median(timer.step_s), "step_s_min": min(timer.step_s),
        "step_s_max": max(timer.step_s), "first_loss": timer.losses[0], "last_loss": timer.losses[-1],
        "n_params": n_params, "n_trainable": sum(p.numel() for p in trainable),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "optimizer": optimizer_name, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "peft": peft.__version__, "deepspeed": sys.modules["deepspeed"].__version__,
        "arch_list_raw": raw_arch, "arch_list_used": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }
    out.write_text(json.dumps(result))
    del model, trainable, batches
    gc.collect()


# ---------------------------------------------------------------------------------------------------------
# parent: launch the runs, print the table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    # single-process "distributed" job for DeepSpeed, on a fresh port so runs never share a store
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", run, "--spec", json.dumps(spec), "--result", str(out)]
        print(f"\n=== {run} ===", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, env=env)
        if rc or not out.exists():
            print(f"=== {run} FAILED (exit {rc}) after {time.perf_counter() - t:.0f}s ===", flush=True)
            return None
        result = json.loads(out.read_text())
        print(f"=== {run}: {result['tokens_per_s']:,.0f} tokens/s ({time.perf_counter() - t:.0f}s with start-up) ===",
              flush=True)
        return result


def flops_per_token(spec: dict[str, Any], n_params: int) -> float:
    return 6 * n_params + 12 * spec["num_hidden_layers"] * spec["hidden_size"] * spec["seq"]


def report(spec: dict[str, Any], results: dict[str, list[dict[str, Any]]], peak_tflops: float | None) -> dict:
    first = next(r[0] for r in results.values() if r)
    peak = peak_flops(first["device"], peak_tflops)
    fpt = flops_per_token(spec, first["n_params"])
    summary: dict[str, Any] = {"spec": spec, "n_params": first["n_params"], "flops_per_token": fpt,
                               "peak_flops": peak, "runs": {}}
    print("\n" + "=" * 100)
    print(f"device {first['device']} | torch {first['torch']} (CUDA {first['cuda']}) | deepspeed {first['deepspeed']} | "
          f"transformers {first['transformers']} | peft {first['peft']}")
    print(f"model: Llama, {first['n_params']:,} parameters (hidden {spec['hidden_size']}, {spec['num_hidden_layers']} "
          f"layers, {spec['num_attention_heads']} heads, intermediate {spec['intermediate_size']}, vocab "
          f"{spec['vocab_size']}, untied), seq {spec['seq']}, micro-batch {spec['micro_batch']}, bf16, SDPA, eager")
    print(f"timing: {spec['warmup']} warm-up steps, then {spec['steps']} timed steps; "
          f"{len(next(iter(results.values())))} repeat(s), median shown")
    print(f"MFU = tokens/s x {fpt / 1e9:.3f} GFLOP/token (6N + 12LHT) / "
          + (f"{peak / 1e12:.0f} TFLOP/s (dense bf16 peak)" if peak else "(no known peak: not computed)"))
    print(f"TORCH_CUDA_ARCH_LIST: environment {first['arch_list_raw']!r} -> used {first['arch_list_used']!r} "
          "(llmops.trainer.sanitized_env)")
    print()
    # tokens/s is total tokens / wall time of the timed window; "median-step" divides one step's tokens by the
    # median step time, which ignores the occasional slow step (host jitter on the lent VM shows up as those)
    header = f"{'run':<11} {'tokens/s':>10} {'range':>19} {'MFU':>7} {'median-step':>11} {'step ms':>8} {'trainable':>12} " \
             f"{'peak GiB':>8} {'loss':>13}  optimizer"
    print(header)
    print("-" * len(header))
    for run, rs in results.items():
        if not rs:
            print(f"{run:<11} FAILED")
            continue
        tps = [r["tokens_per_s"] for r in rs]
        med = statistics.median(tps)
        mfu = med * fpt / peak if peak and not run.endswith("lora") else None
        r = rs[0]
        step_ms = 1000 * statistics.median(x["step_s_median"] for x in rs)
        step_tps = spec["micro_batch"] * spec["seq"] / (step_ms / 1000)
        summary["runs"][run] = {"tokens_per_s": med, "tokens_per_s_all": tps, "mfu": mfu,
                                "median_step_tokens_per_s": step_tps, "raw": rs}
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{run:<11} {med:>10,.0f} {min(tps):>9,.0f}-{max(tps):<9,.0f} "
              f"{(f'{100 * mfu:.1f}%' if mfu else '-'):>7} {step_tps:>11,.0f} {step_ms:>8.1f} "
              f"{r['n_trainable']:>12,} {mem:>8} {r['first_loss']:>6.2f}>{r['last_loss']:<6.2f}  {r['optimizer']}")
    runs = summary["runs"]

    def ratio(a: str, b: str, label: str) -> None:
        if a in runs and b in runs:
            value = runs[a]["tokens_per_s"] / runs[b]["tokens_per_s"]
            summary[f"{a}/{b}"] = value
            print(f"{label:<52} {value:.3f}")

    print()
    ratio("ours", "plain", "ours / plain AMP (full training, tokens/s)")
    ratio("ours-lora", "ours", "LoRA / full fine-tuning, our train core")
    ratio("plain-lora", "plain", "LoRA / full fine-tuning, plain loop")
    ratio("ours-lora", "plain-lora", "ours / plain, LoRA")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy model and sequence: a CPU smoke test")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole list this many times (interleaved)")
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--steps", type=int, help="timed steps")
    ap.add_argument("--warmup", type=int, help="untimed steps first")
    ap.add_argument("--peak-tflops", type=float, help="override the dense bf16 peak used for MFU")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        child(args.child, json.loads(args.spec), args.result)
        return 0

    spec = dict(TINY if args.tiny else FULL)
    for key in ("micro_batch", "seq", "steps", "warmup"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(RUNS)
    if unknown:
        ap.error(f"unknown runs {sorted(unknown)}; choose from {RUNS}")

    results: dict[str, list[dict[str, Any]]] = {r: [] for r in runs}
    for _ in range(args.repeats):
        for run in runs:
            result = launch(run, spec)
            if result:
                results[run].append(result)
    if not any(results.values()):
        print("every run failed", file=sys.stderr)
        return 1
    summary = report(spec, results, args.peak_tflops)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
