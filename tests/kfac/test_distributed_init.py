"""Process-group set-up errors (no process group is created by these tests)."""
from __future__ import annotations

import pytest
import torch

from kfacperf.runtime import distributed

ENV = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def test_missing_environment_names_the_variables() -> None:
    with pytest.raises(RuntimeError,
                       match="MASTER_ADDR, MASTER_PORT not set; launch with torchrun"):
        distributed.init_distributed(env={"RANK": "0", "WORLD_SIZE": "1"})


@pytest.mark.parametrize("env,match", [
    (ENV | {"RANK": "two"}, "RANK='two' is not an integer"),
    (ENV | {"RANK": "2"}, "invalid RANK=2 for WORLD_SIZE=2"),
    (ENV | {"WORLD_SIZE": "0"}, "invalid RANK=0 for WORLD_SIZE=0"),
])
def test_bad_rank_or_world(env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        distributed.init_distributed(env=env)


def test_bad_timeout_and_backend() -> None:
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        distributed.init_distributed(env=ENV, timeout_s=0)
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        distributed.init_distributed(env=ENV, backend="mpi")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_nccl_without_cuda() -> None:
    assert distributed.default_backend() == "gloo"
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        distributed.init_distributed(env=ENV, backend="nccl")


def test_describe_without_a_process_group() -> None:
    info = distributed.describe()
    assert (info.rank, info.world_size, info.backend) == (0, 1, "none")
    assert not distributed.is_distributed()
