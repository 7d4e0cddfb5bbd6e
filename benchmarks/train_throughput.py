"""Training-throughput benchmark: our train stage against a compiled PyTorch loop; kernels, LoRA, QLoRA, packing.

    python benchmarks/train_throughput.py                        # GPU: ~374M Llama, seq 2048, bf16
    python benchmarks/train_throughput.py --size 1.3b            # GPU: ~1.37B Llama (hidden 2048, 24 layers)
    python benchmarks/train_throughput.py --tiny                 # CPU smoke test with a toy model

A run is named  IMPL[-ADAPTER][-KERNELS][-ckpt][@MICROBATCH][+DATA]:

    IMPL      plain: a hand-written PyTorch loop (fp32 weights, torch.autocast(bf16), fused AdamW,
                     grad clipping); ours: our train stage (llmops.training.trainer.start_engine: DeepSpeed
                     ZeRO-2 bf16 + train_steps), with the model built as the trainer builds it
    ADAPTER   lora: peft LoRA r16 on every linear layer (FinetuneParams' method), or on the layers
              --lora-targets names; qlora: the same on a 4-bit NF4 base, loaded by
              llmops.training.trainer.build_model exactly as `qlora: true` does
    KERNELS   liger: llmops.training.trainer.with_kernels (Liger's RoPE, RMSNorm, SwiGLU, fused linear
              cross-entropy); compile: torch.compile (plain) or DeepSpeed's engine.compile() (ours)
    -ckpt     activation checkpointing (llmops.training.trainer.with_checkpointing)
    DATA      random tokens (default), or a length mix of instruction examples: +padded (one per
              row, padded to the longest, as fine-tuning did) or +packed (llmops.training.modeling.pack_examples)

Every run starts in its own process, gets its batches through llmops.training.trainer.Batches, warms
up, then times whole optimizer steps (each ends in loss.item() plus a device synchronize).
tokens/s counts real tokens (no padding). MFU = tokens/s * (6N + 12 L H T) / peak, N = every
parameter (GPU.md's definition); peak is the dense bf16 datasheet rate (989 TFLOP/s for
H100/H200 SXM) unless --peak-tflops says otherwise. No MFU for adapter runs (the frozen weights
get no weight-gradient matmuls, so 6N over-counts) or for the length mix.

Runs that differ only in kernels see the same batches from the same initial weights; the
report prints how far their losses stray from the run without kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
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

DEFAULT_RUNS = ["plain-compile@16", "ours@16", "ours-liger@16"]
RUN = re.compile(r"^(?P<impl>plain|ours)(?:-(?P<adapter>lora|qlora))?(?:-(?P<kernels>liger|compile))?"
                 r"(?P<ckpt>-ckpt)?(?:@(?P<mb>\d+))?(?:\+(?P<data>padded|packed))?$")

SIZES = {
    # ~374M parameters: the Llama config of GPU.md's reference numbers, so they compare directly
    "374m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=2816, seq=2048, micro_batch=8, warmup=5, steps=25),
    # ~1.37B: twice the width, the same depth
    "1.3b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=5632, seq=2048, micro_batch=8, warmup=5, steps=25),
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, seq=64, micro_batch=2, warmup=1, steps=3),
}
LORA_R = 16
LR = 3e-4


def parse_run(name: str, default_mb: int) -> dict[str, Any]:
    m = RUN.match(name)
    if not m:
        raise ValueError(f"{name!r}: expected IMPL[-lora|-qlora][-liger|-compile][-ckpt][@MB][+padded|+packed]")
    run = {"name": name, "impl": m["impl"], "adapter": m["adapter"] or "", "kernels": m["kernels"] or "none",
           "ckpt": bool(m["ckpt"]), "mb": int(m["mb"] or default_mb), "data": m["data"] or "random"}
    if run["impl"] == "plain" and (run["adapter"] == "qlora" or run["kernels"] == "liger" or run["ckpt"]):
        raise ValueError(f"{name!r}: qlora, liger and -ckpt runs go through our train stage (ours-...)")
    return run


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    """Dense bf16 peak of the device, or None where we don't know it (CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if "H100" in device_name or "H200" in device_name:
        return 989e12  # SXM datasheet, dense (no sparsity); H200 is the same compute die
    return None


# ---------------------------------------------------------------------------------------------------------
# child: one run in this process


def _config(spec: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], intermediate_size=spec["intermediate_size"],
        max_position_embeddings=spec["seq"], attn_implementation="sdpa", tie_word_embeddings=False,
    )


def _model(spec: dict[str, Any], run: dict[str, Any], cfg: Any, device: Any) -> Any:
    """The model as the trainer builds it: Liger's kernels patched in first, then the adapter."""
    import torch
    from transformers import LlamaForCausalLM

    from llmops.training.trainer import TrainJob, build_model, with_checkpointing, with_kernels

    torch.manual_seed(0)
    if run["adapter"] == "qlora":
        # the real loading path of `qlora: true`: a saved base, quantized to NF4 as it loads
        with torch.device(device):
            base = LlamaForCausalLM(_config(spec)).to(torch.bfloat16)
        saved = tempfile.mkdtemp()
        base.save_pretrained(saved)
        del base
        torch.cuda.empty_cache()
        job = TrainJob(mode="finetune", cfg=cfg.model_dump(mode="json"), data="-", model=saved, out_dir="-",
                       ckpt_dir="-", log_file="-", fingerprint="-", kernels=run["kernels"])
        return build_model(job, cfg)
    with torch.device(device):  # initialise on the GPU: CPU init of 374M params costs more than the benchmark
        model = LlamaForCausalLM(_config(spec)).float()
    model = with_checkpointing(with_kernels(model, run["kernels"] if run["kernels"] == "liger" else "none"), cfg)
    if run["adapter"] == "lora":
        from peft import get_peft_model

        from llmops.core.peft_methods import METHODS

        model = get_peft_model(model, METHODS["lora"].peft_config(cfg.method_params))
    return model


def _train_cfg(run: dict[str, Any], spec: dict[str, Any]) -> Any:
    """The project's own params models, as params.yaml would give them."""
    from llmops.core.peft_methods import LoraParams
    from llmops.core.config import DeepSpeedParams, FinetuneParams, PretrainParams

    common = dict(steps=spec["warmup"] + spec["steps"], lr=LR, lr_schedule="constant", warmup_steps=1,
                  micro_batch=run["mb"], grad_accum=1, max_seq_len=spec["seq"], checkpoint_every=0,
                  kernels=run["kernels"], activation_checkpointing=run["ckpt"],
                  deepspeed=DeepSpeedParams(zero_stage=2, precision="bf16"))
    if run["adapter"]:
        targets = {"target_modules": spec["lora_targets"]} if spec.get("lora_targets") else {}
        return FinetuneParams(method="lora", lora=LoraParams(r=LORA_R, alpha=2 * LORA_R, **targets),
                              qlora=run["adapter"] == "qlora", **common)
    return PretrainParams(**common)


def length_mix(spec: dict[str, Any], n: int) -> list[tuple[list[int], list[bool]]]:
    """Instruction examples of mixed length (log-normal, median seq/8, capped at seq), 40% of each the prompt: each
    its token ids and which are trained (the response), as llmops.training.modeling.encode_row gives them."""
    import random

    rng = random.Random(1)
    pairs = []
    for _ in range(n):
        total = max(8, min(spec["seq"], int(rng.lognormvariate(0, 0.9) * spec["seq"] / 8)))
        head = max(1, int(total * 0.4))
        pairs.append(([rng.randrange(3, spec["vocab_size"]) for _ in range(total)],
                      [False] * head + [True] * (total - head)))
    return pairs


def _tensors(spec: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    import torch

    from llmops.training.modeling import pack_examples, pad_examples

    if run["data"] == "random":
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, spec["vocab_size"], (4 * run["mb"], spec["seq"]), generator=gen)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    pairs = length_mix(spec, 2048)
    return pad_examples(pairs, 0) if run["data"] == "padded" else pack_examples(pairs, spec["seq"], 0)


class Timer:
    """Host clock after a device sync at the end of each step; the window starts after the warm-up steps."""

    def __init__(self, warmup: int, sync: Any):
        self.warmup, self.sync = warmup, sync
        self.t0 = self.t1 = 0.0
        self.tokens = 0
        self.step_s: list[float] = []
        self.losses: list[float] = []
        self._last = 0.0

    def begin(self) -> None:
        """Right before step 1: without warm-up steps, the window starts here."""
        self.sync()
        self._last = self.t0 = time.perf_counter()

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


def child(run: dict[str, Any], spec: dict[str, Any], out: Path) -> None:
    raw_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    from llmops.training.trainer import sanitized_env

    os.environ.update(sanitized_env())  # before DeepSpeed is imported: its op builder reads this at JIT time
    import torch

    from llmops.training.trainer import Batches, model_inputs

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    cfg = _train_cfg(run, spec)
    if run["impl"] == "ours":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # as trainer.main does (before qlora)
    model = _model(spec, run, cfg, device)
    built_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None  # building/loading the model
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = Batches(_tensors(spec, run), cfg, world=1)
    timer = Timer(spec["warmup"], sync)
    total = spec["warmup"] + spec["steps"]
    on_step = timer.on_step
    if spec.get("profile"):  # the CUDA ops of 3 steps after the warm-up, into the profile folder
        from torch.profiler import ProfilerActivity, profile, schedule

        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=max(spec["warmup"] - 1, 0), warmup=1, active=3, repeat=1))
        prof.start()

        def on_step(*args: Any, **kwargs: Any) -> None:
            timer.on_step(*args, **kwargs)
            prof.step()

    if run["impl"] == "ours":
        import logging

        import torch.distributed as dist

        from llmops.training.trainer import start_engine, train_steps

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        engine = start_engine(model, cfg, run["kernels"])
        optimizer_name = type(engine.basic_optimizer).__name__
        timer.begin()
        train_steps(engine, lambda step, micro: batches(step, micro, 0, engine.device), 0, total, cfg.seed,
                    on_step)
        resident = torch.cuda.memory_allocated() / 2**30 if cuda else None
        del engine
        dist.destroy_process_group()
    else:
        # The plain loop: what a user writes by hand. Same batches, clipping and optimizer hyper-parameters
        # as the DeepSpeed config, so the only difference is the framework.
        opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
        optimizer_name = "torch.optim.AdamW(fused=True)"
        forward = torch.compile(model) if run["kernels"] == "compile" else model
        model.train()
        timer.begin()
        for step in range(total):
            t = time.perf_counter()
            batch = batches(step, 0, 0, device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward(**model_inputs(batch)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            on_step(step + 1, loss.item(), LR, int(batch["attention_mask"].sum()), time.perf_counter() - t)
        resident = torch.cuda.memory_allocated() / 2**30 if cuda else None

    if spec.get("profile"):
        prof.stop()
        Path(spec["profile"]).mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
        # no "@" in the name: the device tool does not bring such files back
        (Path(spec["profile"]) / f"{run['name'].replace('@', '_mb')}.txt").write_text(table)
    import peft
    import transformers

    elapsed = timer.t1 - timer.t0
    result = {
        "run": run, "tokens_per_s": timer.tokens / elapsed, "elapsed_s": elapsed, "tokens": timer.tokens,
        "step_s_median": statistics.median(timer.step_s), "step_s_min": min(timer.step_s),
        "step_s_max": max(timer.step_s), "losses": timer.losses,
        "n_params": n_params, "n_trainable": sum(p.numel() for p in trainable),
        "padding": 1 - float(batches.tensors["attention_mask"].sum()) / batches.tensors["attention_mask"].numel(),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "built_peak_gib": built_peak,
        "resident_gib": resident,  # after the last step: weights, optimizer state, gradients kept
        "optimizer": optimizer_name, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "peft": peft.__version__, "deepspeed": _version("deepspeed"), "liger": _version("liger-kernel"),
        "bitsandbytes": _version("bitsandbytes"), "triton": _version("triton"),
        "arch_list_raw": raw_arch, "arch_list_used": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }
    out.write_text(json.dumps(result))
    del model, trainable
    gc.collect()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------
# parent: launch the runs, print the table


def launch(run: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any] | None:
    from llmops.serving.instances import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    # single-process "distributed" job for DeepSpeed, on a fresh port so runs never share a store
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", json.dumps(run), "--spec", json.dumps(spec), "--result", str(out)]
        print(f"\n=== {run['name']} ===", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, env=env)
        if rc or not out.exists():
            print(f"=== {run['name']} FAILED (exit {rc}) after {time.perf_counter() - t:.0f}s ===", flush=True)
            return None
        result = json.loads(out.read_text())
        print(f"=== {run['name']}: {result['tokens_per_s']:,.0f} tokens/s, peak {result['peak_mem_gib'] or 0:.1f} GiB "
              f"(model built: {result['built_peak_gib'] or 0:.1f}, kept after the steps: "
              f"{result['resident_gib'] or 0:.1f}; {time.perf_counter() - t:.0f}s with start-up) ===", flush=True)
        return result


def flops_per_token(spec: dict[str, Any], n_params: int) -> float:
    return 6 * n_params + 12 * spec["num_hidden_layers"] * spec["hidden_size"] * spec["seq"]


def _loss_gap(a: list[float], b: list[float]) -> tuple[float, float]:
    """Largest |difference| of two runs' losses, at the first step and over all steps."""
    gaps = [abs(x - y) for x, y in zip(a, b)]
    return gaps[0], max(gaps)


def report(spec: dict[str, Any], results: dict[str, list[dict[str, Any]]], peak_tflops: float | None) -> dict:
    first = next(r[0] for r in results.values() if r)
    peak = peak_flops(first["device"], peak_tflops)
    full = next((r[0] for r in results.values() if r and not r[0]["run"]["adapter"]), first)
    fpt = flops_per_token(spec, full["n_params"])
    summary: dict[str, Any] = {"spec": spec, "n_params": full["n_params"], "flops_per_token": fpt,
                               "peak_flops": peak, "runs": {}}
    print("\n" + "=" * 110)
    print(f"device {first['device']} | torch {first['torch']} (CUDA {first['cuda']}) | deepspeed {first['deepspeed']} | "
          f"transformers {first['transformers']} | peft {first['peft']} | liger-kernel {first['liger']} | triton "
          f"{first['triton']} | bitsandbytes {first['bitsandbytes']}")
    print(f"model: Llama, {full['n_params']:,} parameters (hidden {spec['hidden_size']}, {spec['num_hidden_layers']} "
          f"layers, {spec['num_attention_heads']} heads, intermediate {spec['intermediate_size']}, vocab "
          f"{spec['vocab_size']}, untied), seq {spec['seq']}, bf16, SDPA")
    print(f"timing: {spec['warmup']} warm-up steps, then {spec['steps']} timed steps; "
          f"{len(next(iter(results.values())))} repeat(s), interleaved, median shown")
    print(f"MFU = tokens/s x {fpt / 1e9:.3f} GFLOP/token (6N + 12LHT) / "
          + (f"{peak / 1e12:.0f} TFLOP/s (dense bf16 peak)" if peak else "(no known peak: not computed)"))
    print(f"LoRA: r {LORA_R} on " + (", ".join(spec["lora_targets"]) if spec.get("lora_targets") else "every linear layer"))
    print()
    header = f"{'run':<24} {'tokens/s':>10} {'range':>19} {'MFU':>7} {'step ms':>8} {'trainable':>13} " \
             f"{'peak GiB':>8} {'kept GiB':>8} {'padding':>7} {'loss':>13}  optimizer"
    print(header)
    print("-" * len(header))
    for name, rs in results.items():
        if not rs:
            print(f"{name:<24} FAILED")
            continue
        r = rs[0]
        tps = [x["tokens_per_s"] for x in rs]
        med = statistics.median(tps)
        mfu = med * fpt / peak if peak and not r["run"]["adapter"] and r["run"]["data"] == "random" else None
        step_ms = 1000 * statistics.median(x["step_s_median"] for x in rs)
        summary["runs"][name] = {"tokens_per_s": med, "tokens_per_s_all": tps, "mfu": mfu, "raw": rs}
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        kept = f"{r['resident_gib']:.1f}" if r.get("resident_gib") is not None else "-"
        print(f"{name:<24} {med:>10,.0f} {min(tps):>9,.0f}-{max(tps):<9,.0f} "
              f"{(f'{100 * mfu:.1f}%' if mfu else '-'):>7} {step_ms:>8.1f} {r['n_trainable']:>13,} {mem:>8} {kept:>8} "
              f"{100 * r['padding']:>6.1f}% {r['losses'][0]:>6.3f}>{r['losses'][-1]:<6.3f}  {r['optimizer']}")
    runs = summary["runs"]
    print()

    def ratio(a: str, b: str, label: str) -> None:
        if a in runs and b in runs:
            value = runs[a]["tokens_per_s"] / runs[b]["tokens_per_s"]
            summary.setdefault("ratios", {})[f"{a} / {b}"] = value
            print(f"{label:<60} {value:.3f}")

    names = list(runs)
    for a in names:
        ra = runs[a]["raw"][0]["run"]
        for b in names:
            rb = runs[b]["raw"][0]["run"]
            if a == b:
                continue
            if ra["impl"] == "ours" and rb["impl"] == "plain" and rb["kernels"] == "compile" and not ra["adapter"] \
                    and not rb["adapter"]:
                ratio(a, b, f"{a} / {b} (vs the compiled reference)")
            elif ra["data"] == "packed" and rb["data"] == "padded" and {**ra, "data": "", "name": ""} == \
                    {**rb, "data": "", "name": ""}:
                ratio(a, b, f"{a} / {b} (packing)")
            elif ra["impl"] == rb["impl"] == "ours" and ra["adapter"] and not rb["adapter"] \
                    and (ra["kernels"], ra["mb"], ra["data"]) == (rb["kernels"], rb["mb"], rb["data"]):
                ratio(a, b, f"{a} / {b} ({ra['adapter']} vs full training)")
                mem = runs[a]["raw"][0]["peak_mem_gib"], runs[b]["raw"][0]["peak_mem_gib"]
                if all(mem):
                    summary["ratios"][f"{a} / {b} memory"] = mem[0] / mem[1]
                    print(f"{'  peak memory':<60} {mem[0] / mem[1]:.3f}")
    # the same batches from the same weights, other kernels: how far the losses stray
    def twin_key(run: dict[str, Any]) -> tuple:
        return tuple(v for k, v in sorted(run.items()) if k not in ("name", "kernels"))

    for a in names:
        ra = runs[a]["raw"][0]
        for b in names:
            rb = runs[b]["raw"][0]
            if ra["run"]["kernels"] != "none" and rb["run"]["kernels"] == "none" \
                    and twin_key(ra["run"]) == twin_key(rb["run"]):
                step1, worst = _loss_gap(ra["losses"], rb["losses"])
                summary.setdefault("loss_gaps", {})[f"{a} vs {b}"] = {"first": step1, "max": worst}
                print(f"loss {a} vs {b}: |diff| {step1:.4f} at step 1, at most {worst:.4f} over "
                      f"{len(ra['losses'])} steps (loss ~{rb['losses'][-1]:.2f})")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="374m")
    ap.add_argument("--tiny", action="store_true", help="the toy model: a CPU smoke test (same as --size tiny)")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated run names (see above)")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole list this many times (interleaved)")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--steps", type=int, help="timed steps")
    ap.add_argument("--warmup", type=int, help="untimed steps first")
    ap.add_argument("--lora-targets", help="comma-separated linear layers LoRA adapts (default: every one)")
    ap.add_argument("--peak-tflops", type=float, help="override the dense bf16 peak used for MFU")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--profile", type=Path, help="write each run's top CUDA ops (3 steps after warm-up) here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        child(json.loads(args.child), json.loads(args.spec), args.result)
        return 0

    spec = dict(SIZES["tiny" if args.tiny else args.size])
    for key in ("seq", "steps", "warmup"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.lora_targets:
        spec["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.profile:
        spec["profile"] = str(args.profile.resolve())
    try:
        runs = [parse_run(r.strip(), spec["micro_batch"]) for r in args.runs.split(",") if r.strip()]
    except ValueError as exc:
        ap.error(str(exc))

    results: dict[str, list[dict[str, Any]]] = {r["name"]: [] for r in runs}
    for _ in range(args.repeats):
        for run in runs:
            result = launch(run, spec)
            if result:
                results[run["name"]].append(result)
    if not any(results.values()):
        print("every run failed", file=sys.stderr)
        return 1
    summary = report(spec, results, args.peak_tflops)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
