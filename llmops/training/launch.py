"""How a training run starts: what this machine can run (kernels, QLoRA), and the command that starts its processes.

Everything here is decided in the parent process, before any training process
starts, so a request the hardware cannot serve, or a multi-node run with nowhere
to meet, is one clear line and no launch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Mapping

from llmops.core.config import ConfigError, FinetuneParams, TrainRunParams
from llmops.core.errors import LlmopsError

# Where torchrun and the schedulers put the rendezvous, in the order we look (after params):
# our own variable; torchrun's own (Kubeflow's elastic PyTorchJob sets PET_*); MASTER_ADDR/MASTER_PORT
# (Kubernetes' PyTorchJob, and the usual SLURM batch script: MASTER_ADDR=$(scontrol show hostnames | head -1)).
ENDPOINT_VARS = ("LLMOPS_RDZV_ENDPOINT", "PET_RDZV_ENDPOINT")


class LaunchError(LlmopsError):
    """The params ask for something this machine cannot run (kernels or QLoRA without a CUDA GPU)."""


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def resolve_kernels(cfg: TrainRunParams, key: str, cuda: bool, note: Callable[[str], None] = print) -> str:
    """The kernels a run uses: cfg.kernels with 'auto' decided for this machine.

    Args:
        cfg: the run's params.
        key: its params path (train.pretrain), for messages.
        cuda: whether the training processes get CUDA GPUs.
        note: where a line saying what auto chose goes.

    Raises:
        LaunchError: liger without a CUDA GPU, or without liger-kernel installed.
    """
    if cfg.kernels == "liger":
        if not cuda:
            raise LaunchError(f"{key}.kernels: liger runs Triton kernels on a CUDA GPU and this machine has none; "
                              "set kernels: auto, none or compile")
        if not liger_installed():
            raise LaunchError(f"{key}.kernels: liger needs liger-kernel and triton: pip install -e '.[gpu]'")
        return "liger"
    if cfg.kernels != "auto":
        return cfg.kernels
    if not cuda:
        note(f"{key}.kernels: auto -> none (Liger's kernels need a CUDA GPU; this run is on CPU)")
        return "none"
    if not liger_installed():
        note(f"{key}.kernels: auto -> none: liger-kernel is not installed (pip install -e '.[gpu]' trains about "
             "1.4x faster on a GPU)")
        return "none"
    return "liger"


def check_qlora(cfg: TrainRunParams, key: str, cuda: bool) -> None:
    """QLoRA trains through bitsandbytes' 4-bit CUDA kernels: refuse it where there are none."""
    if isinstance(cfg, FinetuneParams) and cfg.qlora and not cuda:
        raise LaunchError(f"{key}.qlora: 4-bit QLoRA training needs a CUDA GPU (bitsandbytes' 4-bit kernels) and "
                          "this machine has none; set qlora: false to train LoRA on the full-precision base")


def rendezvous_endpoint(cfg: TrainRunParams, key: str, env: Mapping[str, str] | None = None) -> str | None:
    """host:port where the nodes of a multi-node run meet: params, else the environment; None on one node.

    Raises:
        ConfigError: nnodes > 1 and no endpoint anywhere.
    """
    ds = cfg.deepspeed
    if ds.nnodes == 1:
        return None
    env = os.environ if env is None else env
    if ds.rdzv_endpoint:
        return ds.rdzv_endpoint
    for var in ENDPOINT_VARS:
        if env.get(var):
            return env[var]
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    raise ConfigError(
        f"{key}.deepspeed.nnodes is {ds.nnodes} but there is no rendezvous endpoint: set "
        f"{key}.deepspeed.rdzv_endpoint to host:port on one of the nodes, or LLMOPS_RDZV_ENDPOINT (or MASTER_ADDR "
        "and MASTER_PORT) in every node's environment")


def torchrun_args(cfg: TrainRunParams, key: str, run_id: str, env: Mapping[str, str] | None = None) -> list[str]:
    """torchrun's arguments for cfg: one node standalone, or several meeting at a c10d rendezvous.

    run_id names the rendezvous: nodes with other params or data (another id) never join one job.
    """
    ds = cfg.deepspeed
    endpoint = rendezvous_endpoint(cfg, key, env)
    if endpoint is None:
        return ["--standalone", f"--nproc_per_node={ds.num_procs}"]
    return [f"--nnodes={ds.nnodes}", f"--nproc_per_node={ds.num_procs}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}"]


def command(cfg: TrainRunParams, key: str, run_id: str, job: str,
            env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command that starts a run's training processes for `job` (trainer.py's job file), and what it adds to their
    environment.

    One process on one node starts directly as rank 0 of 1 (torchrun's launcher would cost an interpreter of its own,
    about 1.5 s of CPU, to start one process), forked by the fork server where one serves (llmops.core.forkserver:
    its imports done), of the installed package as `llmops train` is (-P: never a copy the
    working directory holds); its process group meets at a port the OS picks, which no other rank needs to know. More
    processes, or several nodes, start through torchrun (`torchrun_args`).
    """
    worker = ["-m", "llmops.training.trainer", job]
    if cfg.deepspeed.num_procs == 1 and rendezvous_endpoint(cfg, key, env) is None:
        return [sys.executable, "-P", "-m", "llmops.core.forkserver", *worker], {
            "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "0"}
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg, key, run_id, env), *worker], {}
