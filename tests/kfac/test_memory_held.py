"""The K-FAC memory per GPU that ``kfacperf simulate`` prints and ``kfacperf plan`` checks
(:mod:`kfacperf.sim.graphs.memory`) is what the real optimizer holds.

Over two K-FAC steps (each refreshing statistics and inverses) every rank's registered layers
are weighed: the bytes of their batch statistics as the step's update receives them (after the
strategy's ``finish_factors``: ``statistics``), and after the step those of their running
averages (``running``: the statistics must be released by then) and of their inverse state
(``inverses``).  Each rank's figure must equal the model's for that rank
under the placement the simulator computes (which must be the optimizer's own assignment),
and the largest of them the figure reported per GPU.  One process for the local optimizer;
one launch of four gloo ranks for SP-NGD (a rank that owns nothing included) and KAISA
(COMM-OPT, HYBRID-OPT, MEM-OPT), both inverse methods, triangle packing and BatchNorm blocks.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from helpers.distributed import run_ranks
from kfacperf.kfac.comm import CommOptions
from kfacperf.kfac.preconditioner import KFACPreconditioner
from kfacperf.kfac.strategies.kaisa import KAISAStrategy
from kfacperf.kfac.strategies.spngd import SPNGDStrategy
from kfacperf.sim.costs import blocks
from kfacperf.sim.graphs.memory import FisherBlock, kfac_state_of_rank, kfac_state_per_gpu
from kfacperf.sim.graphs.placement import (
    Placement,
    blocks_cost,
    kaisa_placement,
    spngd_placement,
)

WORLD = 4
GLOBAL_BATCH = 8

# (strategy, kaisa fraction, inverse method, symmetric packing, bn_blocks)
CASES: list[tuple[str, float, str, bool, str]] = [
    ("spngd", 1.0, "eigen", False, "none"),
    ("spngd", 1.0, "cholesky", True, "full"),
    ("kaisa", 1.0, "cholesky", True, "none"),
    ("kaisa", 0.5, "eigen", False, "unit"),
    ("kaisa", 0.25, "eigen", False, "full"),
]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    )


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _weigh(precond: KFACPreconditioner, attr: str) -> tuple[int, dict[int, int]]:
    """Bytes of every layer's factors' ``attr`` (``batch_attr``/``factor_attr``), and the
    storages they live in (by address)."""
    total, storages = 0, {}
    for layer in precond.layers.values():
        for f in layer.factors():
            t = getattr(layer, getattr(f, attr))
            total += _nbytes(t)
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return total, storages


def weigh_statistics_in_step(precond: KFACPreconditioner) -> list[int]:
    """Bytes of the batch statistics each factor step's update receives (appended per step)."""
    seen: list[int] = []
    strategy = precond.strategy
    finish = strategy.finish_factors

    def finish_and_weigh() -> None:
        finish()
        seen.append(_weigh(precond, "batch_attr")[0])

    strategy.finish_factors = finish_and_weigh  # type: ignore[method-assign]
    return seen


def held(precond: KFACPreconditioner, statistics: list[int]) -> dict[str, Any]:
    """What the rank's layers held in its last step and hold after it, and the layers as the
    memory model sees them."""
    released, _ = _weigh(precond, "batch_attr")
    assert released == 0, "batch statistics outlived the step"
    running, storages = _weigh(precond, "factor_attr")
    inverses = 0
    for layer in precond.layers.values():
        inverses += sum(_nbytes(getattr(layer, n)) for n in layer.inverse_names())
    fisher: list[FisherBlock] = [
        (blocks.KRONECKER if l.kronecker else l.mode, l.dim_a, l.dim_g)  # type: ignore[attr-defined]
        for l in precond.layers.values()]
    a = getattr(precond.strategy, "assignment", None)
    names = list(precond.layers)
    assignment = None if a is None else (
        tuple(a.inverse_worker[n] for n in names), tuple(a.grad_workers[n] for n in names))
    return dict(statistics=statistics[-1], running=running, inverses=inverses,
                storage=sum(storages.values()), fisher=fisher, assignment=assignment)


def train(strategy: Any, method: str, bn_blocks: str, rank: int, world: int) -> dict[str, Any]:
    net = model()
    precond = KFACPreconditioner(net, damping=1e-3, lr=0.1, strategy=strategy,
                                 inverse_method=method, bn_blocks=bn_blocks)
    statistics = weigh_statistics_in_step(precond)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g)
        y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)
        share = GLOBAL_BATCH // world
        net.zero_grad()
        loss = nn.functional.cross_entropy(net(x[rank * share:(rank + 1) * share]),
                                           y[rank * share:(rank + 1) * share])
        loss.backward()
        precond.step()
    assert len(statistics) == 2
    return held(precond, statistics)


def suite(rank: int, world: int) -> list[dict[str, Any]]:
    out = []
    for name, fraction, method, symmetric, bn in CASES:
        comm = CommOptions(symmetric=symmetric)
        strategy = (SPNGDStrategy(comm_options=comm) if name == "spngd" else
                    KAISAStrategy(grad_worker_fraction=fraction, comm_options=comm,
                                  average_gradients=True))
        out.append(train(strategy, method, bn, rank, world))
    return out


def placement(name: str, fraction: float, fisher: list[FisherBlock]) -> Placement:
    costs = [blocks_cost(blocks.stacks(*b)) for b in fisher]
    if name == "spngd":
        return spngd_placement(costs, WORLD)
    return kaisa_placement(costs, WORLD, round(fraction * WORLD))


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_local_optimizer_holds_statistics_running_averages_and_inverses(method: str) -> None:
    got = train(None, method, "unit", 0, 1)
    pl = Placement(world_size=1, gw=1, column=(0,) * len(got["fisher"]),
                   inverse_worker=(0,) * len(got["fisher"]))
    state = kfac_state_per_gpu(got["fisher"], pl, method)
    assert (got["statistics"], got["running"], got["inverses"]) == (
        state.statistics, state.running, state.inverses)
    assert got["storage"] == got["running"]  # no tensor is a view into something larger


@pytest.mark.slow
def test_every_rank_holds_what_the_memory_model_says() -> None:
    results = run_ranks(suite, WORLD, timeout_s=240, dist_timeout_s=60)
    bad = [r.error for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    for i, (name, fraction, method, _, _) in enumerate(CASES):
        per_rank = [r.value[i] for r in results]
        fisher = per_rank[0]["fisher"]
        pl = placement(name, fraction, fisher)
        # the simulator's placement is the optimizer's assignment
        workers, grad_workers = per_rank[0]["assignment"]
        assert workers == pl.inverse_worker, CASES[i]
        assert grad_workers == tuple(tuple(pl.column_members(c)) for c in pl.column), CASES[i]
        for rank, got in enumerate(per_rank):
            model_state = kfac_state_of_rank(fisher, pl, method, rank)
            assert (got["statistics"], got["running"], got["inverses"]) == (
                model_state.statistics, model_state.running, model_state.inverses), (
                    CASES[i], rank)
            # nothing kept is a view into a released communication buffer
            assert got["storage"] == got["running"], (CASES[i], rank)
        most = max(range(WORLD), key=lambda r: sum(
            per_rank[r][k] for k in ("statistics", "running", "inverses")))
        state = kfac_state_per_gpu(fisher, pl, method)
        assert (state.statistics, state.running, state.inverses) == (
            per_rank[most]["statistics"], per_rank[most]["running"],
            per_rank[most]["inverses"]), CASES[i]
