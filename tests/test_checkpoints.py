"""A checkpoint's bytes are checked where they are unpickled (checkpoints.loader, which the training processes give
DeepSpeed): a file swapped after the launcher checked the checkpoint, before a worker loaded it, runs no code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from llmops.training import checkpoints


class _Planted:
    """A pickle that runs code when it is loaded: it creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mknod, (self.path,))


def test_the_loader_unpickles_only_the_bytes_that_were_hashed(tmp_path):
    partial = tmp_path / checkpoints.partial_name(10)
    partial.mkdir()
    torch.save({"weights": torch.ones(3)}, partial / "mp_rank_00_model_states.pt")
    checkpoints.commit(tmp_path, 10, "fp", keep=2, info={})
    load = checkpoints.loader(tmp_path, checkpoints.name(10))
    state = load(str(tmp_path / checkpoints.name(10) / "mp_rank_00_model_states.pt"), map_location="cpu")
    assert torch.equal(state["weights"], torch.ones(3))

    # swapped after the launcher's check: the planted pickle would create a file if it were ever unpickled
    ran = tmp_path / "code-ran"
    (tmp_path / checkpoints.name(10) / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Planted(str(ran))))
    with pytest.raises(checkpoints.Tampered, match="mp_rank_00_model_states.pt is not the file hashed"):
        load(str(tmp_path / checkpoints.name(10) / "mp_rank_00_model_states.pt"))
    (tmp_path / checkpoints.name(10) / "extra.pt").write_bytes(pickle.dumps(_Planted(str(ran))))  # a file added
    with pytest.raises(checkpoints.Tampered, match="extra.pt is not the file hashed"):
        load(str(tmp_path / checkpoints.name(10) / "extra.pt"))
    assert not ran.exists()
