"""The tiny CPU run's numbers are pinned, so a silent change in data, tokenizer, initialisation or training fails CI.

torchtune's practice: record the first losses of a small fixed run and compare every run
against them. The values were recorded from this suite's session pipeline (conftest's
TINY_TRAIN / TINY_RUN, seed 0, run with conftest.PORTABLE_CPU) with the versions in requirements.lock. If a change is meant to
move them (new sample data, a new tokenizer, another optimizer), re-record them here in the same
commit and say why in its message.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from llmops.core.provenance import sha256_file

pytestmark = [pytest.mark.services, pytest.mark.training]  # the session's run pipeline

# The generator is pure Python: byte-identical on every machine.
DATA_SHA256 = {
    "train.jsonl": "5c53509019b1b8bb34d2866b5f62e1ed35d19b53b5746430991d5fc74853bdac",
    "eval.jsonl": "28a5f5f955e4ae0a653a5e780c6470dd3da398583e9425d89ee95b4d65bae78f",
    "corpus.txt": "6dcf23cbb61e83fb6ccaeff1e85ca8174070763388690c88e2ed6898846d60b8",
}
FIRST_LOSSES = {
    "pretrain": [5.699400, 5.613944, 5.465807, 5.272559],
    "finetune": [4.269943, 4.119495, 3.346260, 3.467406],  # packed batches (train.finetune.packing)
}
# The pipeline runs with conftest.PORTABLE_CPU: the kernels of PyTorch and oneDNN pinned to AVX2, MKL in its
# vendor-independent mode, one thread. Left to pick kernels for the CPU, an Intel Xeon with AVX-512 and AMX gave
# 4.275207 and 4.12533 for the fine-tune's first losses, an AMD EPYC 4.265203 and 4.114655: the fine-tune starts
# from a pretrained model in which each machine's rounding had added up. With the pins, the kernels are the same
# on every x86 CPU with AVX2: the Xeon and an AMD EPYC-Milan emulated by QEMU (AuthenticAMD, AVX2, no AVX-512)
# gave these four losses within 1e-6 of each other (README: "Pinned numbers on any x86 CPU"). A change of data,
# tokenizer, initialisation, learning-rate schedule or loss masking moves the first step's loss by 1e-2 or more;
# the tolerance is for nothing else.
TOLERANCE = 5e-3


def test_the_generated_data_is_byte_identical(pipeline: Path):
    for name, digest in DATA_SHA256.items():
        assert sha256_file(pipeline / "data/prepared" / name) == digest, name


@pytest.mark.parametrize("mode", sorted(FIRST_LOSSES))
def test_the_first_losses_are_the_recorded_ones(pipeline: Path, mode: str):
    with open(pipeline / "reports/train" / mode / "log.csv", newline="") as fh:
        losses = [float(row["loss"]) for row in csv.DictReader(fh)][: len(FIRST_LOSSES[mode])]
    assert losses == pytest.approx(FIRST_LOSSES[mode], abs=TOLERANCE)
