"""Quantized inference on a GPU: our quantize methods on a ~374M Llama vs the bf16 model, in one process.

    python benchmarks/quantize_latency.py                      # GPU: int4_weight_only, int8_weight_only, nf4
    python benchmarks/quantize_latency.py --tiny --device cpu  # CPU smoke test with a toy model

Each method goes the way the quantize stage takes it (llmops.training.quantization.quantize from a saved
float directory, save_pretrained to safetensors, reload with llmops.training.modeling.load_causal_lm) and
is timed with the stage's own llmops.evaluation.inference.ms_per_token: greedy decoding of exactly N tokens
after a warm-up, median of the repeats, at batch 1 and batch 8. Repeats of all models are
interleaved so drift on the lent machine hits every model alike.

The weights are random (no hub here), so quality is measured against the bf16 model itself on
random tokens: top-1 agreement of the next-token prediction and the mean KL divergence. That
is what quantization error does to this model; task quality needs trained weights (the CPU
stage reports perplexity and exact match on the eval split).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmops.evaluation import inference  # noqa: E402
from llmops.training import quantization
from llmops.training.modeling import load_causal_lm, train_tokenizer  # noqa: E402

GPU_MODEL = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816,
                 vocab_size=32000)
TINY_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384, vocab_size=512)


def build(work: Path, spec: dict, dtype) -> tuple[Path, object]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = train_tokenizer([f"What is {i} + {i * 7 % 13}? The answer follows." for i in range(2000)],
                          spec["vocab_size"], 2048)
    config = LlamaConfig(**spec, max_position_embeddings=2048, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).to(dtype)
    src = work / "float"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return src, tok


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["int4_weight_only", "fp8", "int8_weight_only", "nf4"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    spec = TINY_MODEL if args.tiny else GPU_MODEL
    prompts = [[{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a "
                                            "bottle."}]] * 8

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src, tok = build(work, spec, dtype)
        models = {"bf16" if dtype == torch.bfloat16 else "fp32": load_causal_lm(str(src), dtype=dtype,
                                                                               device_map=args.device).eval()}
        sizes = {next(iter(models)): sum(f.stat().st_size for f in src.glob("*.safetensors"))}
        failed = {}
        for method in args.methods:
            out = work / method
            try:
                quantization.quantize(str(src), method, args.device, dtype).save_pretrained(out)
                models[method] = load_causal_lm(str(out), device_map=args.device).eval()
            except Exception as exc:  # a method this image cannot run: report it and go on with the others
                failed[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            sizes[method] = sum(f.stat().st_size for f in out.glob("*.safetensors"))

        reference = next(iter(models))
        ids = torch.randint(3, min(len(tok), spec["vocab_size"]), (8, 256), device=args.device)
        with torch.no_grad():
            ref_logits = models[reference](input_ids=ids).logits.float()
        quality = {}
        for name, model in models.items():
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float()
            agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1),
                                            log_target=True, reduction="batchmean").item() / ids.shape[1]
            quality[name] = (agree, kl)

        timings: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):  # interleaved: one repeat of every model, then the next
            for name, model in models.items():
                loaded = inference.Loaded(tok, model, name, 0)
                for batch in (1, 8):
                    timings.setdefault((name, batch), []).append(
                        inference.ms_per_token(loaded, prompts[:batch], args.new_tokens, 1))

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device}; torch {torch.__version__}; model {spec}; {args.new_tokens} new tokens, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'method':<18}{'size MB':>10}{'size x':>8}{'b1 ms/tok':>11}{'b1 x':>7}{'b8 ms/tok':>11}{'b8 x':>7}"
          f"{'top-1 agree':>13}{'KL/token':>10}")
    rows = {}
    for name in models:
        b1, b8 = (statistics.median(timings[(name, b)]) for b in (1, 8))
        r1, r8 = (statistics.median(timings[(reference, b)]) for b in (1, 8))
        rows[name] = dict(size_mb=sizes[name] / 1e6, size_ratio=sizes[name] / sizes[reference], b1_ms=b1,
                          b1_ratio=b1 / r1, b8_ms=b8, b8_ratio=b8 / r8, top1=quality[name][0], kl=quality[name][1])
        r = rows[name]
        print(f"{name:<18}{r['size_mb']:>10.1f}{r['size_ratio']:>8.2f}{b1:>11.2f}{r['b1_ratio']:>7.2f}{b8:>11.2f}"
              f"{r['b8_ratio']:>7.2f}{r['top1']:>13.3f}{r['kl']:>10.4f}")
    for method, why in failed.items():
        print(f"{method:<18}failed: {why}")
    print(json.dumps({"device": device, "rows": rows, "failed": failed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
