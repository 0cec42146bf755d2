"""The straggler's wait: proportional to the compute since the previous collective, so a slower
network never makes a step faster."""
from __future__ import annotations

from dataclasses import replace

import pytest

from helpers.sim_fakes import fake_collective_us, random_layer_costs
from kfacperf import vocab as S
from kfacperf.sim.engine import run_step
from kfacperf.sim.graphs.graph import Group, Program, RankClass, assemble
from kfacperf.sim.graphs.strategies import build_graph, make_step, parse_strategy
from kfacperf.sim.graphs.strategies.common import CommSettings, StepSpec
from kfacperf.sim.models import load_cluster
from kfacperf.sim.models.host import HostModel, expected_max_normal
from kfacperf.sim.sweep import simulate
from kfacperf.vocab import STEP_KINDS

STRAGGLER = 0.0427  # the local-cpu cluster's
COMM = CommSettings(factor_bucket_mb=0.05, ddp_bucket_mb=0.05, ddp_first_bucket_mb=0.05)


def flat(us: float):
    return lambda op, nbytes, size, nodes: us


def world(n: int) -> Group:
    return Group(("world", n), ("world", n), n, 1)


# ------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("n", [2, 8, 512])
def test_one_collective_after_known_compute_waits_straggler_times_expected_max(n):
    """n ranks compute C, then all-reduce: the slowest is E[max of n] / E[max of 2] x straggler
    x C late, and the all-reduce starts then."""
    compute, coll = 1000.0, 37.0
    host = HostModel(cores_per_node=0, straggler=STRAGGLER)
    progs = []
    for _ in range(n):
        p = Program()
        p.compute(S.FORWARD, "", compute)
        p.launch("ar", S.GRAD_COMM, "", "all_reduce", 8, world(n))
        progs.append(p)
    graph = assemble([RankClass(r, 1) for r in range(n)], progs, flat(coll), per_rank=True,
                     straggle=host.straggle)
    late = STRAGGLER * expected_max_normal(n) / expected_max_normal(2) * compute
    res = run_step(graph)
    assert res.coll_start[0] == pytest.approx(compute + late, rel=1e-12)
    assert res.step_us == pytest.approx(compute + late + coll, rel=1e-12)
    # the same with one class standing for all n ranks (a shared program)
    base = Program()
    base.compute(S.FORWARD, "", compute)
    base.launch("ar", S.GRAD_COMM, "", "all_reduce", 8, world(n))
    one = assemble([RankClass(0, n)], [base], flat(coll), per_rank=False, straggle=host.straggle)
    assert run_step(one).step_us == pytest.approx(compute + late + coll, rel=1e-12)


@pytest.mark.parametrize("first_us", [1.0, 50.0, 5000.0])
def test_waiting_on_a_collective_is_no_compute(first_us):
    """C1, all-reduce A, compute waits for A, C2, all-reduce B: B waits s x C2 whatever A cost
    (the old wall-time rule charged s x (arrival - A's end), less when A was longer)."""
    c1, c2, cb, s = 300.0, 200.0, 10.0, 0.1
    def program() -> Program:  # the same on both ranks
        p = Program()
        p.compute(S.FORWARD, "", c1)
        p.launch("a", S.GRAD_COMM, "", "all_reduce", 8, world(2))
        p.wait("a")
        p.compute(S.BACKWARD, "", c2)
        p.launch("b", S.GRAD_COMM, "", "all_reduce", 16, world(2))
        return p

    def cost(op, nbytes, size, nodes):
        return first_us if nbytes == 8 else cb

    graph = assemble([RankClass(0, 1), RankClass(1, 1)], [program(), program()], cost,
                     per_rank=True, straggle=lambda n: s)
    res = run_step(graph)
    a_end = c1 * (1 + s) + first_us
    assert res.coll_start[1] == pytest.approx(a_end + c2 + s * c2, rel=1e-12)
    assert res.step_us == pytest.approx(a_end + c2 * (1 + s) + cb, rel=1e-12)


def test_back_to_back_launches_carry_no_compute():
    """Two collectives launched with no compute between them: the second waits no straggle."""
    s = 0.2
    p = Program()
    p.compute(S.FORWARD, "", 100.0)
    p.launch("a", S.GRAD_COMM, "", "all_reduce", 8, world(2))
    p.launch("b", S.GRAD_COMM, "", "all_reduce", 16, world(2))
    graph = assemble([RankClass(0, 2)], [p], flat(5.0), per_rank=False, straggle=lambda n: s)
    res = run_step(graph)
    assert list(res.coll_start) == pytest.approx([120.0, 125.0])
    assert res.step_us == pytest.approx(130.0)


def test_members_with_different_compute_start_at_the_latest_arrival_plus_straggle():
    """Rank 0 computes 100, rank 1 computes 300: the all-reduce starts at
    max(100 + s 100, 300 + s 300)."""
    s = 0.1
    progs = []
    for c in (100.0, 300.0):
        p = Program()
        p.compute(S.FORWARD, "", c)
        p.launch("ar", S.GRAD_COMM, "", "all_reduce", 8, world(2))
        progs.append(p)
    graph = assemble([RankClass(0, 1), RankClass(1, 1)], progs, flat(7.0), per_rank=True,
                     straggle=lambda n: s)
    res = run_step(graph)
    assert res.coll_start[0] == pytest.approx(330.0)
    assert res.step_us == pytest.approx(337.0)


def test_a_collective_backed_up_behind_a_longer_one_still_waits_for_the_compute():
    """C1, all-reduce A, C2, all-reduce B, no waits: when A outlasts C2 the comm stream reaches
    B at A's end; B still waits s x C2 (the wall-time rule charged s x 0 there, so a longer A
    shortened B's wait and a slower network could shorten the step)."""
    c1, c2, cb, s = 300.0, 200.0, 10.0, 0.1
    for a_us in (1.0, 100.0, 1000.0):
        p = Program()
        p.compute(S.FORWARD, "", c1)
        p.launch("a", S.GRAD_COMM, "", "all_reduce", 8, world(2))
        p.compute(S.BACKWARD, "", c2)
        p.launch("b", S.GRAD_COMM, "", "all_reduce", 16, world(2))

        def cost(op, nbytes, size, nodes, a_us=a_us):
            return a_us if nbytes == 8 else cb

        res = run_step(assemble([RankClass(0, 2)], [p], cost, per_rank=False,
                                straggle=lambda n: s))
        a_end = c1 * (1 + s) + a_us
        b_start = max(c1 + c2, a_end) + s * c2
        assert list(res.coll_start) == pytest.approx([c1 * (1 + s), b_start], rel=1e-12)
        assert res.step_us == pytest.approx(b_start + cb, rel=1e-12)


# ------------------------------------------------------------------ monotone in the network
def scaled(bandwidth: float, latency: float):
    """The fake collective cost with its size term divided by ``bandwidth`` and the rest
    multiplied by ``latency``."""
    def cost(op, nbytes, size, nodes):
        full = fake_collective_us(op, nbytes, size, nodes)
        per_byte = full - fake_collective_us(op, 0, size, nodes)
        return latency * (full - per_byte) + per_byte / bandwidth
    return cost


@pytest.mark.parametrize("strategy", ["sgd", "spngd", "kaisa", "kaisa:0.5"])
@pytest.mark.parametrize("knob", ["bandwidth", "latency", "both"])
def test_engine_step_never_shrinks_when_every_collective_gets_longer(strategy, knob):
    layers = random_layer_costs(8, seed=11, other_params=3000)
    factors = (0.01, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    for p in (2, 8, 64):
        for kind in STEP_KINDS:
            spec = StepSpec(costs=layers, world_size=p, gpus_per_node=4, kind=kind, comm=COMM)
            step = make_step(parse_strategy(strategy), spec)
            times = []
            for f in factors:
                cost = scaled(1 / f if knob != "latency" else 1.0,
                              f if knob != "bandwidth" else 1.0)
                times.append(run_step(build_graph(step, cost,
                                                  straggle=lambda n: 0.05 * n)).step_us)
            assert times == sorted(times), (p, kind.name, times)


def jitter_cluster():
    """The reporter's cluster: local-cpu's network and straggler, 8 ranks a node, nothing
    else of its host (no core sharing, no contention)."""
    c = load_cluster("local-cpu")
    assert c.host is not None and c.host.straggler > 0
    return replace(c, gpus_per_node=8,
                   host=HostModel(cores_per_node=0, straggler=c.host.straggler))


def sweep(cluster, **knobs):
    return simulate("resnet50", "h100", cluster, ["sgd", "spngd", "kaisa"], gpus=[8, 64, 512],
                    events=False, **knobs).summary.set_index(["strategy", "gpus"]).step_us


def assert_non_decreasing(steps, what):
    for prev, cur in zip(steps, steps[1:]):
        assert (cur >= prev * (1 - 1e-12)).all(), (what, (cur - prev)[cur < prev])
    assert (steps[-1] > steps[0]).all(), what  # more than one rank: the network matters


@pytest.mark.parametrize("cluster", ["local-cpu", "jitter"])
@pytest.mark.parametrize("alpha_scale", [0.001, 1.0])
def test_simulated_step_never_shrinks_as_bandwidth_drops(cluster, alpha_scale):
    """Bandwidth down on a straggler cluster: every strategy's step time is non-decreasing
    (SGD and SP-NGD on 512 ranks of local-cpu got faster before the fix)."""
    model = load_cluster("local-cpu") if cluster == "local-cpu" else jitter_cluster()
    steps = [sweep(model, alpha_scale=alpha_scale, bandwidth_scale=bw)
             for bw in (1000.0, 100.0, 30.0, 10.0, 4.0, 1.0, 0.25)]
    assert_non_decreasing(steps, (cluster, alpha_scale))


@pytest.mark.parametrize("cluster", ["local-cpu", "jitter"])
@pytest.mark.parametrize("bandwidth_scale", [1000.0, 1.0])
def test_simulated_step_never_shrinks_as_latency_grows(cluster, bandwidth_scale):
    model = load_cluster("local-cpu") if cluster == "local-cpu" else jitter_cluster()
    steps = [sweep(model, alpha_scale=a, bandwidth_scale=bandwidth_scale)
             for a in (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)]
    assert_non_decreasing(steps, (cluster, bandwidth_scale))


def test_reported_resnet50_sweep_is_monotone():
    """The report: resnet50 on 512 H100s, SGD, latency x 0.001, bandwidth x 1000/100/30 gave
    28.486/28.461/28.395 ms while the collectives grew."""
    steps = [simulate("resnet50", "h100", jitter_cluster(), ["sgd"], gpus=[512], events=False,
                      alpha_scale=0.001, bandwidth_scale=bw).summary.step_us.iloc[0]
             for bw in (1000.0, 100.0, 30.0)]
    assert steps == sorted(steps) and steps[-1] > steps[0]
