"""The SimPy engine against closed-form step times and an independent fixed-point evaluator."""
from __future__ import annotations

import math

import numpy as np
import pytest

from helpers.sim_fakes import fake_collective_us as cost
from helpers.sim_fakes import random_layer_costs
from kfacperf import vocab as S
from kfacperf.sim.engine import run_step
from kfacperf.sim.graphs.graph import Group, Program, RankClass, StepGraph, assemble
from kfacperf.sim.graphs.strategies import build_graph, make_step, parse_strategy
from kfacperf.sim.graphs.strategies.common import CommSettings, LayerCosts, StepSpec
from kfacperf.vocab import FACTOR_STEP, INVERSE_STEP, PLAIN_STEP, STEP_KINDS

# Every tensor in its own DDP bucket; all factors in one bucket, sent by layer 0's hook (the
# last to fire: hooks fire before each layer's own backward).
SPLIT = CommSettings(ddp_bucket_mb=1e-6, ddp_first_bucket_mb=1e-6, factor_bucket_mb=1e6)


def two_layers(**times: tuple[float, float]) -> LayerCosts:
    """Layer 0 (dims 65 x 32) costs more to invert than layer 1 (dims 33 x 16)."""
    t = {"fwd": (30.0, 20.0), "bwd": (60.0, 40.0), "factor": (11.0, 7.0),
         "inverse": (500.0, 90.0), "precond": (13.0, 9.0)}
    t.update(times)
    zeros = (0.0, 0.0)
    return LayerCosts(names=("l0", "l1"), fwd=t["fwd"], bwd=t["bwd"], factor=t["factor"],
                      inverse=t["inverse"], precond=t["precond"], update=17.0,
                      fwd_flops=zeros, bwd_flops=zeros, factor_flops=zeros, inverse_flops=zeros,
                      precond_flops=zeros, dim_a=(65, 33), dim_g=(32, 16), other_params=0)


def simulate_one(strategy: str, costs: LayerCosts, p: int, kind, gpn: int = 1,
                 comm: CommSettings = SPLIT) -> float:
    spec = StepSpec(costs=costs, world_size=p, gpus_per_node=gpn, kind=kind, comm=comm)
    return run_step(build_graph(make_step(parse_strategy(strategy), spec), cost)).step_us


# ------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("bwd0", [5.0, 400.0])  # layer 1's all-reduce exposed / hidden by bwd0
def test_sgd_two_layers_closed_form(bwd0):
    c = two_layers(bwd=(bwd0, 40.0))
    t_f = 30.0 + 20.0
    ar1 = cost("all_reduce", 33 * 16 * 4, 2, 2)  # layer 1's gradient, 2 ranks on 2 nodes
    ar0 = cost("all_reduce", 65 * 32 * 4, 2, 2)
    e1 = t_f + 40.0 + ar1  # layer 1's bucket starts when its backward ends
    s0 = max(t_f + 40.0 + bwd0, e1)  # layer 0's waits for its backward and the comm stream
    expected = s0 + ar0 + 17.0  # update after both all-reduces
    assert simulate_one("sgd", c, 2, PLAIN_STEP) == pytest.approx(expected, rel=1e-12)
    assert simulate_one("sgd", c, 1, PLAIN_STEP) == pytest.approx(t_f + 40.0 + bwd0 + 17.0)


def test_kaisa_comm_opt_inverse_step_closed_form():
    c = two_layers()
    t_f = 50.0
    t_b = t_f + (7.0 + 40.0) + (11.0 + 60.0)  # hooks fire before each layer's own backward
    e1 = t_f + 7.0 + 40.0 + cost("all_reduce", 33 * 16 * 4, 2, 2)
    factors = (65**2 + 32**2 + 33**2 + 16**2 + 2) * 4  # and one presence flag a layer
    # one factor bucket, issued by layer 0's hook, behind layer 1's gradient on the stream
    ef = max(t_f + 7.0 + 40.0 + 11.0, e1) + cost("all_reduce", factors, 2, 2)
    e0 = max(t_b, ef) + cost("all_reduce", 65 * 32 * 4, 2, 2)
    i0, i1 = 500.0, 90.0  # LPT: layer 0 on rank 0, layer 1 on rank 1
    b0 = cost("broadcast", (65**2 + 32**2 + 65 + 32) * 4, 2, 2)  # eigenbases + eigenvalues
    b1 = cost("broadcast", (33**2 + 16**2 + 33 + 16) * 4, 2, 2)
    expected = e0 + max(i0, i1) + b0 + b1 + 13.0 + 9.0 + 17.0
    assert simulate_one("kaisa", c, 2, INVERSE_STEP) == pytest.approx(expected, rel=1e-12)


def test_kaisa_mem_opt_factor_step_closed_form():
    c = two_layers()
    t_b = 50.0 + 47.0 + 71.0
    e1 = 50.0 + 47.0 + cost("all_reduce", 33 * 16 * 4, 2, 2)
    ef = max(50.0 + 47.0 + 11.0, e1) + cost("all_reduce",
                                             (65**2 + 32**2 + 33**2 + 16**2 + 2) * 4, 2, 2)
    e0 = max(t_b, ef) + cost("all_reduce", 65 * 32 * 4, 2, 2)
    # f = 1/2: each rank preconditions its own layer, then both broadcast along the row
    pg0 = cost("broadcast", (65 * 32 + 1) * 4, 2, 2)
    pg1 = cost("broadcast", (33 * 16 + 1) * 4, 2, 2)
    expected = max(e0 + 13.0, e0 + 9.0) + pg0 + pg1 + 17.0
    assert simulate_one("kaisa:mem-opt", c, 2, FACTOR_STEP) == pytest.approx(expected, rel=1e-12)


def test_spngd_inverse_step_closed_form():
    c = two_layers()
    t_b = 50.0 + 47.0 + 71.0
    # each owner's block: its layer's statistics and presence flag; sent by layer 0's hook
    fac = (cost("reduce_scatter_v", ((65**2 + 32**2 + 1) * 4, (33**2 + 16**2 + 1) * 4), 2, 2))
    e_f = max(t_b, 50.0 + 47.0 + 11.0 + fac)
    grad = cost("reduce_scatter_v", ((65 * 32 + 1) * 4, (33 * 16 + 1) * 4), 2, 2)  # + flag
    e_g = e_f + max(500.0, 90.0) + grad  # grads leave after each owner's inverse
    ag = cost("all_gather_v", ((65 * 32 + 1) * 4, (33 * 16 + 1) * 4), 2, 2)
    expected = e_g + max(13.0, 9.0) + ag + 17.0
    assert simulate_one("spngd", c, 2, INVERSE_STEP) == pytest.approx(expected, rel=1e-12)


def test_one_gpu_has_no_communication_and_every_kfac_strategy_is_local():
    c = two_layers()
    local = 50.0 + 47.0 + 71.0 + 500.0 + 90.0 + 13.0 + 9.0 + 17.0
    for strategy in ("spngd", "kaisa", "kaisa:mem-opt"):
        spec = StepSpec(costs=c, world_size=1, gpus_per_node=8, kind=INVERSE_STEP, comm=SPLIT)
        g = build_graph(make_step(parse_strategy(strategy), spec), cost)
        assert g.collectives == []
        assert run_step(g).step_us == pytest.approx(local)


HOST = {"grad_load": 23.0, "grad_write": 31.0}  # host work between stages (no stage)


def test_host_work_between_stages_closed_form():
    """K-FAC steps pay grad_load after backward (before the last factor collective leaves)
    and grad_write before the update; SGD steps pay neither."""
    from dataclasses import replace

    c = replace(two_layers(), **HOST)
    L, W = HOST["grad_load"], HOST["grad_write"]
    t_b = 50.0 + 47.0 + 71.0
    fac = cost("reduce_scatter_v", ((65**2 + 32**2 + 1) * 4, (33**2 + 16**2 + 1) * 4), 2, 2)
    grad = cost("reduce_scatter_v", ((65 * 32 + 1) * 4, (33 * 16 + 1) * 4), 2, 2)  # + flag
    ag = cost("all_gather_v", ((65 * 32 + 1) * 4, (33 * 16 + 1) * 4), 2, 2)
    # the factors left with layer 0's hook, during its backward
    spngd = max(t_b + L, 50.0 + 47.0 + 11.0 + fac) + 500.0 + grad + 13.0 + ag + W + 17.0
    assert simulate_one("spngd", c, 2, INVERSE_STEP) == pytest.approx(spngd, rel=1e-12)
    # KAISA: the host work starts once DDP's all-reduces are done (backward blocks on them)
    e1 = 50.0 + 7.0 + 40.0 + cost("all_reduce", 33 * 16 * 4, 2, 2)
    ef = max(50.0 + 58.0, e1) + cost("all_reduce", (65**2 + 32**2 + 33**2 + 16**2 + 2) * 4, 2, 2)
    e0 = max(50.0 + 47.0 + 71.0, ef) + cost("all_reduce", 65 * 32 * 4, 2, 2)
    ef = max(ef, e0 + L)  # the inverses start after both and the host work
    b0 = cost("broadcast", (65**2 + 32**2 + 65 + 32) * 4, 2, 2)
    b1 = cost("broadcast", (33**2 + 16**2 + 33 + 16) * 4, 2, 2)
    kaisa = ef + 500.0 + b0 + b1 + 13.0 + 9.0 + W + 17.0
    assert simulate_one("kaisa", c, 2, INVERSE_STEP) == pytest.approx(kaisa, rel=1e-12)
    local = 50.0 + 47.0 + 71.0 + 500.0 + 90.0 + 13.0 + 9.0 + 17.0
    for strategy in ("spngd", "kaisa"):
        assert simulate_one(strategy, c, 1, PLAIN_STEP) == pytest.approx(
            50.0 + 40.0 + 60.0 + 13.0 + 9.0 + 17.0 + L + W)
        assert simulate_one(strategy, c, 1, INVERSE_STEP) == pytest.approx(local + L + W)
    assert simulate_one("sgd", c, 2, PLAIN_STEP) == simulate_one("sgd", two_layers(), 2,
                                                                   PLAIN_STEP)


def test_host_work_yields_no_event_row_and_no_stage_time():
    """The time is in the step, as in a measured trace, but in no stage and no event row."""
    from dataclasses import replace

    from kfacperf.sim.summary import EventColumns, stage_sums

    for strategy in ("spngd", "kaisa"):
        runs = []
        for costs in (two_layers(), replace(two_layers(), **HOST)):
            spec = StepSpec(costs=costs, world_size=2, gpus_per_node=1, kind=FACTOR_STEP,
                            comm=SPLIT)
            res = run_step(build_graph(make_step(parse_strategy(strategy), spec), cost))
            cols = EventColumns()
            rows = cols.add_step(res, step=0, offset_us=0.0)
            runs.append((res, stage_sums(res, 0), rows, cols))
        (plain, sums0, rows0, cols0), (host, sums1, rows1, cols1) = runs
        assert rows1 == rows0 == len(cols1.column("stage", "int16"))
        assert host.step_us > plain.step_us
        assert sums1.pop((S.STEP, "")) == pytest.approx(host.step_us)
        sums0.pop((S.STEP, ""))
        assert sums1 == pytest.approx(sums0)
        # the same rows with the same durations; only the step rows grow
        step_code = S.STAGE_NAMES.index(S.STEP)
        durs = []
        for cols in (cols0, cols1):
            is_step = cols.column("stage", "int16") == step_code
            durs.append(cols.column("dur", "float64")[~is_step])
        assert durs[1] == pytest.approx(durs[0])


# ------------------------------------------------------------------ reference evaluator
def reference(graph: StepGraph) -> tuple[list[list[float]], list[float], list[float]]:
    """Start of every compute task and collective, and each class's end, by relaxing the
    stream rules until nothing changes (no SimPy, no segments, no shared prefix)."""
    progs, colls = graph.programs, graph.collectives
    c_start = [[math.nan] * len(p.dur) for p in progs]
    c_end = [[math.nan] * len(p.dur) for p in progs]
    arrive = [[math.nan] * len(items) for items in graph.comm]
    k_start = [math.nan] * len(colls)
    k_end = [math.nan] * len(colls)
    slot = {(ci, k): i for ci, items in enumerate(graph.comm) for i, (k, _) in enumerate(items)}
    for _ in range(10 * (len(colls) + 2)):
        changed = False
        for ci, prog in enumerate(progs):
            prev = 0.0
            for t, d in enumerate(prog.dur):
                if math.isnan(c_end[ci][t]):
                    deps = [k_end[k] for k in graph.waits[ci][t]]
                    if any(math.isnan(x) for x in deps):
                        break
                    c_start[ci][t] = max([prev] + deps)
                    c_end[ci][t] = c_start[ci][t] + d
                    changed = True
                prev = c_end[ci][t]
            prev = 0.0
            for i, (k, after) in enumerate(graph.comm[ci]):
                if math.isnan(arrive[ci][i]):
                    dep = c_end[ci][after - 1] if after else 0.0
                    if math.isnan(dep):
                        break
                    arrive[ci][i] = max(prev, dep)
                    changed = True
                if math.isnan(k_end[k]):
                    times = [arrive[m][slot[(m, k)]] for m in colls[k].members]
                    if any(math.isnan(x) for x in times):
                        break
                    k_start[k] = max(times)
                    k_end[k] = k_start[k] + colls[k].cost_us
                    changed = True
                prev = k_end[k]
        if not changed:
            break
    ends = []
    for ci, prog in enumerate(progs):
        last = [c_end[ci][-1]] if prog.dur else []
        last += [k_end[k] for k, _ in graph.comm[ci][-1:]]
        ends.append(max(last + [0.0]))
    return c_start, k_start, ends


CASES = [(s, p, kind) for s in ("sgd", "spngd", "kaisa", "kaisa:0.5", "kaisa:mem-opt")
         for p in (2, 3, 4, 8) for kind in STEP_KINDS]


@pytest.mark.parametrize("gpn", [1, 4])
def test_engine_matches_reference_on_every_strategy(gpn):
    checked = 0
    for strategy, p, kind in CASES:
        costs = random_layer_costs(6, seed=p + 7 * gpn, other_params=1000)
        comm = CommSettings(ddp_bucket_mb=0.01, factor_bucket_mb=0.2)
        spec = StepSpec(costs=costs, world_size=p, gpus_per_node=gpn, kind=kind, comm=comm)
        try:
            step = make_step(parse_strategy(strategy), spec)
        except ValueError:  # kaisa:0.5 at P = 3
            continue
        graph = build_graph(step, cost, per_rank=True)
        res = run_step(graph)
        c_start, k_start, ends = reference(graph)
        for ci in range(len(graph.classes)):
            np.testing.assert_allclose(res.compute_start[ci], c_start[ci], rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(res.coll_start, k_start, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(res.class_end, ends, rtol=1e-12, atol=1e-9)
        checked += 1
    assert checked == 57  # every case but kaisa:0.5 at P = 3


def test_shared_prefix_gives_the_same_times_as_running_it_per_class():
    costs = random_layer_costs(12, seed=3, other_params=500)
    comm = CommSettings(ddp_bucket_mb=0.01, factor_bucket_mb=0.2)
    for strategy in ("spngd", "kaisa", "kaisa:0.25"):
        for kind in STEP_KINDS:
            spec = StepSpec(costs=costs, world_size=16, gpus_per_node=4, kind=kind, comm=comm)
            g = build_graph(make_step(parse_strategy(strategy), spec), cost)
            assert g.prefix[0] > 0
            shared = run_step(g)
            g.prefix = (0, 0)
            plain = run_step(g)
            np.testing.assert_allclose(shared.class_end, plain.class_end, rtol=1e-12)
            np.testing.assert_allclose(shared.coll_start, plain.coll_start, rtol=1e-12)
            for a, b in zip(shared.compute_start, plain.compute_start):
                np.testing.assert_allclose(a, b, rtol=1e-12)


def test_collectives_issued_in_different_orders_deadlock_with_a_clear_error():
    world = Group(("world",), ("world",), 2, 1)
    progs = []
    for names in (("a", "b"), ("b", "a")):
        p = Program()
        for n in names:
            p.launch(n, S.GRAD_COMM, "", "all_reduce", 8, world)
        progs.append(p)
    graph = assemble([RankClass(0, 1), RankClass(1, 1)], progs, cost, per_rank=True)
    with pytest.raises(RuntimeError, match="deadlocked"):
        run_step(graph)


def test_straggle_delays_each_collective_by_a_fraction_of_the_compute_since_the_last():
    """Two buckets with a straggle s: each all-reduce starts s x (the compute its members ran
    since their previous collective's launch) after its last member arrived, not s x the wall
    time since that collective ended; the compute that waits on it moves too."""
    s = 0.1
    c = two_layers(bwd=(400.0, 40.0))
    spec = StepSpec(costs=c, world_size=2, gpus_per_node=1, kind=PLAIN_STEP, comm=SPLIT)
    res = run_step(build_graph(make_step(parse_strategy("sgd"), spec), cost,
                               straggle=lambda n: s if n > 1 else 0.0))
    ar1 = cost("all_reduce", 33 * 16 * 4, 2, 2)
    ar0 = cost("all_reduce", 65 * 32 * 4, 2, 2)
    a1 = 50.0 + 40.0  # layer 1's bucket is ready; nothing synchronised since the step began
    e1 = a1 * (1 + s) + ar1
    a0 = max(50.0 + 40.0 + 400.0, e1)
    e0 = a0 + s * 400.0 + ar0  # layer 0's backward is the compute since layer 1's launch
    assert res.step_us == pytest.approx(e0 + 17.0, rel=1e-12)
    assert sorted(res.coll_start) == pytest.approx([a1 * (1 + s), a0 + s * 400.0])
    # no straggle: the same graph as before
    plain = run_step(build_graph(make_step(parse_strategy("sgd"), spec), cost))
    assert plain.step_us == pytest.approx(max(490.0, a1 + ar1) + ar0 + 17.0, rel=1e-12)
