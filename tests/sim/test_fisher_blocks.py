"""BatchNorm Fisher blocks and the Monte-Carlo Fisher in the simulator, against closed forms.

A tiny workload (conv -> BatchNorm(16) -> fc) on a device of round rates (1 TFLOP/s, 100 GB/s,
efficiency 1, a distinct per-call overhead per stage): a BatchNorm block's stage times, its
bytes, its placement and a whole step are worked out by hand from the work each stage does.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from helpers.sim_fakes import fake_collective_us, real_assignment
from kfacperf import vocab as S
from kfacperf.sim.costs.model import CostModel
from kfacperf.sim.engine import run_step
from kfacperf.sim.graphs.layer_costs import layer_costs
from kfacperf.sim.graphs.placement import spngd_placement
from kfacperf.sim.graphs.strategies import build_graph, make_step, parse_strategy
from kfacperf.sim.graphs.strategies.common import CommSettings, StepSpec
from kfacperf.sim.models.cluster import OPS, ClusterModel, Tier
from kfacperf.sim.models.device import STAGE_KINDS, DeviceModel, StageEfficiency
from kfacperf.sim.models.workload import LayerModel, WorkloadModel
from kfacperf.sim.sweep import simulate
from kfacperf.vocab import FACTOR_STEP, INVERSE_STEP, PLAIN_STEP

C, S_BN, N = 16, 1024, 8
CONV = LayerModel(name="conv", kind="conv2d", dim_a=28, dim_g=C, params=448, rows_per_example=S_BN,
                  fwd_flops_per_example=2 * 27 * C * S_BN, in_elems_per_example=3072,
                  out_elems_per_example=C * S_BN)
BN = LayerModel(name="bn", kind="batchnorm", dim_a=2, dim_g=C, params=2 * C,
                rows_per_example=S_BN, fwd_flops_per_example=0.0,
                in_elems_per_example=C * S_BN, out_elems_per_example=C * S_BN, follows="conv")
FC = LayerModel(name="fc", kind="linear", dim_a=17, dim_g=10, params=170, rows_per_example=1,
                fwd_flops_per_example=2 * 16 * 10, in_elems_per_example=16,
                out_elems_per_example=10)
W = WorkloadModel(name="w", layers=(CONV, FC), batchnorm=(BN,), other_params=2 * C,
                  other_fwd_flops_per_example=0.0, input_shape=(3, 32, 32),
                  input_dtype="float32", source="test")
OVERHEAD = {"forward": 1.0, "backward": 2.0, "factor_compute": 4.0, "inverse": 50.0,
            "precondition": 5.0, "update": 6.0}


def device(tflops: float = 1.0, **kw) -> DeviceModel:
    """``tflops`` x 1e6 FLOP and 1e5 bytes per microsecond, efficiency 1."""
    return DeviceModel(
        name="d", fp32_tflops=tflops, tf32_tflops=0.0, bf16_tflops=2 * tflops,
        mem_bandwidth_GBps=100.0,
        stages={k: StageEfficiency(efficiency=1.0, mem_efficiency=1.0, overhead_us=OVERHEAD[k],
                                   assumed=True) for k in STAGE_KINDS},
        mode="roofline", **kw)


def cluster() -> ClusterModel:
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    tier = Tier(alpha_us=1.0, bandwidth_GBps=10.0, algorithms=algos)
    return ClusterModel(name="c", gpus_per_node=4, intra=tier, inter=tier,
                        multi_node={op: "flat" for op in OPS})


def cost(**kw) -> CostModel:
    dev = kw.pop("device", None) or device()
    return CostModel(workload=W, device=dev, cluster=cluster(), **kw)


def hand(mode: str, method: str, tflops: float = 1.0) -> dict[str, float]:
    """Per stage, by the table in kfacperf.sim.costs.stage_work, at N = 8, C = 16, S = 1024
    (a full block has side 2C = 32): microseconds of one call."""

    def us(flops: float, nbytes: float) -> float:
        return max(flops / (tflops * 1e6), nbytes / 1e5)

    normalise = us(6 * N * C * S_BN, 4 * (2 * N * C * S_BN + 2 * N * C))
    if mode == "unit":  # inverted in closed form whatever the method
        return {
            "factor_compute": 4 + normalise + us(8 * N * C, 4 * (2 * N * C + 4 * C))
            + us(3 * 4 * C, 4 * 3 * 4 * C),
            "inverse": 50 + us(10 * C, 4 * 2 * 4 * C),  # C 2x2 inverses in one call
            "precondition": 5 + us(8 * C, 4 * (4 * C + 4 * C)),
        }
    eigen = method == "eigen"
    return {
        "factor_compute": 4 + normalise + us(2 * N * 32 ** 2, 4 * (2 * N * C + 32 ** 2))
        + us(3 * 32 ** 2, 4 * 3 * 32 ** 2),
        "inverse": 50 + us((9 if eigen else 1) * 32 ** 3, 12 * 32 ** 2),
        "precondition": 5 + us((4 if eigen else 2) * 32 ** 2, 4 * (32 ** 2 + 4 * C)),
    }


CASES = [(m, k) for m in ("unit", "full") for k in ("eigen", "cholesky")]


@pytest.mark.parametrize("tflops", [1.0, 0.001], ids=["memory-bound", "compute-bound"])
@pytest.mark.parametrize("mode,method", CASES, ids=lambda v: str(v))
def test_batchnorm_stage_times_are_the_closed_form(mode: str, method: str, tflops: float
                                                   ) -> None:
    c = cost(bn_blocks=mode, inverse_method=method, device=device(tflops))
    for stage, want in hand(mode, method, tflops).items():
        assert c.compute_us(stage, BN, batch=N) == pytest.approx(want, rel=1e-12), stage


def test_batchnorm_has_no_forward_or_backward_share_and_whole_model_work_is_unchanged() -> None:
    plain, unit = cost(), cost(bn_blocks="unit")
    for stage in (S.FORWARD, S.BACKWARD):
        assert unit.compute_us(stage, BN, batch=N) == 0.0
        assert unit.compute_us(stage, None, batch=N) == plain.compute_us(stage, None, batch=N)
    assert unit.compute_us(S.UPDATE, None, batch=N) == plain.compute_us(S.UPDATE, None, batch=N)
    inverse = cost(bn_blocks="unit").regressors(S.INVERSE, BN, batch=N)
    assert inverse.calls == 1  # C 2x2 inverses in one call: its time is the call's overhead


def _step_us(strategy: str, kind, gpus: int = 1, **options) -> float:
    spec = StepSpec(costs=layer_costs(cost(**options), W, batch=N), world_size=gpus,
                    gpus_per_node=4, kind=kind, comm=CommSettings())
    graph = build_graph(make_step(parse_strategy(strategy), spec), fake_collective_us)
    return run_step(graph).step_us


@pytest.mark.parametrize("mode,method", CASES, ids=lambda v: str(v))
def test_one_gpu_step_adds_exactly_the_blocks_work(mode: str, method: str) -> None:
    """On one GPU a step is all compute: the block adds its factor, inverse and precondition
    time on inverse steps, its factor time on factor steps, its preconditioning on plain
    steps (with the inverse it keeps)."""
    times = hand(mode, method)
    factor, inverse, precond = (times[s] for s in (S.FACTOR_COMPUTE, S.INVERSE, S.PRECONDITION))
    for strategy in ("spngd", "kaisa"):
        for kind, extra in ((INVERSE_STEP, factor + inverse + precond),
                            (FACTOR_STEP, factor + precond), (PLAIN_STEP, precond)):
            base = _step_us(strategy, kind, inverse_method=method)
            got = _step_us(strategy, kind, inverse_method=method, bn_blocks=mode)
            assert got - base == pytest.approx(extra, rel=1e-9), (strategy, kind.name)


@pytest.mark.parametrize("strategy", ["spngd", "kaisa"])
def test_mc_adds_one_backward_on_factor_steps_only(strategy: str) -> None:
    """The Monte-Carlo pass is a whole backward with the statistics captured (slower by the
    capture overhead), then the true backward is a plain one: the factor step is longer by
    exactly one plain backward."""
    dev = device(capture_overhead={"backward": 0.5})
    backward = cost(device=dev).compute_us(S.BACKWARD, None, batch=N)
    for kind, extra in ((INVERSE_STEP, backward), (FACTOR_STEP, backward), (PLAIN_STEP, 0.0)):
        emp = _step_us(strategy, kind, device=dev)
        mc = _step_us(strategy, kind, device=dev, fisher="mc")
        assert mc - emp == pytest.approx(extra, rel=1e-12)


def test_mc_pass_captures_and_the_true_pass_feeds_ddp() -> None:
    c = cost(fisher="mc", bn_blocks="unit")
    spec = StepSpec(costs=layer_costs(c, W, batch=N), world_size=2, gpus_per_node=4,
                    kind=FACTOR_STEP, comm=CommSettings())
    prog = build_graph(make_step(parse_strategy("kaisa"), spec), fake_collective_us,
                       per_rank=True).programs[0]
    rows = list(zip(prog.stage, prog.layer))
    mc = [i for i, r in enumerate(rows) if r == (S.BACKWARD, S.MC_FISHER_PASS)]
    true = [i for i, r in enumerate(rows) if r == (S.BACKWARD, "")]
    factors = [i for i, (stage, _) in enumerate(rows) if stage == S.FACTOR_COMPUTE]
    assert mc and true and max(mc) < min(true)
    assert [rows[i][1] for i in factors] == ["fc", "bn", "conv"]  # hooks, last layer first
    assert max(factors) < min(true)  # statistics only in the Monte-Carlo pass
    ddp = [launch.after for launch in prog.launches if launch.stage == S.GRAD_COMM]
    assert min(ddp) > max(mc)  # DDP's buckets go in the true backward


def _payload(strategy: str, kind, stage: str, **options) -> int:
    comm = CommSettings(factor_dtype=options.pop("factor_dtype", "fp32"),
                        symmetric=options.get("symmetric_factors", False),
                        inverse_method=options.get("inverse_method", "eigen"))
    c = cost(**options)
    spec = StepSpec(costs=layer_costs(c, W, batch=N), world_size=4, gpus_per_node=4, kind=kind,
                    comm=comm)
    g = build_graph(make_step(parse_strategy(strategy), spec), fake_collective_us,
                    per_rank=True)
    return sum(x.payload for x in g.collectives if x.stage == stage)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("strategy", ["spngd", "kaisa"])
def test_factor_bytes_of_batchnorm_blocks(strategy: str, symmetric: bool) -> None:
    tri = (lambda n: n * (n + 1) // 2) if symmetric else (lambda n: n * n)
    kron = tri(28) + tri(16) + tri(17) + tri(10)
    opts = {"symmetric_factors": symmetric}
    # each Fisher block travels with one presence flag (kfacperf.kfac.factor_exchange)
    none = _payload(strategy, FACTOR_STEP, S.FACTOR_COMM, **opts)
    assert none == 4 * (kron + 2)
    unit = _payload(strategy, FACTOR_STEP, S.FACTOR_COMM, bn_blocks="unit", **opts)
    assert unit - none == 4 * (C * (3 if symmetric else 4) + 1)  # C blocks of 2x2
    full = _payload(strategy, FACTOR_STEP, S.FACTOR_COMM, bn_blocks="full", **opts)
    assert full - none == 4 * (tri(2 * C) + 1)  # one 2C x 2C block
    half = _payload(strategy, FACTOR_STEP, S.FACTOR_COMM, bn_blocks="full", factor_dtype="fp16",
                    **opts)
    assert half == full // 2
    for mode in ("unit", "full"):
        c = cost(bn_blocks=mode, **opts)
        assert c.factor_bytes(BN) == (unit if mode == "unit" else full) - none - 4


def test_gradient_and_inverse_bytes_of_batchnorm_blocks() -> None:
    # SP-NGD: the block's gradient goes to its owner; the other gradients shrink by as much,
    # and the block adds its flag of whether the rank had the gradient
    none = _payload("spngd", PLAIN_STEP, S.GRAD_COMM)
    assert _payload("spngd", PLAIN_STEP, S.GRAD_COMM, bn_blocks="unit") == none + 4
    pg = _payload("spngd", PLAIN_STEP, S.PRECOND_COMM, bn_blocks="unit")
    assert pg - _payload("spngd", PLAIN_STEP, S.PRECOND_COMM) == 4 * (2 * C + 1)
    # KAISA COMM-OPT broadcasts every inverse: unit-wise C damped 2x2 inverses for either
    # method (triangles when packed); full: eigenvectors and values, or one damped inverse
    base = {m: _payload("kaisa", INVERSE_STEP, S.INVERSE_COMM, inverse_method=m)
            for m in ("eigen", "cholesky")}
    cases = {("unit", "eigen", False): 4 * C, ("unit", "eigen", True): 3 * C,
             ("unit", "cholesky", True): 3 * C, ("full", "eigen", True): 32 * 32 + 32,
             ("full", "cholesky", False): 32 * 32, ("full", "cholesky", True): 32 * 33 // 2}
    for (mode, method, packed), elems in cases.items():
        if packed and method == "cholesky":
            ref = _payload("kaisa", INVERSE_STEP, S.INVERSE_COMM, inverse_method=method,
                           symmetric_factors=True)
        else:
            ref = base[method]
        got = _payload("kaisa", INVERSE_STEP, S.INVERSE_COMM, inverse_method=method,
                       bn_blocks=mode, symmetric_factors=packed)
        assert got - ref == 4 * elems, (mode, method, packed)


def test_placement_of_batchnorm_blocks_agrees_with_the_optimizer() -> None:
    real = real_assignment()
    for mode, blocks in (("unit", ((2, C),)), ("full", ((2 * C, 1),))):
        lc = layer_costs(cost(bn_blocks=mode), W, batch=N)
        shapes = [real.LayerShape(name="conv", dim_a=28, dim_g=C),
                  real.LayerShape(name="bn", dim_a=2, dim_g=C, blocks=blocks),
                  real.LayerShape(name="fc", dim_a=17, dim_g=10)]
        assert [lc.placement_cost(l) for l in range(3)] == [float(s.cost) for s in shapes]
        for p in (1, 2, 3):
            ours = spngd_placement([lc.placement_cost(l) for l in range(3)], p)
            theirs = real.spngd_assignment(shapes, p)
            assert list(ours.inverse_worker) == [theirs.inverse_worker[s.name] for s in shapes]


def test_none_predicts_as_a_workload_without_batchnorm_layers() -> None:
    """The BatchNorm layers of a model change nothing unless they are Fisher blocks."""
    plain = replace(W, batchnorm=())
    args = dict(strategies=["sgd", "spngd", "kaisa"], gpus=[1, 2, 8], batch_per_gpu=N,
                factor_interval=2, inverse_interval=4, events=False)
    a = simulate(W, device(), cluster(), **args).summary
    b = simulate(plain, device(), cluster(), **args).summary
    assert a.equals(b)
    unit = simulate(W, device(), cluster(), bn_blocks="unit", **args).summary
    sgd = a["strategy"] == "sgd"
    assert unit[sgd].equals(a[sgd])  # SGD has no Fisher blocks
    one = (a["gpus"] == 1) & ~sgd
    assert (unit[one]["step_us"] > a[one]["step_us"]).all()  # one GPU: only more work


def test_resnet50_has_107_fisher_blocks_with_unit_batchnorm() -> None:
    c = CostModel(workload=_resnet50(), device=device(), cluster=cluster(), bn_blocks="unit")
    lc = layer_costs(c, c.workload, batch=32)
    assert lc.n == 107 and lc.forms.count("unit") == 53 and lc.other_params == 0
    assert layer_costs(cost(), W, batch=N).n == 2


def _resnet50() -> WorkloadModel:
    from kfacperf.sim.models import load_workload

    return load_workload("resnet50")
