"""A layer some ranks skip on a factor step: the factor exchange stays aligned and averages
what the ranks that ran it computed.

Two branches of the model are taken by the rows a mask selects (not called when it selects
none), on a factor and inverse step every step, with no optimizer step, so every rank keeps
the same weights:

====  ======================  ======================
step  ``branch``              ``late``
====  ======================  ======================
0     every example           no example
1     rank 0's examples       rank 1's examples
2     no example              every example
3     rank 1's examples       no example
====  ======================  ======================

The reference is independent of the exchange: each rank's own batch statistics, from a
one-process preconditioner on that rank's slice, averaged over the ranks that ran the layer,
then the running average.  A layer no rank ran is not updated (as in one process), and one
that had not run yet has no factors, hence no inverse, on every rank alike.  Every strategy,
with one bucket for all layers (the missing ones sent as zeros after the backward pass) and
one bucket a layer (sent in order, each once its layer is ready).  Before the exchange was
planned, a layer missing on one rank paired rank 0's buckets with different ones of rank 1.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from helpers.distributed import CasesInOneLaunch, strategy_of_case
from helpers.routed import Routed
from kfacperf.kfac.preconditioner import KFACPreconditioner
from kfacperf.workloads import rank_slice

pytestmark = pytest.mark.slow

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 4
DECAY = 0.5
PER_RANK = GLOBAL_BATCH // WORLD
# which ranks' examples take (branch, late) on each step
ROUTES: list[tuple[tuple[int, ...], tuple[int, ...]]] = [
    ((0, 1), ()), ((0,), (1,)), ((), (0, 1)), ((1,), ()),
]
LAYERS = ("stem", "branch", "late", "head")


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    masks = torch.zeros(GLOBAL_BATCH, 2, dtype=torch.bool)
    for i, ranks in enumerate(ROUTES[step]):
        for r in ranks:
            masks[r * PER_RANK:(r + 1) * PER_RANK, i] = True
    return x, y, masks


def _stats(layer: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if layer.a_batch is None:
        return None
    return layer.a_batch.numpy().copy(), layer.g_batch.numpy().copy()


def train(name: str, rank: int, world: int) -> dict[str, Any]:
    """STEPS factor and inverse steps, the weights never updated.  ``local``: this rank's own batch
    statistics per step and layer; otherwise the running factors this rank keeps per step
    (``None`` where the layer has none yet) and which layers have inverse state."""
    model = Routed()
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1, factor_interval=1,
                                 inverse_interval=1, factor_decay=DECAY,
                                 strategy=strategy_of_case(name, world))
    out: dict[str, Any] = {"stats": [], "factors": [], "inverted": []}
    for step in range(STEPS):
        x, y, mask = (rank_slice(t, rank, world) for t in batch(step))
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x, mask), y).backward()
        out["stats"].append({n: _stats(precond.layers[n]) for n in LAYERS})
        precond.step()
        kept = {}
        for n, layer in precond.layers.items():
            if precond.strategy.needs_factors(n):
                kept[n] = (None if not layer.has_factors else
                           (layer.a_factor.numpy().copy(), layer.g_factor.numpy().copy()))
        out["factors"].append(kept)
        out["inverted"].append(sorted(
            n for n, l in precond.layers.items()
            if precond.strategy.inverts(n) and any(getattr(l, a, None) is not None
                                                   for a in l.inverse_names())))
    return out


CASES = ("spngd", "spngd-each", "spngd-fused", "kaisa-f1", "kaisa-f1P-each")
LAUNCH = CasesInOneLaunch(train, CASES, WORLD, timeout_s=240)


def reference() -> list[dict[str, tuple[np.ndarray, np.ndarray] | None]]:
    """Per step, each layer's expected running factors (None before its first statistics)."""
    torch.set_num_threads(1)
    own = [train("local", r, WORLD)["stats"] for r in range(WORLD)]
    running: dict[str, tuple[np.ndarray, np.ndarray] | None] = dict.fromkeys(LAYERS)
    out = []
    for step in range(STEPS):
        for n in LAYERS:
            had = [own[r][step][n] for r in range(WORLD) if own[r][step][n] is not None]
            if not had:
                continue
            a = np.mean([s[0] for s in had], axis=0)
            g = np.mean([s[1] for s in had], axis=0)
            prev = running[n]
            running[n] = (a, g) if prev is None else (
                DECAY * prev[0] + (1 - DECAY) * a, DECAY * prev[1] + (1 - DECAY) * g)
        out.append(dict(running))
    return out


def test_the_premise_each_rank_runs_the_routes_it_is_given() -> None:
    """One process on each rank's slice computes statistics exactly where ROUTES says."""
    for rank in range(WORLD):
        stats = train("local", rank, WORLD)["stats"]
        for step, (branch, late) in enumerate(ROUTES):
            ran = {n for n in LAYERS if stats[step][n] is not None}
            want = {"stem", "head"} | ({"branch"} if rank in branch else set()) | (
                {"late"} if rank in late else set())
            assert ran == want, f"rank {rank} step {step}"


@pytest.mark.parametrize("name", CASES)
def test_factors_are_the_mean_over_the_ranks_that_ran_the_layer(name: str) -> None:
    want = reference()
    got = LAUNCH.values(name)
    for step in range(STEPS):
        seen = set()
        for rank in range(WORLD):
            for n, mine in got[rank]["factors"][step].items():
                seen.add(n)
                expected = want[step][n]
                where = f"{name} step {step} rank {rank} layer {n}"
                if expected is None:
                    assert mine is None, f"{where}: factors before any rank ran the layer"
                    continue
                assert mine is not None, f"{where}: no factors"
                for m, e, which in zip(mine, expected, "AG"):
                    np.testing.assert_allclose(m, e, rtol=1e-5, atol=1e-7,
                                               err_msg=f"{where} {which}")
        assert seen == set(LAYERS), f"{name} step {step}: no rank keeps {set(LAYERS) - seen}"


@pytest.mark.parametrize("name", CASES)
def test_a_layer_no_rank_has_run_has_no_inverse_anywhere(name: str) -> None:
    """``late`` runs first on step 1: no rank inverts it on step 0, its owner does after."""
    got = LAUNCH.values(name)
    for step in range(STEPS):
        inverted = set().union(*(got[r]["inverted"][step] for r in range(WORLD)))
        want = {"stem", "branch", "head"} | ({"late"} if step >= 1 else set())
        assert inverted == want, f"{name} step {step}"
