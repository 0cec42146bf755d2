"""The search finds what an exhaustive search finds, never recommends what does not fit, and
its shortcuts (merges, one simulation per kind of step, bounds) hold.

The exhaustive reference here enumerates every configuration of a small space on the MLP
workload and simulates each one's whole cycle of steps on its own, with no cache, merge or
bound; the search must reach the same least time to solution per GPU count and optimizer,
with a configuration that the reference also finds optimal.
"""
from __future__ import annotations

import math
from typing import Any

import pytest

from kfacperf.plan import plan
from kfacperf.plan.convergence import ConvergenceModel, ConvergencePoint, optimizer_of
from kfacperf.plan.memory import memory_per_gpu
from kfacperf.plan.search import GpuCountSearch, mean_step_us
from kfacperf.plan.space import PlanSpace, Setting, grad_worker_counts
from kfacperf.sim.costs.model import CostModel
from kfacperf.sim.engine import run_step
from kfacperf.sim.graphs.layer_costs import layer_costs
from kfacperf.sim.graphs.strategies import StrategySpec, build_graph, make_step
from kfacperf.sim.graphs.strategies.common import CommSettings, StepSpec
from kfacperf.sim.models import load_cluster, load_device, load_workload
from kfacperf.sim.summary import cycle
from kfacperf.sim.sweep import simulate
from kfacperf.vocab import FACTOR_STEP, INVERSE_STEP, PLAIN_STEP

SGD_STEPS = ConvergenceModel(name="mlp-sgd", workload="mlp", optimizer="sgd", target="t", points=(
    ConvergencePoint(global_batch=16, steps=20000, source="test"),
    ConvergencePoint(global_batch=256, steps=2500, source="test")))
KFAC_STEPS = ConvergenceModel(name="mlp-kfac", workload="mlp", optimizer="kfac", target="t",
                              points=(
    ConvergencePoint(global_batch=16, steps=9000, source="test", factor_interval=3,
                     inverse_interval=9),
    ConvergencePoint(global_batch=128, steps=1500, source="test", factor_interval=2,
                     inverse_interval=6),
    ConvergencePoint(global_batch=512, steps=700, source="test", factor_interval=1,
                     inverse_interval=1)))
SPACE = dict(gpus=(1, 2, 8), batch_per_gpu=(8, 64), intervals=((1, 1), (1, 3), (2, 2)),
             comm_dtypes=("fp32", "fp16", "bf16"), symmetric=(False, True),
             bucket_mb=(25.0, 0.002))
MODELS = {"sgd": SGD_STEPS, "kfac": KFAC_STEPS}


def cycle_step_us(w: Any, cost: Any, gpn: int, strategy: str, gw: int, p: int, b: int,
                  fi: int, ii: int, comm: CommSettings) -> float:
    """One configuration's mean step, its whole cycle simulated from scratch."""
    model = cost.for_gpus(p)
    lc = layer_costs(model, w, batch=b)
    spec = StrategySpec("kaisa", gw / p) if strategy == "kaisa" else StrategySpec(strategy)
    straggle = model.host.straggle

    def coll(op: str, nbytes: Any, size: int, nodes: int) -> float:
        return float(model.collective_us(op, nbytes, group_size=size, nodes=nodes))

    total = 0.0
    for cs in cycle(fi, ii, kfac=strategy != "sgd"):
        step = make_step(spec, StepSpec(costs=lc, world_size=p, gpus_per_node=gpn, kind=cs.kind,
                                        comm=comm))
        total += cs.weight * run_step(build_graph(step, coll, straggle=straggle)).step_us
    return total / (1 if strategy == "sgd" else ii)


def exhaustive(cluster: str, capacity_gb: float, dtype: str = "fp32") -> dict:
    """{(gpus, optimizer): (least time, [configurations that reach it])}."""
    w, d, c = load_workload("mlp"), load_device("v100"), load_cluster(cluster)
    cost = CostModel(workload=w, device=d, cluster=c, dtype=dtype)
    out: dict = {}
    for p in SPACE["gpus"]:
        found: dict[str, list[tuple[float, tuple]]] = {"sgd": [], "kfac": []}
        for strategy in ("sgd", "spngd", "kaisa"):
            model = MODELS[optimizer_of(strategy)]
            for b in SPACE["batch_per_gpu"]:
                est = model.at(p * b)
                if strategy == "sgd":
                    pairs, options = [(1, 1)], [("fp32", False)]
                else:
                    f, i = est.max_factor_interval, est.max_inverse_interval
                    pairs = [q for q in list(SPACE["intervals"]) + [(f, f * (i // f))]
                             if q[0] <= f and q[1] <= i]
                    options = [(x, s) for x in SPACE["comm_dtypes"] for s in SPACE["symmetric"]]
                for gw in (grad_worker_counts(p) if strategy == "kaisa" else (1,)):
                    for dt, sym in options:
                        for bucket in SPACE["bucket_mb"]:
                            comm = CommSettings(factor_dtype=dt, symmetric=sym,
                                                factor_bucket_mb=bucket, ddp_bucket_mb=bucket,
                                                ddp_first_bucket_mb=bucket)
                            mem = memory_per_gpu(w, strategy=strategy, world_size=p,
                                                 batch_per_gpu=b, grad_workers=gw, comm=comm,
                                                 dtype=dtype)
                            if mem.total > capacity_gb * 1e9:
                                continue
                            for fi, ii in pairs:
                                t = est.steps * cycle_step_us(w, cost, c.gpus_per_node, strategy,
                                                              gw, p, b, fi, ii, comm) / 1e6
                                key = (strategy, gw if strategy == "kaisa" else None, b,
                                       (fi, ii) if strategy != "sgd" else None, dt, sym, bucket)
                                found[optimizer_of(strategy)].append((t, key))
        for opt, items in found.items():
            if items:
                best = min(t for t, _ in items)
                out[(p, opt)] = (best, [k for t, k in items if t <= best * (1 + 1e-12)])
    return out


def matches(choice: Any, keys: list[tuple]) -> bool:
    """Whether the plan's choice is one of the optimal configurations (None: any value)."""
    width = {"fp32": 4, "fp16": 2, "bf16": 2}
    for strategy, gw, b, pair, dt, sym, bucket in keys:
        if (strategy, gw, b) != (choice.strategy, choice.grad_workers, choice.batch_per_gpu):
            continue
        if pair is not None and pair != (choice.factor_interval, choice.inverse_interval):
            continue
        if strategy == "sgd" or choice.comm_dtype is None:
            if choice.bucket_mb in (None, bucket):
                return True
            continue
        if (width[dt], sym, bucket) == (width[choice.comm_dtype], choice.symmetric,
                                        choice.bucket_mb):
            return True
    return False


def memory_cut(cluster: str) -> float:
    """A capacity (GB) that drops part of the K-FAC configurations: the median."""
    w = load_workload("mlp")
    sizes = sorted(memory_per_gpu(w, strategy=s, world_size=p, batch_per_gpu=b, grad_workers=g,
                                  comm=CommSettings(factor_dtype=x)).total
                   for p in SPACE["gpus"] for s in ("spngd", "kaisa") for b in (8, 64)
                   for g in grad_worker_counts(p) for x in ("fp32", "fp16"))
    return sizes[len(sizes) // 2] / 1e9


@pytest.mark.parametrize("cluster", ["abci-v100", "local-cpu"])
def test_search_finds_the_exhaustive_optimum(cluster: str) -> None:
    """abci-v100 has no straggler (the bound by smaller kinds of step is on); local-cpu has
    one (it is off).  Memory drops part of the space."""
    capacity = memory_cut(cluster)
    ref = exhaustive(cluster, capacity)
    result = plan("mlp", "v100", cluster, convergence=[SGD_STEPS, KFAC_STEPS],
                  memory_gb=capacity, memory_fraction=1.0, **SPACE)
    got = {(c.gpus, c.optimizer): c for c in result.choices}
    assert set(got) == set(ref)
    for key, (best, keys) in ref.items():
        c = got[key]
        assert c.time_s == pytest.approx(best, rel=1e-9), key
        assert matches(c, keys), (key, c, keys)
        assert c.memory["total"] <= capacity * 1e9
        if c.factor_interval is not None:  # the kinds of step its cycle has, no other
            kinds = {k.kind.name for k in cycle(c.factor_interval, c.inverse_interval)}
            assert set(c.kind_step_us) == kinds, c
    s = result.stats
    assert s["configurations"] == (s["identical"] + s["over_memory"] + s["beyond_data"]
                                   + s["evaluated"] + s["bounded"])
    assert s["over_memory"] > 0 and s["identical"] > 0
    if cluster == "abci-v100":
        assert s["bounded"] > 0  # the bounds did prune


def test_a_configuration_that_does_not_fit_is_never_recommended() -> None:
    common = dict(convergence=[SGD_STEPS, KFAC_STEPS], memory_fraction=1.0, **SPACE)
    free = plan("mlp", "v100", "abci-v100", memory_gb=1.0, **common)
    best = free.best(8, "kfac")
    assert best is not None
    tight_gb = (best.memory["total"] - 1) / 1e9  # the free optimum no longer fits
    tight = plan("mlp", "v100", "abci-v100", memory_gb=tight_gb, **common)
    for c in tight.choices:
        assert c.memory["total"] <= tight_gb * 1e9
    other = tight.best(8, "kfac")
    assert other is not None and other.time_s > best.time_s
    ref = exhaustive("abci-v100", tight_gb)[(8, "kfac")]
    assert other.time_s == pytest.approx(ref[0], rel=1e-9) and matches(other, ref[1])
    nothing = plan("mlp", "v100", "abci-v100", memory_gb=1e-4, **common)
    assert not nothing.choices
    assert all(m["reason"].startswith("nothing fits in memory: the smallest, ")
               for m in nothing.missing)


def test_nothing_fits_says_what_the_smallest_configuration_needs() -> None:
    """SGD on the MLP (784-512-256-10, N = 535,818 parameters, 2,330 activations per
    example kept) at batch 64 on 8 GPUs, fp32: weights, gradients, momentum and DDP's
    buckets are 16 N bytes, the activations 64 x 4 x 2,330: 9,169,568 bytes, the smaller of
    the two batches searched; 1 MB usable.  The reason names it and both sizes."""
    n, act = 785 * 512 + 513 * 256 + 257 * 10, (784 + 512) + (512 + 256) + (256 + 10)
    need = 16 * n + 64 * 4 * act
    assert need == 9_169_568
    nothing = plan("mlp", "v100", "abci-v100", gpus=[8], strategies=["sgd"],
                   batch_per_gpu=[128, 64], convergence=[SGD_STEPS], memory_gb=1e-3,
                   memory_fraction=1.0)
    assert nothing.choices == ()
    [missing] = nothing.missing
    assert missing["reason"] == (
        f"nothing fits in memory: the smallest, sgd b64, needs {need / 1e9:.3g} GB per GPU "
        "where 0.001 GB may be used (a smaller --batch-per-gpu, --dtype bf16, or "
        "--memory-gb / --memory-fraction)")


def test_unpruned_search_agrees() -> None:
    common = dict(convergence=[SGD_STEPS, KFAC_STEPS], memory_gb=1.0, **SPACE)
    pruned = plan("mlp", "v100", "abci-v100", **common)
    full = plan("mlp", "v100", "abci-v100", prune=False, **common)
    assert [c.to_dict() for c in pruned.choices] == [c.to_dict() for c in full.choices]
    assert full.stats["bounded"] == 0
    assert pruned.stats["simulated_steps"] < full.stats["simulated_steps"]


def test_mean_of_kinds_is_the_simulators_cycle() -> None:
    """What the search evaluates per interval pair equals kfacperf simulate's step time."""
    w, d, c = load_workload("resnet20"), load_device("v100"), load_cluster("abci-v100")
    cost = CostModel(workload=w, device=d, cluster=c)
    space = PlanSpace(gpus=(16,), batch_per_gpu=(32,))
    g = GpuCountSearch(workload=w, cost=cost, gpus_per_node=4, world_size=16, space=space,
                       convergence={}, capacity_bytes=1e12, dtype="fp32",
                       inverse_method="eigen", extrapolate=True)
    for strategy, gw in (("spngd", 0), ("kaisa", 4)):
        s = Setting(strategy=strategy, grad_workers=gw, batch_per_gpu=32, comm_dtype="fp16",
                    symmetric=True, bucket_mb=25.0)
        times = {k.name: g.step_us(s, k) for k in (PLAIN_STEP, FACTOR_STEP, INVERSE_STEP)}
        spec = StrategySpec("kaisa", gw / 16, "k") if gw else StrategySpec(strategy)
        for fi, ii in ((1, 1), (10, 10), (5, 50), (10, 100)):
            pred = simulate(w, d, c, [spec], gpus=[16], batch_per_gpu=32, factor_interval=fi,
                            inverse_interval=ii, comm_dtype="fp16", symmetric_factors=True,
                            events=False)
            assert mean_step_us(times, fi, ii) == pytest.approx(
                float(pred.summary["step_us"].iloc[0]), rel=1e-12)


def test_merged_settings_are_identical_and_bounds_hold() -> None:
    """fp16 and bf16 factors cost the same; a plain step does not see the factor settings;
    the compute bound and the order plain <= factor <= inverse hold (no straggler)."""
    w, d, c = load_workload("resnet20"), load_device("v100"), load_cluster("abci-v100")
    cost = CostModel(workload=w, device=d, cluster=c)
    for p in (2, 8, 64):
        g = GpuCountSearch(workload=w, cost=cost, gpus_per_node=4, world_size=p,
                           space=PlanSpace(gpus=(p,)), convergence={}, capacity_bytes=1e12,
                           dtype="fp32", inverse_method="eigen", extrapolate=True)
        assert g.monotone
        for strategy, gw in [("spngd", 0)] + [("kaisa", x) for x in grad_worker_counts(p)]:
            def setting(dt: str, sym: bool, s: str = strategy, x: int = gw) -> Setting:
                return Setting(strategy=s, grad_workers=x, batch_per_gpu=16, comm_dtype=dt,
                               symmetric=sym, bucket_mb=25.0)
            times = {}
            for dt, sym in (("fp32", False), ("fp16", True), ("bf16", True)):
                s = setting(dt, sym)
                times[(dt, sym)] = [g.step_us(s, k) for k in (PLAIN_STEP, FACTOR_STEP,
                                                              INVERSE_STEP)]
                for k, t in zip((PLAIN_STEP, FACTOR_STEP, INVERSE_STEP), times[(dt, sym)]):
                    assert g.compute_bound(s, k) <= t * (1 + 1e-12)
                plain, factor, inverse = times[(dt, sym)]
                assert plain <= factor * (1 + 1e-12) and factor <= inverse * (1 + 1e-12)
            assert times[("fp16", True)] == times[("bf16", True)]
            # the plain step is one simulation for every comm setting: check it is the same
            fresh = GpuCountSearch(workload=w, cost=cost, gpus_per_node=4, world_size=p,
                                   space=PlanSpace(gpus=(p,)), convergence={},
                                   capacity_bytes=1e12, dtype="fp32", inverse_method="eigen",
                                   extrapolate=True)
            assert fresh.step_us(setting("fp16", True), PLAIN_STEP) == times[("fp32", False)][0]
    assert not GpuCountSearch(
        workload=w, cost=CostModel(workload=w, device=d, cluster=load_cluster("local-cpu")),
        gpus_per_node=64, world_size=2, space=PlanSpace(gpus=(2,)), convergence={},
        capacity_bytes=1e12, dtype="fp32", inverse_method="eigen", extrapolate=True).monotone


def test_intervals_staler_than_the_data_are_never_chosen() -> None:
    result = plan("mlp", "v100", "abci-v100", convergence=[SGD_STEPS, KFAC_STEPS],
                  memory_gb=1.0, **SPACE)
    for c in result.choices:
        if c.optimizer == "kfac":
            est = KFAC_STEPS.at(c.global_batch)
            assert c.factor_interval <= est.max_factor_interval
            assert c.inverse_interval <= est.max_inverse_interval
    # 8 GPUs x 64 = 512: fresh statistics only
    at512 = [c for c in result.choices if c.global_batch == 512 and c.optimizer == "kfac"]
    assert all((c.factor_interval, c.inverse_interval) == (1, 1) for c in at512)
    strict = plan("mlp", "v100", "abci-v100", convergence=[SGD_STEPS, KFAC_STEPS],
                  memory_gb=1.0, extrapolate=False, **SPACE)
    assert all(not c.extrapolated for c in strict.choices)
    assert any(c.extrapolated for c in result.choices)
    assert all(16 <= c.global_batch <= 512 for c in strict.choices)
    assert math.isfinite(strict.stats["seconds"])


def test_a_choice_lists_only_the_kinds_of_step_its_intervals_have() -> None:
    """SP-NGD's preset on 512 ABCI GPUs picks equal intervals (18/18), whose cycle has no
    factor-only step; its search priced one for another interval pair of the same setting."""
    result = plan("resnet50", "v100", "abci-v100", gpus=(512,),
                  convergence=["spngd-resnet50", "mlperf-v0.7-lars-resnet50"])
    kfac = [c for c in result.choices if c.factor_interval is not None]
    assert kfac and kfac[0].factor_interval == kfac[0].inverse_interval
    for c in kfac:
        kinds = {k.kind.name for k in cycle(c.factor_interval, c.inverse_interval)}
        assert set(c.kind_step_us) == kinds


def test_kaisa_is_searched_over_every_grad_worker_count_that_divides_the_gpus() -> None:
    """`kaisa` with every grad-worker fraction from 1/P to 1: at 12 GPUs that is 1, 2, 3, 4, 6
    and 12 grad workers, and on this cluster 3/12 is the fastest (more than 5% ahead of the
    powers of two), so a search over powers of two alone would recommend a slower one."""
    p = 12
    model = ConvergenceModel(name="r50-kfac", workload="resnet50", optimizer="kfac", target="t",
                             points=(
        ConvergencePoint(global_batch=256, steps=8000, source="test", factor_interval=10,
                         inverse_interval=100),
        ConvergencePoint(global_batch=1024, steps=2000, source="test", factor_interval=10,
                         inverse_interval=100)))
    divisors = [g for g in range(1, p + 1) if p % g == 0]
    assert grad_worker_counts(p) == tuple(divisors)
    brute = simulate("resnet50", "rtx2080ti", "rtx2080ti-4x-edr",
                     [f"kaisa:{g}/{p}" for g in divisors], gpus=[p], factor_interval=10,
                     inverse_interval=100, comm_dtype="fp16", events=False)
    steps = brute.summary.set_index("strategy")["step_us"]
    assert steps.idxmin() == "kaisa:3/12"
    assert steps.min() < 0.95 * min(steps[f"kaisa:{g}/{p}"] for g in (1, 2, 4, 12))
    result = plan("resnet50", "rtx2080ti", "rtx2080ti-4x-edr", gpus=[p], strategies=["kaisa"],
                  convergence=[model], intervals=[(10, 100)], comm_dtypes=["fp16"],
                  symmetric=[False])
    best = result.best(p, "kfac")
    assert best is not None and best.label == "kaisa:3/12"
    assert best.step_us == pytest.approx(steps.min(), rel=1e-9)
