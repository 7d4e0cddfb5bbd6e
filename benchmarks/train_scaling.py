"""Multi-GPU scaling of the train stage, through its real launch path, and a checked resume across GPUs.

    python benchmarks/train_scaling.py --gpus 2            # on a machine with 2 GPUs (the device tool's nvidia-h100-x2)
    python benchmarks/train_scaling.py --gpus 2 --tiny     # a CPU smoke test: the same steps with a toy model

Every run is `llmops train pretrain` in a copy of this checkout (data/prepared must exist:
`llmops prepare_data`), with params overrides as a user would write them: the command parses
params.yaml, tokenizes, checks the fit, and starts `torchrun` (NCCL on GPUs), which starts the
trainer (DeepSpeed, kernels: auto). tokens/s is what the stage itself reports (median over
steps, all GPUs together); per GPU it is divided by the GPU count, and scaling efficiency is the
per-GPU rate on N GPUs over the rate on one, at the same ZeRO stage and micro-batch per GPU.

The resume check runs the same 2-GPU job twice: once straight through, once SIGKILLed (the whole
process group, as a preempted node would be) after its first checkpoint is complete and then run
again, which resumes from it. The two final losses must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLI = "import sys; from llmops.cli.main import main; sys.exit(main(sys.argv[1:]))"
# ~374M parameters with a 32000-token vocabulary: the model of train_throughput.py (the tokenizer trained on the
# sample corpus may stop short of 32000 tokens; the table prints the parameter count the stage reports)
MODEL = ["model.vocab_size=32000", "model.hidden_size=1024", "model.num_layers=24", "model.num_heads=16",
         "model.intermediate_size=2816", "max_seq_len=2048", "micro_batch=16"]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128",
        "max_seq_len=64", "micro_batch=4"]
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
                "GIT_COMMITTER_EMAIL": "bench@localhost"}
IGNORE = shutil.ignore_patterns(".git", ".venv", ".whl*", "models", "reports", "checkpoints", ".llmops", "__pycache__")


class Failed(Exception):
    """A run of the stage that did not finish as asked."""


def project(workdir: Path, name: str, overrides: list[str]) -> Path:
    from llmops.core.config import load_params, write_params

    dest = workdir / name
    shutil.copytree(ROOT, dest, ignore=IGNORE)
    params = dest / "params.yaml"
    write_params(params, load_params(params, [f"train.pretrain.{o}" for o in overrides]))
    # a checkout of its own, as on a user's machine: the stage records each run in the repository's audit trail
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", f"scaling run {name}"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True, env={**os.environ, **GIT_IDENTITY})
    return dest


def train(dest: Path, timeout: float = 900) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, "train", "pretrain"], cwd=dest, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **GIT_IDENTITY})
    if proc.returncode:
        raise Failed(f"{dest.name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((dest / "reports/train/pretrain/summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - t
    summary["stdout"] = proc.stdout
    return summary


def killed_and_resumed(dest: Path, every: int) -> tuple[int, dict]:
    """Start the job, SIGKILL its process group once the first checkpoint is complete, run it again."""
    from llmops.training import checkpoints

    ckpt = dest / "checkpoints/train/pretrain/checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", CLI, "train", "pretrain"], cwd=dest, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **GIT_IDENTITY})
    try:
        while proc.poll() is None and not (ckpt / checkpoints.name(every) / "complete.json").exists():
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise Failed(f"the run ended (exit {proc.returncode}) before it could be killed")
    killed_at = max((int(line.split(",")[0]) for line in
                     (dest / "checkpoints/train/pretrain/log.csv").read_text().splitlines()[1:]), default=0)
    return killed_at, train(dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stages", default="2,3", help="ZeRO stages to measure")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--kernels", default="auto", choices=["auto", "none", "liger", "compile"],
                    help="train.pretrain.kernels for every run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (ROOT / "data/prepared/corpus.txt").exists():
        raise SystemExit("data/prepared/corpus.txt: run `llmops prepare_data` first")

    model = TINY if args.tiny else MODEL
    common = [*model, "warmup_steps=2", "eval_every=0", "checkpoint_every=0", "lr=3e-4", f"kernels={args.kernels}",
              f"deepspeed.precision={'fp32' if args.tiny else 'bf16'}"]
    workdir = Path(tempfile.mkdtemp(prefix="llmops-scaling-"))
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}

    def measure(stage: int) -> None:
        for gpus in (1, args.gpus):
            name = f"zero{stage}-{gpus}gpu"
            dest = project(workdir, name, [*common, f"steps={args.steps}", f"deepspeed.zero_stage={stage}",
                                           f"deepspeed.num_procs={gpus}"])
            try:
                r = train(dest)
            except Failed as exc:
                failed[name] = str(exc)
                print(f"{name}: FAILED\n{exc}", flush=True)
                continue
            results[name] = {k: r[k] for k in ("tokens_per_s", "world_size", "params_total", "final_loss", "wall_s",
                                               "kernels")}
            print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_s'] / gpus:,.0f} per GPU), "
                  f"{r['params_total']:,} parameters, kernels {r['kernels']}, {r['wall_s']:.0f}s", flush=True)
            shutil.rmtree(dest, ignore_errors=True)

    stages = [int(s) for s in args.stages.split(",")]
    measure(stages[0])
    resume = None
    if not args.no_resume:  # before the other stages: the check matters more than a second stage's number
        every, steps = 10, 20
        job = [*common, f"steps={steps}", f"checkpoint_every={every}", "deepspeed.zero_stage=2",
               f"deepspeed.num_procs={args.gpus}"]
        try:
            straight = train(project(workdir, "resume-reference", job))
            killed_at, resumed = killed_and_resumed(project(workdir, "resume-killed", job), every)
            resume = {"reference_final_loss": straight["final_loss"], "resumed_final_loss": resumed["final_loss"],
                      "killed_after_step": killed_at, "resumed_from": resumed["resumed_from"],
                      "relative_difference": abs(resumed["final_loss"] / straight["final_loss"] - 1)}
            print(f"resume: {resume}", flush=True)
        except Failed as exc:
            failed["resume"] = str(exc)
            print(f"resume: FAILED\n{exc}", flush=True)
    for stage in stages[1:]:
        measure(stage)

    print("\n" + "=" * 100)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device} x{args.gpus} | torch {torch.__version__} | `llmops train pretrain`, "
          f"{args.steps} steps, micro-batch {model[-1].split('=')[1]} per GPU, seq {model[-2].split('=')[1]}")
    print(f"{'run':<14} {'tokens/s':>10} {'per GPU':>10} {'efficiency':>10} {'parameters':>13} {'kernels':>8}")
    for name, r in results.items():
        stage, gpus = name.split("-")[0], r["world_size"]
        one = results.get(f"{stage}-1gpu")
        eff = (r["tokens_per_s"] / gpus) / one["tokens_per_s"] if one and gpus > 1 else None
        r["scaling_efficiency"] = eff
        print(f"{name:<14} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / gpus:>10,.0f} "
              f"{(f'{eff:.3f}' if eff else '-'):>10} {r['params_total']:>13,} {r['kernels']:>8}")
    if resume:
        print(f"\nresume on {args.gpus} GPUs (ZeRO-2): killed after step {resume['killed_after_step']}, resumed from "
              f"step {resume['resumed_from']}; final loss {resume['resumed_final_loss']:.6f} vs "
              f"{resume['reference_final_loss']:.6f} uninterrupted (relative difference "
              f"{resume['relative_difference']:.1e})")
    for name in failed:
        print(f"{name}: FAILED (its output is above)")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "runs": results, "resume": resume, "failed": failed},
                                        indent=2))
    # bf16 on GPUs resumed to the identical loss; gloo on CPU may sum in another order (about 1e-7)
    return 0 if not failed and (not resume or resume["relative_difference"] <= 1e-5) else 1


if __name__ == "__main__":
    sys.exit(main())
