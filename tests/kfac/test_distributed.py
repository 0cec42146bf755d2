"""Distributed K-FAC equals single-process K-FAC on the whole batch; comm bytes match closed form.

One launch per world size (P = 2 and P = 4 gloo ranks, forked once each) runs every case:
spngd, spngd fused, spngd with triangle packing / per-layer buckets / fp16 factors, kaisa
f = 1, f = 1/P, f = 1/2 (P = 4), each with both inverse methods where it matters, on three
models (a small CNN with GroupNorm, a small transformer with embeddings and LayerNorm — the
non-K-FAC parameters must get averaged gradients too — and a CNN whose BatchNorm is a Fisher
block, unit-wise or full, with the empirical or the Monte-Carlo Fisher).  Each rank trains two
steps on its slice of one global batch (``rank_slice``); the parent runs the same two steps in
one process on the whole batch and compares per-layer preconditioned gradients, the final
``.grad`` of every parameter and the weights.  At P = 4 the CNN (3 K-FAC layers) leaves a
rank that owns nothing.

Bytes: every comm event the strategies and DDP report is checked against the collective's
volume computed here from the layer shapes (see kfacperf.kfac.comm for the convention).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from helpers.distributed import Checks, assert_check, merge_checks, run_ranks
from helpers.recording import RecordingTimer
from kfacperf import vocab as stages
from kfacperf.kfac.assignment import LayerShape, kaisa_assignment
from kfacperf.runtime.training import TrainConfig, Trainer
from kfacperf.workloads import get_workload, rank_slice

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
STEPS = 2
F32 = 4


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    )


def cnn_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,),
                                                                           generator=g)


_TRANSFORMER = dict(vocab_size=32, seq_len=6, d_model=8, num_heads=2, num_layers=1, d_ff=16,
                    num_classes=3)


def transformer() -> nn.Module:
    return get_workload("transformer", **_TRANSFORMER).build_model(seed=3)


def transformer_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return get_workload("transformer", **_TRANSFORMER).make_batch(GLOBAL_BATCH, seed=5, step=step)


def bn_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    )


def bn_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``world`` copies of the same images, each with its own labels.

    A rank's BatchNorm normalises with its own examples' statistics, one process with the
    whole batch's; with copies they are the same.  The backward pass through a BatchNorm
    couples the examples it normalised together (a rank's gradients below it see only its
    own examples), so the BatchNorm is the first layer: nothing below it takes statistics,
    and the runs are comparable however the labels differ.
    """
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(GLOBAL_BATCH // world, 3, 8, 8, generator=g)
    return x.repeat(world, 1, 1, 1), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


MODELS = {"cnn": (tiny_cnn, cnn_batch), "transformer": (transformer, transformer_batch),
          "bn": (bn_cnn, bn_batch)}


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    config: TrainConfig
    rtol: float = 1e-4  # preconditioned gradients, final .grad, weights
    factor_rtol: float = 1e-5  # running-average factors on the ranks that keep them
    worlds: tuple[int, ...] = (2, 4)


BASE = TrainConfig(optimizer="kfac", lr=0.1, momentum=0.9, damping=1e-2, kl_clip=1e-2)


def _cases() -> list[Case]:
    out = [Case(f"sgd-{model}", model, replace(BASE, optimizer="sgd", strategy="sgd"))
           for model in ("cnn", "transformer")]
    for method in ("eigen", "cholesky"):
        base = replace(BASE, inverse_method=method)
        for model in ("cnn", "transformer"):
            out += [
                Case(f"spngd-{method}-{model}", model, replace(base, strategy="spngd")),
                Case(f"spngd-fused-{method}-{model}", model,
                     replace(base, strategy="spngd", fused=True)),
                Case(f"kaisa-f1-{method}-{model}", model, replace(base, strategy="kaisa")),
                Case(f"kaisa-f1P-{method}-{model}", model,
                     replace(base, strategy="kaisa", grad_worker_fraction=0.0)),  # set per P
            ]
        out += [
            Case(f"kaisa-fhalf-{method}-transformer", "transformer",
                 replace(base, strategy="kaisa", grad_worker_fraction=0.5), worlds=(4,)),
            Case(f"spngd-packed-unbucketed-{method}-cnn", "cnn",
                 replace(base, strategy="spngd", symmetric=True, bucket_cap_mb=0.0)),
            Case(f"kaisa-f1P-packed-smallbuckets-{method}-cnn", "cnn",
                 replace(base, strategy="kaisa", grad_worker_fraction=0.0, symmetric=True,
                         bucket_cap_mb=0.002)),
        ]
    out += [
        # BatchNorm layers as Fisher blocks, and the Monte-Carlo Fisher (the labels a rank
        # samples are those one process samples for the same rows of the global batch).
        Case("spngd-bnunit-eigen-bn", "bn", replace(BASE, strategy="spngd", bn_blocks="unit")),
        Case("spngd-bnfull-cholesky-packed-bn", "bn",
             replace(BASE, strategy="spngd", bn_blocks="full", inverse_method="cholesky",
                     symmetric=True)),
        Case("spngd-fused-bnunit-mc-bn", "bn",
             replace(BASE, strategy="spngd", fused=True, bn_blocks="unit", fisher="mc")),
        Case("kaisa-f1-bnunit-cholesky-packed-bn", "bn",
             replace(BASE, strategy="kaisa", bn_blocks="unit", inverse_method="cholesky",
                     symmetric=True)),
        Case("kaisa-f1P-bnfull-eigen-mc-bn", "bn",
             replace(BASE, strategy="kaisa", grad_worker_fraction=0.0, bn_blocks="full",
                     fisher="mc")),
        # Stale statistics: step 1 computes no factors; the fused variant then all-reduces
        # gradients alone.
        Case("spngd-fused-intervals2-transformer", "transformer",
             replace(BASE, strategy="spngd", fused=True, factor_interval=2,
                     inverse_interval=2)),
        Case("kaisa-f1P-intervals2-transformer", "transformer",
             replace(BASE, strategy="kaisa", grad_worker_fraction=0.0, factor_interval=2,
                     inverse_interval=2)),
        # Lower-precision factors: the factors are right to a few roundings of the dtype
        # sent (eps: fp16 2**-10, bf16 2**-7); the preconditioner amplifies that error along
        # weakly damped directions, so updates are only checked for gross errors there.
        Case("spngd-fp16-packed-cnn", "cnn",
             replace(BASE, strategy="spngd", comm_dtype="fp16", symmetric=True),
             rtol=0.5, factor_rtol=4 * 2**-10),
        Case("kaisa-bf16-transformer", "transformer",
             replace(BASE, strategy="kaisa", comm_dtype="bf16"), rtol=0.5,
             factor_rtol=4 * 2**-7),
        Case("spngd-fused-bf16-cnn", "cnn",
             replace(BASE, strategy="spngd", fused=True, comm_dtype="bf16"), rtol=0.5,
             factor_rtol=4 * 2**-7),
    ]
    return out


CASES = _cases()


def for_world(case: Case, world: int) -> TrainConfig:
    cfg = case.config
    if cfg.strategy == "kaisa" and cfg.grad_worker_fraction == 0.0:
        cfg = replace(cfg, grad_worker_fraction=1.0 / world)
    return cfg


def global_batch(case: Case, step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` in a comparison at ``world`` ranks."""
    _, batch = MODELS[case.model]
    return batch(step, world) if case.model == "bn" else batch(step)


def run_case(case: Case, config: TrainConfig, rank: int, world: int,
             data_world: int | None = None) -> dict[str, Any]:
    """Train STEPS steps; the state to compare plus every comm record."""
    build, _ = MODELS[case.model]
    model = build()
    timer = RecordingTimer()
    trainer = Trainer(model, loss_fn=nn.functional.cross_entropy, config=config, timer=timer,
                      seed=11)
    for step in range(STEPS):
        x, y = global_batch(case, step, data_world or world)
        trainer.train_step(rank_slice(x, rank, world), rank_slice(y, rank, world))
    pc = trainer.preconditioner
    stages_seen = sorted({r.stage for r in timer.records})
    comm_records = [(r.step, r.stage, r.layer, r.nbytes) for r in timer.records
                    if r.stage in stages.COMM_STAGES]
    layers = pc.layers if pc is not None else {}
    return {
        "factors": {f"{n}.{f.name}": getattr(l, f.factor_attr).numpy().copy()
                    for n, l in layers.items() if pc.strategy.needs_factors(n)
                    for f in l.factors()},
        "precond": {n: l.precond_grad.detach().numpy().copy() for n, l in layers.items()},
        "grads": {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()},
        "weights": {n: p.detach().numpy().copy() for n, p in model.named_parameters()},
        "comm": comm_records,
        "owned": (pc.strategy.assignment.owned_by(rank)  # type: ignore[attr-defined]
                  if hasattr(getattr(pc, "strategy", None), "assignment") else []),
        "stages": stages_seen,
        "steps_ended": timer.steps_ended,
    }


def suite(rank: int, world: int) -> dict[str, Any]:
    checks = Checks()
    for case in CASES:
        if world in case.worlds:
            checks.run(case.name, run_case, case, for_world(case, world), rank, world)
    return checks.report()


_RESULTS: dict[int, Any] = {}


def launch(world: int) -> Any:
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(suite, world, timeout_s=240, dist_timeout_s=60)
    return _RESULTS[world]


_REFERENCE: dict[tuple[str, int], dict[str, Any]] = {}


def reference(case: Case, world: int) -> dict[str, Any]:
    """The same steps in one process on the whole batch (strategy 'local', or plain SGD)."""
    key = (case.name, world)
    if key not in _REFERENCE:
        cfg = for_world(case, world)
        cfg = replace(cfg, strategy="local" if cfg.optimizer == "kfac" else "sgd")
        torch.set_num_threads(1)
        _REFERENCE[key] = run_case(case, cfg, 0, 1, data_world=world) | {"config": cfg}
    return _REFERENCE[key]


def rel_err(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """Max abs difference over ``max(max|b|, scale)``: relative to the tensor, or to the
    largest tensor of its kind when this one is ~0 (e.g. attention key biases, whose exact
    gradient is zero)."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), scale, 1e-30))


def case_ids(world: int) -> list[Case]:
    return [c for c in CASES if world in c.worlds]


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_completed(world: int) -> None:
    merged = merge_checks(launch(world))
    for case in case_ids(world):
        assert_check(merged, case.name)


def _rank_values(world: int, name: str) -> list[dict[str, Any]]:
    results = launch(world)
    assert_check(merge_checks(results), name)
    return [r.value["values"][name] for r in results]


@pytest.mark.parametrize(
    "world,case", [(w, c) for w in (2, 4) for c in case_ids(w)],
    ids=lambda v: v.name if isinstance(v, Case) else f"P{v}",
)
def test_matches_single_process(world: int, case: Case) -> None:
    ref = reference(case, world)
    values = _rank_values(world, case.name)
    kept = set().union(*(got["factors"] for got in values))
    assert kept == set(ref["factors"]), "some layer's factors are kept on no rank"
    for rank, got in enumerate(values):
        for kind in ("factors", "precond", "grads", "weights"):
            if kind != "factors":
                assert got[kind].keys() == ref[kind].keys()
            tol = case.factor_rtol if kind == "factors" else case.rtol
            scale = 1e-3 * max((np.abs(v).max() for v in ref[kind].values()), default=0.0)
            for name, value in got[kind].items():
                err = rel_err(value, ref[kind][name], scale)
                assert err <= tol, (
                    f"{case.name} P={world} rank {rank}: {kind}[{name}] differs from the "
                    f"single-process run by {err:.2e} (tolerance {tol:.0e})"
                )


@pytest.mark.parametrize(
    "world,case", [(w, c) for w in (2, 4) for c in case_ids(w)],
    ids=lambda v: v.name if isinstance(v, Case) else f"P{v}",
)
def test_steps_report_their_stages(world: int, case: Case) -> None:
    """Every step is bracketed and reports forward, backward and update, plus the
    strategy's own stages (K-FAC compute stages on whoever does the work)."""
    config = for_world(case, world)
    seen_anywhere: set[str] = set()
    for rank, got in enumerate(_rank_values(world, case.name)):
        expected = {stages.FORWARD, stages.BACKWARD, stages.UPDATE}
        expected |= {stage for _, stage in expected_bytes(case, config, world, rank)}
        if config.optimizer == "kfac":
            expected.add(stages.FACTOR_COMPUTE)
        assert got["steps_ended"] == STEPS
        assert set(got["stages"]) - {stages.INVERSE, stages.PRECONDITION} == expected
        seen_anywhere |= set(got["stages"])
    if config.optimizer == "kfac":
        assert {stages.INVERSE, stages.PRECONDITION} <= seen_anywhere


def test_idle_rank_when_more_ranks_than_layers() -> None:
    owned = [v["owned"] for v in _rank_values(4, "spngd-eigen-cnn")]
    assert sorted(len(o) for o in owned) == [0, 1, 1, 1]


# ------------------------------------------------------------------------------ bytes
@dataclass
class Shapes:
    """Layer dims read straight off the modules (independently of kfacperf.kfac.layers)."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (dim_a, dim_g)
    bn: dict[str, int] = field(default_factory=dict)  # BatchNorm blocks: name -> channels
    other_numel: int = 0
    all_numel: int = 0


def shapes_of(model: nn.Module, bn_blocks: str = "none") -> Shapes:
    """``layers``: name -> (dim_a, dim_g) of the gradient matrix; a BatchNorm's is C x 2."""
    out = Shapes()
    covered = set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight
            dim_a = w[0].numel() + (m.bias is not None)
            out.layers[name] = (dim_a, w.shape[0])
            covered |= {id(p) for p in m.parameters(recurse=False)}
        elif isinstance(m, nn.BatchNorm2d) and bn_blocks != "none":
            out.layers[name] = (2, m.num_features)
            out.bn[name] = m.num_features
            covered |= {id(p) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        out.all_numel += p.numel()
        if id(p) not in covered:
            out.other_numel += p.numel()
    return out


def factor_elems(n: int, packed: bool) -> int:
    return n * (n + 1) // 2 if packed else n * n


def inverse_elems(dim_a: int, dim_g: int, method: str, packed: bool) -> int:
    if method == "eigen":  # eigenvectors (never packed) and eigenvalues
        return dim_a * dim_a + dim_g * dim_g + dim_a + dim_g
    return factor_elems(dim_a, packed) + factor_elems(dim_g, packed)


def block_elems(sh: Shapes, name: str, mode: str, packed: bool) -> int:
    """The layer's statistics: A and G, or a BatchNorm's C 2x2 blocks or its 2C x 2C block."""
    if name not in sh.bn:
        dim_a, dim_g = sh.layers[name]
        return factor_elems(dim_a, packed) + factor_elems(dim_g, packed)
    c = sh.bn[name]
    return c * factor_elems(2, packed) if mode == "unit" else factor_elems(2 * c, packed)


def bn_inverse_elems(c: int, mode: str, method: str, packed: bool) -> int:
    """Unit-wise: C damped 2x2 inverses; full: eigenvectors and values, or one inverse."""
    if mode == "unit":
        return c * factor_elems(2, packed)
    if method == "eigen":
        return 4 * c * c + 2 * c
    return factor_elems(2 * c, packed)


def expected_bytes(case: Case, config: TrainConfig, world: int, rank: int
                   ) -> dict[tuple[int, str], int]:
    """(step, stage) -> total payload bytes this rank takes part in."""
    sh = shapes_of(MODELS[case.model][0](), config.bn_blocks)
    fsize = {"fp32": 4, "fp16": 2, "bf16": 2}[config.comm_dtype]
    packed = config.symmetric
    # each layer's statistics, and the flag of whether this rank had them
    factors = (sum(block_elems(sh, n, config.bn_blocks, packed) for n in sh.layers)
               + len(sh.layers)) * fsize
    # each layer's gradient, and the flag of whether this rank had it (spngd reduces both)
    kfac_grads = (sum(a * g for a, g in sh.layers.values()) + len(sh.layers)) * F32
    precond = sum(a * g + 1 for a, g in sh.layers.values()) * F32
    out: dict[tuple[int, str], int] = {}
    for step in range(STEPS):
        factor_step = step % config.factor_interval == 0
        inverse_step = step % config.inverse_interval == 0
        e: dict[str, int] = {}
        if config.optimizer == "sgd":
            e[stages.GRAD_COMM] = sh.all_numel * F32
        elif config.strategy == "spngd":
            if config.fused:
                grads = kfac_grads + sh.other_numel * F32
                if factor_step and fsize == F32:
                    e[stages.FACTOR_COMM] = factors + grads
                else:
                    e[stages.GRAD_COMM] = grads
                    if factor_step:
                        e[stages.FACTOR_COMM] = factors
            else:
                e[stages.GRAD_COMM] = kfac_grads + sh.other_numel * F32
                if factor_step:
                    e[stages.FACTOR_COMM] = factors
            e[stages.PRECOND_COMM] = precond
        else:  # kaisa
            gw = round(config.grad_worker_fraction * world)
            e[stages.GRAD_COMM] = sh.all_numel * F32  # DDP buckets cover every parameter
            if factor_step:
                e[stages.FACTOR_COMM] = factors
            if gw > 1 and inverse_step:
                blocks = {n: ((2, c),) if config.bn_blocks == "unit" else ((2 * c, 1),)
                          for n, c in sh.bn.items()}
                assign = kaisa_assignment(
                    [LayerShape(name=n, dim_a=a, dim_g=g, blocks=blocks.get(n, ()))
                     for n, (a, g) in sh.layers.items()],
                    world, config.grad_worker_fraction)
                e[stages.INVERSE_COMM] = sum(
                    (bn_inverse_elems(sh.bn[n], config.bn_blocks, config.inverse_method, packed)
                     if n in sh.bn else inverse_elems(a, g, config.inverse_method, packed)) * F32
                    for n, (a, g) in sh.layers.items() if rank in assign.grad_workers[n])
            if gw < world:
                e[stages.PRECOND_COMM] = precond
        for stage, nbytes in e.items():
            out[(step, stage)] = nbytes
    return out


@pytest.mark.parametrize(
    "world,case", [(w, c) for w in (2, 4) for c in case_ids(w)],
    ids=lambda v: v.name if isinstance(v, Case) else f"P{v}",
)
def test_comm_bytes_match_closed_form(world: int, case: Case) -> None:
    config = for_world(case, world)
    for rank, got in enumerate(_rank_values(world, case.name)):
        totals: dict[tuple[int, str], int] = {}
        for step, stage, _layer, nbytes in got["comm"]:
            totals[(step, stage)] = totals.get((step, stage), 0) + nbytes
        assert totals == expected_bytes(case, config, world, rank), f"rank {rank}"


def test_unbucketed_factor_events_are_one_per_layer() -> None:
    """bucket_cap_mb=0: one reduce-scatter-v per layer, labelled with it, of its own size
    (its two packed factors and its presence flag)."""
    got = _rank_values(2, "spngd-packed-unbucketed-eigen-cnn")[0]["comm"]
    sh = shapes_of(tiny_cnn())
    events = {layer: nbytes for step, stage, layer, nbytes in got
              if step == 0 and stage == stages.FACTOR_COMM}
    assert events == {n: (factor_elems(a, True) + factor_elems(g, True) + 1) * F32
                      for n, (a, g) in sh.layers.items()}


def test_bucketed_factor_event_covers_all_layers_in_backward_order() -> None:
    got = _rank_values(2, "spngd-eigen-cnn")[0]["comm"]
    labels = [layer for step, stage, layer, _ in got if step == 0 and stage == stages.FACTOR_COMM]
    assert labels == ["5+3+0"]  # one bucket, last layer first
