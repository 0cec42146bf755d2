"""Distributed K-FAC on 3 and 4 gloo ranks: a world that is not a power of two, and worlds
with more ranks than K-FAC layers (``mlp``: 2 layers) and fewer (``deep``: 6 layers).

One launch per world size runs every case; each rank trains on its slice of a global batch
of 12 (``rank_slice``) through :class:`~kfacperf.runtime.training.Trainer` (KAISA with DDP)
for spngd, fused spngd, KAISA f = 1, f = 1/P and, at 4 ranks, f = 1/2, across both inverse
methods, triangle packing, one bucket a layer (``bucket_cap_mb=0``) and the default buckets,
factor/inverse intervals 1/1 and 2/4, fp32/bf16/fp16 factors, and BatchNorm Fisher blocks
(unit-wise and full).  The reference is one process on the whole batch (strategy ``local``):
fp32 factors are checked tightly; 16-bit factors to a few roundings of the dtype sent (bf16
eps 2**-7, fp16 2**-10), the gradients and weights only for gross errors (the preconditioner
amplifies the factors' rounding along weakly damped directions, and the weights' error feeds
back through the later steps).

Every rank must also end each case with the same weights and gradients, bit for bit: the
ranks of a data-parallel run are replicas.  KAISA with several gradient workers per layer
once broke that: the inverse worker kept its eigenvectors (or damped inverses) laid out
column-major as ``linalg.eigh`` returns them while the other workers of its column rebuilt
row-major copies from the broadcast, and a matrix product rounds differently with a
transposed operand, so the replicas drifted apart by a few ulps a step.

Cases ``skip/...`` run a model whose branches some ranks' examples skip on a factor step
(:mod:`helpers.routed`, as in test_distributed_skipped_factors.py, with routes spread over
3 and 4 ranks): every layer's running factors must be the mean of the statistics of the
ranks that ran it, computed independently by one process on each rank's slice.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from helpers.distributed import CasesInOneLaunch
from helpers.routed import Routed
from kfacperf.kfac.preconditioner import KFACPreconditioner
from kfacperf.kfac.strategies import make_strategy
from kfacperf.runtime.training import TrainConfig, Trainer
from kfacperf.workloads import rank_slice

pytestmark = pytest.mark.slow

WORLDS = (3, 4)
GLOBAL_BATCH = 12
EPS = {"fp32": 0.0, "bf16": 2.0**-7, "fp16": 2.0**-10}


def mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5))


def deep() -> nn.Module:
    torch.manual_seed(3)
    dims = (6, 9, 8, 7, 6, 5, 5)
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def bn_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 5),
    )


def batch(model: str, step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch; for ``bn``, ``world`` copies of the same images (a rank's
    BatchNorm then normalises with the statistics one process computes on the whole batch)."""
    g = torch.Generator().manual_seed(100 * len(model) + step)
    if model == "bn":
        x = torch.randn(GLOBAL_BATCH // world, 3, 6, 6, generator=g).repeat(world, 1, 1, 1)
    else:
        x = torch.randn(GLOBAL_BATCH, 6, generator=g)
    return x, torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


MODELS = {"mlp": mlp, "deep": deep, "bn": bn_net}
BASE = TrainConfig(optimizer="kfac", lr=0.1, momentum=0.9, damping=1e-2, kl_clip=1e-2)
STRATEGIES: dict[str, dict[str, Any]] = {
    "spngd": {"strategy": "spngd"}, "spngd-fused": {"strategy": "spngd", "fused": True},
    "kaisa-f1": {"strategy": "kaisa"}, "kaisa-f1P": {"strategy": "kaisa"},
    "kaisa-fhalf": {"strategy": "kaisa", "grad_worker_fraction": 0.5},
}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (model, TrainConfig fields)
    "deep-eigen": ("deep", {}),
    "deep-cholesky-each": ("deep", {"inverse_method": "cholesky", "bucket_cap_mb": 0.0}),
    "mlp-eigen-packed-each": ("mlp", {"symmetric": True, "bucket_cap_mb": 0.0}),
    "deep-intervals24-cholesky-packed": ("deep", {
        "factor_interval": 2, "inverse_interval": 4, "inverse_method": "cholesky",
        "symmetric": True}),
    "bnunit-eigen": ("bn", {"bn_blocks": "unit"}),
    "bnfull-cholesky-packed-each": ("bn", {
        "bn_blocks": "full", "inverse_method": "cholesky", "symmetric": True,
        "bucket_cap_mb": 0.0}),
    "deep-bf16": ("deep", {"comm_dtype": "bf16"}),
    "mlp-fp16-packed-each": ("mlp", {"comm_dtype": "fp16", "symmetric": True,
                                     "bucket_cap_mb": 0.0}),
}
SKIPS = ("spngd", "spngd-fused", "kaisa-f1", "kaisa-f1P", "kaisa-fhalf")


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    config: TrainConfig
    steps: int = 3


def cases(world: int) -> dict[str, Case]:
    out: dict[str, Case] = {}
    strategies = {s: dict(o) for s, o in STRATEGIES.items() if s != "kaisa-fhalf" or world == 4}
    strategies["kaisa-f1P"]["grad_worker_fraction"] = 1.0 / world
    for s, opts in strategies.items():
        for v, (model, fields) in VARIANTS.items():
            cfg = replace(BASE, **opts, **fields)
            steps = 5 if cfg.inverse_interval > 1 else 3  # step 4 inverts factors of 0, 2, 4
            out[f"{s}-{v}"] = Case(f"{s}-{v}", model, cfg, steps)
        if s in SKIPS:
            out[f"skip/{s}"] = Case(f"skip/{s}", "routed", replace(BASE, **opts), ROUTED_STEPS)
            each = replace(BASE, **opts, bucket_cap_mb=0.0, symmetric=True)
            out[f"skip/{s}-packed-each"] = Case(f"skip/{s}-packed-each", "routed", each,
                                                ROUTED_STEPS)
    return out


def train(name: str, rank: int, world: int) -> dict[str, Any]:
    case = CASES[world][name]
    if case.model == "routed":
        return train_routed(case.config, rank, world)
    return train_case(case, case.config, rank, world, world)


def train_case(case: Case, config: TrainConfig, rank: int, world: int,
               data_world: int) -> dict[str, Any]:
    """``case.steps`` steps; the final gradients, weights and the running factors kept."""
    model = MODELS[case.model]()
    trainer = Trainer(model, loss_fn=nn.functional.cross_entropy, config=config, seed=11)
    for step in range(case.steps):
        x, y = batch(case.model, step, data_world)
        trainer.train_step(rank_slice(x, rank, world), rank_slice(y, rank, world))
    pc = trainer.preconditioner
    assert pc is not None
    return {
        "grads": {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()
                  if p.grad is not None},
        "weights": {n: p.detach().numpy().copy() for n, p in model.named_parameters()},
        "factors": {f"{n}.{f.name}": getattr(l, f.factor_attr).numpy().copy()
                    for n, l in pc.layers.items() if pc.strategy.needs_factors(n)
                    for f in l.factors()},
    }


# ------------------------------------------------------------------ layers ranks skip
ROUTED_STEPS = 5
DECAY = 0.5
ROUTED_LAYERS = ("stem", "branch", "late", "head")


def routes(world: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per step, the ranks whose examples take (``branch``, ``late``)."""
    every, last = tuple(range(world)), world - 1
    return [(every, ()), ((0,), every[1:]), ((), every), ((last,), ()), ((1,), (0, last))]


def routed_batch(step: int, world: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    masks = torch.zeros(GLOBAL_BATCH, 2, dtype=torch.bool)
    per = GLOBAL_BATCH // world
    for i, ranks in enumerate(routes(world)[step]):
        for r in ranks:
            masks[r * per:(r + 1) * per, i] = True
    return x, y, masks


def routed_strategy(config: TrainConfig) -> Any:
    if config.strategy == "local":
        return None
    opts: dict[str, Any] = {"comm_dtype": config.comm_dtype, "symmetric": config.symmetric,
                            "bucket_cap_mb": config.bucket_cap_mb}
    if config.strategy == "spngd":
        opts["fused"] = config.fused
    else:
        opts.update(grad_worker_fraction=config.grad_worker_fraction, average_gradients=True)
    return make_strategy(config.strategy, **opts)


def train_routed(config: TrainConfig, rank: int, world: int) -> dict[str, Any]:
    """Factor and inverse steps, the weights never updated: per step, this rank's own batch
    statistics (strategy ``local``) or the running factors it keeps (None: none yet), and
    the layers it holds inverse state of."""
    model = Routed()
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1, factor_interval=1,
                                 inverse_interval=1, factor_decay=DECAY,
                                 strategy=routed_strategy(config))
    out: dict[str, Any] = {"stats": [], "factors": [], "inverted": []}
    for step in range(ROUTED_STEPS):
        x, y, mask = (rank_slice(t, rank, world) for t in routed_batch(step, world))
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x, mask), y).backward()
        out["stats"].append({n: None if l.a_batch is None else
                             (l.a_batch.numpy().copy(), l.g_batch.numpy().copy())
                             for n, l in precond.layers.items()})
        precond.step()
        out["factors"].append({
            n: (l.a_factor.numpy().copy(), l.g_factor.numpy().copy()) if l.has_factors
            else None for n, l in precond.layers.items() if precond.strategy.needs_factors(n)})
        out["inverted"].append({n for n, l in precond.layers.items()
                                if precond.strategy.inverts(n) and l.has_inverse})
    return out


def routed_reference(world: int) -> list[dict[str, Any]]:
    """Per step, each layer's running factors from the mean of the statistics of the ranks
    that ran it (each rank's from one process on its slice); None before any rank ran it."""
    own = [train_routed(replace(BASE, strategy="local"), r, world)["stats"]
           for r in range(world)]
    running: dict[str, Any] = dict.fromkeys(ROUTED_LAYERS)
    out = []
    for step in range(ROUTED_STEPS):
        for n in ROUTED_LAYERS:
            had = [own[r][step][n] for r in range(world) if own[r][step][n] is not None]
            if had:
                new = [np.mean([s[i] for s in had], axis=0) for i in (0, 1)]
                prev = running[n]
                running[n] = new if prev is None else [
                    DECAY * p + (1 - DECAY) * b for p, b in zip(prev, new)]
        out.append(dict(running))
    return out


# ------------------------------------------------------------------------------ tests
CASES = {w: cases(w) for w in WORLDS}
LAUNCHES = {w: CasesInOneLaunch(train, list(CASES[w]), w, timeout_s=300, dist_timeout_s=60)
            for w in WORLDS}
_REFERENCE: dict[tuple[int, str], Any] = {}


def reference(world: int, name: str) -> Any:
    """One process on the whole global batch (the routed cases: see routed_reference)."""
    case = CASES[world][name]
    key = (world, "routed" if case.model == "routed" else name)
    if key not in _REFERENCE:
        torch.set_num_threads(1)
        if case.model == "routed":
            _REFERENCE[key] = routed_reference(world)
        else:
            local = replace(case.config, strategy="local", fused=False, grad_worker_fraction=1.0)
            _REFERENCE[key] = train_case(case, local, 0, 1, world)
    return _REFERENCE[key]


def rel_err(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), scale, 1e-30))


def params(model_cases: str) -> list[Any]:
    return [pytest.param(w, n, id=f"P{w}-{n}") for w in WORLDS for n in CASES[w]
            if (n.startswith("skip/")) == (model_cases == "routed")]


@pytest.mark.parametrize("world,name", params("trained"))
def test_matches_single_process(world: int, name: str) -> None:
    case = CASES[world][name]
    ref = reference(world, name)
    got = LAUNCHES[world].values(name)
    eps = EPS[case.config.comm_dtype]
    tol = {"factors": 4 * eps or 1e-5, "grads": 0.5 if eps else 1e-4,
           "weights": 0.25 if eps else 1e-4}
    assert set().union(*(g["factors"] for g in got)) == set(ref["factors"]), (
        "some layer's factors are kept on no rank")
    for rank, mine in enumerate(got):
        for kind in ("factors", "grads", "weights"):
            if kind != "factors":
                assert mine[kind].keys() == ref[kind].keys(), f"rank {rank} {kind}"
            scale = 1e-3 * max(np.abs(v).max() for v in ref[kind].values())
            for n, value in mine[kind].items():
                err = rel_err(value, ref[kind][n], scale)
                assert err <= tol[kind], (
                    f"{name} P={world} rank {rank}: {kind}[{n}] differs from one process by "
                    f"{err:.2e} (tolerance {tol[kind]:.0e})")


@pytest.mark.parametrize("world,name", params("trained"))
def test_every_rank_ends_with_the_same_model(world: int, name: str) -> None:
    got = LAUNCHES[world].values(name)
    for rank in range(1, world):
        for kind in ("grads", "weights"):
            assert got[rank][kind].keys() == got[0][kind].keys()
            for n, value in got[rank][kind].items():
                np.testing.assert_array_equal(
                    value, got[0][kind][n], err_msg=f"{name} P={world}: rank {rank}'s "
                    f"{kind}[{n}] differs from rank 0's")


@pytest.mark.parametrize("world", WORLDS)
def test_the_routes_skip_what_they_say(world: int) -> None:
    """The premise: one process on a rank's slice computes statistics where routes() says."""
    for rank in range(world):
        stats = train_routed(replace(BASE, strategy="local"), rank, world)["stats"]
        for step, (branch, late) in enumerate(routes(world)):
            want = {"stem", "head"} | ({"branch"} if rank in branch else set()) | (
                {"late"} if rank in late else set())
            assert {n for n, s in stats[step].items() if s is not None} == want


@pytest.mark.parametrize("world,name", params("routed"))
def test_skipped_layer_factors_are_the_mean_over_the_ranks_that_ran_it(
        world: int, name: str) -> None:
    want = reference(world, name)
    got = LAUNCHES[world].values(name)
    for step in range(ROUTED_STEPS):
        kept = set()
        for rank in range(world):
            for n, mine in got[rank]["factors"][step].items():
                kept.add(n)
                where = f"{name} P={world} step {step} rank {rank} layer {n}"
                if want[step][n] is None:
                    assert mine is None, f"{where}: factors before any rank ran the layer"
                    continue
                assert mine is not None, f"{where}: no factors"
                for m, e, which in zip(mine, want[step][n], "AG"):
                    np.testing.assert_allclose(m, e, rtol=1e-5, atol=1e-7,
                                               err_msg=f"{where} {which}")
        assert kept == set(ROUTED_LAYERS), f"{name} step {step}: layers kept on no rank"
        inverted = set().union(*(got[r]["inverted"][step] for r in range(world)))
        assert inverted == {"stem", "branch", "head"} | ({"late"} if step else set())
