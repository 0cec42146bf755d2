"""Bad input and dead ranks: clear errors on every rank, never a hang.

Three launches: P = 2 (bad grad_worker_fraction, models that differ across ranks, then a
rank that stops answering past the process-group timeout and then leaves: the other raises a
clear error), and P = 3 twice (a rank killed mid-run under spngd, and under kaisa whose
gradients go through DDP).  Time bounds are generous (:data:`PROMPT_S`), so a loaded machine
does not fail them.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from helpers.distributed import Checks, assert_check, merge_checks, run_ranks
from kfacperf.kfac.strategies import ModelMismatchError, make_strategy
from kfacperf.runtime import distributed
from kfacperf.runtime.training import TrainConfig, Trainer

TIMEOUT_S = 2.0
PROMPT_S = 30.0
"""An error this soon came from the configured process-group timeout (TIMEOUT_S) or the
dead peer, not from torch's default timeout (30 minutes) or a hang; the margin over
TIMEOUT_S is wide so that a loaded machine does not fail the check."""
CFG = TrainConfig(optimizer="kfac", strategy="spngd", damping=1e-2)


def mlp(seed: int, width: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)


def trainer(model: nn.Module, config: TrainConfig = CFG) -> Trainer:
    return Trainer(model, loss_fn=nn.functional.cross_entropy, config=config)


def expect_error(exc_type: type[BaseException], match: str, fn: Any, *args: Any) -> str:
    try:
        fn(*args)
    except exc_type as exc:
        assert match in str(exc), f"error {exc!r} does not mention {match!r}"
        return str(exc)
    raise AssertionError(f"{fn} did not raise {exc_type.__name__}")


def suite_p2(rank: int, world: int) -> dict[str, Any]:
    distributed.init_distributed(backend="gloo", timeout_s=TIMEOUT_S)
    checks = Checks()
    checks.run("fraction_not_dividing_world", expect_error, ValueError, "grad_worker_fraction",
               trainer, mlp(0), replace(CFG, strategy="kaisa", grad_worker_fraction=0.75))
    checks.run("different_values", expect_error, ModelMismatchError, "parameter values",
               trainer, mlp(seed=rank))
    checks.run("different_shapes", expect_error, ModelMismatchError, "parameter shapes",
               trainer, mlp(0, width=5 + rank))
    checks.run("kaisa_different_shapes", expect_error, RuntimeError, "",
               trainer, mlp(0, width=5 + rank), replace(CFG, strategy="kaisa"))
    checks.run("different_strategy_settings", expect_error, ModelMismatchError,
               "different strategy settings", trainer, mlp(0),
               replace(CFG, symmetric=bool(rank)))
    checks.run("local_on_several_ranks", expect_error, ValueError, "runs on one process",
               trainer, mlp(0), replace(CFG, strategy="local"))
    checks.run("same_model_trains", lambda: trainer(mlp(0)).train_step(*batch(rank)))

    def stalled_peer() -> dict[str, Any]:
        t = trainer(mlp(0))
        if rank == 1:
            time.sleep(TIMEOUT_S + 1.0)  # alive but silent past the timeout
            return {}
        start = time.monotonic()
        msg = expect_error(RuntimeError, "peer rank", t.train_step, *batch(rank))
        return {"elapsed": time.monotonic() - start, "message": msg}

    checks.run("stalled_peer", stalled_peer)
    return checks.report()


def killed_rank(rank: int, world: int, strategy: str) -> dict[str, Any]:
    distributed.init_distributed(backend="gloo", timeout_s=TIMEOUT_S)
    t = trainer(mlp(0), replace(CFG, strategy=strategy))
    t.train_step(*batch(rank))
    if rank == world - 1:
        os._exit(17)  # dies between steps
    start = time.monotonic()
    try:
        for _ in range(3):
            t.train_step(*batch(rank))
    except RuntimeError as exc:
        return {"elapsed": time.monotonic() - start, "message": str(exc),
                "type": type(exc).__name__}
    raise AssertionError("training went on after a rank died")


_LAUNCHES: dict[str, Any] = {}


def launch(key: str) -> Any:
    if key not in _LAUNCHES:
        if key == "p2":
            _LAUNCHES[key] = run_ranks(suite_p2, 2, init=False, timeout_s=120)
        else:
            _LAUNCHES[key] = run_ranks(killed_rank, 3, args=(key,), init=False, timeout_s=120)
    return _LAUNCHES[key]


def test_unknown_strategy_and_options() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'kfac'.*spngd"):
        make_strategy("kfac")
    with pytest.raises(ValueError, match="'sgd' is the first-order baseline"):
        make_strategy("sgd")
    with pytest.raises(ValueError, match="no option.*grad_worker_fraction"):
        make_strategy("spngd", grad_worker_fraction=0.5)
    with pytest.raises(ValueError, match="comm dtype 'fp64'"):
        make_strategy("kaisa", comm_dtype="fp64")
    with pytest.raises(ValueError, match="unknown strategy 'spngd2'"):
        TrainConfig(optimizer="kfac", strategy="spngd2")
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        make_strategy("kaisa", grad_worker_fraction=0.0)


def test_single_process_runs_every_strategy() -> None:
    # no process group: spngd and kaisa have nothing to communicate and act like 'local'

    for name in ("local", "spngd", "kaisa"):
        t = trainer(mlp(0), replace(CFG, strategy=name))
        t.train_step(*batch(0))


@pytest.mark.slow
@pytest.mark.parametrize("check", ["fraction_not_dividing_world", "different_values",
                                   "different_shapes", "kaisa_different_shapes",
                                   "different_strategy_settings",
                                   "local_on_several_ranks", "same_model_trains",
                                   "stalled_peer"])
def test_faults_on_two_ranks(check: str) -> None:
    assert_check(merge_checks(launch("p2")), check)


@pytest.mark.slow
def test_stalled_peer_times_out_with_a_clear_error() -> None:
    results = launch("p2")
    assert_check(merge_checks(results), "stalled_peer")
    got = results[0].value["values"]["stalled_peer"]
    assert "rank 0" in got["message"] and "timeout" in got["message"]
    # it waited for the peer (one that is merely slow is not an error), then gave up promptly
    assert TIMEOUT_S * 0.9 <= got["elapsed"] <= PROMPT_S


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["spngd", "kaisa"])
def test_killed_rank_fails_the_others_within_the_timeout(strategy: str) -> None:
    results = launch(strategy)
    dead = results[-1]
    assert not dead.ok and dead.exitcode == 17
    for res in results[:-1]:
        assert res.ok, res.error
        assert res.value["elapsed"] <= PROMPT_S
        assert "peer rank" in res.value["message"], res.value["message"]
