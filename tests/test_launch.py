"""What a training run may use on this machine (kernels, QLoRA) and how its processes start (one directly; several, or
several nodes, through torchrun)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmops.core.config import ConfigError, FinetuneParams, PretrainParams, load_params
from llmops.training.launch import (LaunchError, check_qlora, command, rendezvous_endpoint, resolve_kernels,
                                    torchrun_args)
from conftest import BIN, free_port, set_params

KEY = "train.pretrain"


def _notes():
    said: list[str] = []
    return said, said.append


def test_auto_kernels_are_none_on_cpu_and_say_why():
    said, note = _notes()
    assert resolve_kernels(PretrainParams(), KEY, cuda=False, note=note) == "none"
    assert said == ["train.pretrain.kernels: auto -> none (Liger's kernels need a CUDA GPU; this run is on CPU)"]


def test_liger_without_a_gpu_is_refused():
    with pytest.raises(LaunchError, match=r"^train.pretrain.kernels: liger runs Triton kernels on a CUDA GPU and this "
                                          r"machine has none; set kernels: auto, none or compile$"):
        resolve_kernels(PretrainParams(kernels="liger"), KEY, cuda=False)


def test_on_a_gpu_without_liger_kernel_auto_says_so_and_liger_is_refused(monkeypatch):
    monkeypatch.setattr("llmops.training.launch.liger_installed", lambda: False)
    said, note = _notes()
    assert resolve_kernels(PretrainParams(), KEY, cuda=True, note=note) == "none"
    assert "liger-kernel is not installed" in said[0]
    with pytest.raises(LaunchError, match=r"liger needs liger-kernel and triton: pip install -e '.\[gpu\]'"):
        resolve_kernels(PretrainParams(kernels="liger"), KEY, cuda=True)
    monkeypatch.setattr("llmops.training.launch.liger_installed", lambda: True)
    assert resolve_kernels(PretrainParams(), KEY, cuda=True) == "liger"


def test_compile_and_none_are_taken_as_they_are():
    for kernels in ("compile", "none"):
        assert resolve_kernels(PretrainParams(kernels=kernels), KEY, cuda=False) == kernels


def test_qlora_without_a_gpu_is_refused_and_needs_lora_in_bf16():
    cfg = FinetuneParams(qlora=True, deepspeed={"precision": "bf16"})
    with pytest.raises(LaunchError, match=r"^train.finetune.qlora: 4-bit QLoRA training needs a CUDA GPU"):
        check_qlora(cfg, "train.finetune", cuda=False)
    check_qlora(cfg, "train.finetune", cuda=True)
    with pytest.raises(ValueError, match="qlora needs deepspeed.precision: bf16"):
        FinetuneParams(qlora=True)
    with pytest.raises(ValueError, match="qlora needs method 'lora'"):
        FinetuneParams(qlora=True, method="prompt_tuning", deepspeed={"precision": "bf16"})


def test_one_node_is_standalone():
    assert torchrun_args(PretrainParams(deepspeed={"num_procs": 2}), KEY, "id", env={}) == [
        "--standalone", "--nproc_per_node=2"]


def test_one_process_starts_without_a_launcher_and_more_through_torchrun():
    one, ranks = command(PretrainParams(deepspeed={"num_procs": 1}), KEY, "id", "job.json", env={})
    assert one == [sys.executable, "-P", "-m", "llmops.core.forkserver", "-m", "llmops.training.trainer", "job.json"]
    assert ranks["RANK"] == "0" and ranks["WORLD_SIZE"] == "1" and ranks["MASTER_PORT"] == "0"
    two, ranks = command(PretrainParams(deepspeed={"num_procs": 2}), KEY, "id", "job.json", env={})
    assert two[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                       "llmops.training.trainer", "job.json"] and ranks == {}
    # one process on each of two nodes: still torchrun's, which meets the other node
    nodes, _ = command(PretrainParams(deepspeed={"num_procs": 1, "nnodes": 2}), KEY, "id", "job.json",
                       env={"LLMOPS_RDZV_ENDPOINT": "a:1"})
    assert "torch.distributed.run" in nodes and "--rdzv_endpoint=a:1" in nodes


@pytest.mark.parametrize("params, env, endpoint", [
    ({"rdzv_endpoint": "node0:29400"}, {"MASTER_ADDR": "x", "MASTER_PORT": "1"}, "node0:29400"),  # params first
    ({}, {"LLMOPS_RDZV_ENDPOINT": "a:1", "PET_RDZV_ENDPOINT": "b:2"}, "a:1"),
    ({}, {"PET_RDZV_ENDPOINT": "b:2"}, "b:2"),  # torchrun's own variable (Kubeflow's elastic PyTorchJob)
    ({}, {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}, "10.0.0.7:29500"),  # SLURM scripts, PyTorchJob
])
def test_several_nodes_meet_where_params_or_the_environment_say(params, env, endpoint):
    cfg = PretrainParams(deepspeed={"nnodes": 2, "num_procs": 4, **params})
    assert torchrun_args(cfg, KEY, "llmops-pretrain-ab12", env=env) == [
        "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
        "--rdzv_id=llmops-pretrain-ab12"]


def test_several_nodes_without_an_endpoint_is_refused():
    cfg = PretrainParams(deepspeed={"nnodes": 2})
    with pytest.raises(ConfigError, match=r"^train.pretrain.deepspeed.nnodes is 2 but there is no rendezvous "
                                          r"endpoint: set train.pretrain.deepspeed.rdzv_endpoint"):
        rendezvous_endpoint(cfg, KEY, env={"MASTER_ADDR": "only-the-address"})
    with pytest.raises(ValueError, match="'node0': expected host:port"):
        PretrainParams(deepspeed={"rdzv_endpoint": "node0"})


@pytest.mark.parametrize("overrides, expected, code", [
    (["train.pretrain.kernels=liger"], "error: train@pretrain: train.pretrain.kernels: liger runs Triton kernels", 1),
    (["train.finetune.qlora=true", "train.finetune.deepspeed.precision=bf16"],
     "error: train@finetune: train.finetune.qlora: 4-bit QLoRA training needs a CUDA GPU", 1),
    (["train.pretrain.deepspeed.nnodes=2"], "error: train@pretrain: train.pretrain.deepspeed.nnodes is 2 but", 2),
])
def test_the_cli_refuses_before_any_work(project, overrides, expected, code):
    set_params(project, *overrides)
    mode = overrides[0].split(".")[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT") and "RDZV" not in k}
    proc = subprocess.run([str(BIN / "llmops"), "train", mode], cwd=project, capture_output=True, text=True, env=env)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (project / "checkpoints").exists() and not (project / "models/pretrain").exists()


@pytest.mark.training
def test_two_nodes_train_as_one_node_of_two_ranks(trained, tmp_path):
    """Two checkouts on this machine play two nodes of one rank each, meeting at a c10d rendezvous on 127.0.0.1:
    their losses equal the 2-rank single-node run of the same params, and one node publishes.

    Ten steps, not the reference's sixty: the warm-up's learning rates do not depend on the run's length, so the
    first five losses (four updates from gradients all-reduced across the nodes) must be the reference's."""
    nodes = []
    port = free_port()
    for name in ("node-a", "node-b"):
        node = tmp_path / name
        shutil.copytree(trained, node, ignore=shutil.ignore_patterns("models", "reports", "checkpoints"))
        set_params(node, "train.pretrain.steps=10", "train.pretrain.deepspeed.num_procs=1",
                   "train.pretrain.deepspeed.nnodes=2", f"train.pretrain.deepspeed.rdzv_endpoint=127.0.0.1:{port}")
        nodes.append(node)
    assert load_params(nodes[0] / "params.yaml").train.pretrain.deepspeed.zero_stage == 2

    # torchrun's own variable for --local-addr: both "nodes" are this machine, and finding its address otherwise
    # costs about 50 s of lookups here
    env = {**os.environ, "PET_LOCAL_ADDR": "127.0.0.1"}

    def train(node: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "llmops"), "train", "pretrain"], cwd=node, capture_output=True, text=True,
                              timeout=600, env=env)

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(train, nodes))
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"one of 2 nodes, meeting at 127.0.0.1:{port}" in proc.stdout
    published = [n for n in nodes if (n / "models/pretrain/model.safetensors").exists()]
    assert len(published) == 1
    other = next(p for n, p in zip(nodes, procs) if n not in published)
    assert "this node's ranks are done; the node that ran rank 0 published models/pretrain/" in other.stdout
    assert not (next(n for n in nodes if n not in published) / "checkpoints/train/pretrain").exists()

    def losses(project: Path) -> list[float]:
        lines = (project / "reports/train/pretrain/log.csv").read_text().splitlines()[1:]
        return [float(line.split(",")[1]) for line in lines]

    warmup = load_params(trained / "params.yaml").train.pretrain.warmup_steps
    assert losses(published[0])[:warmup] == pytest.approx(losses(trained)[:warmup], abs=1e-5)
    summary = (published[0] / "reports/train/pretrain/summary.json").read_text()
    assert '"world_size": 2' in summary
