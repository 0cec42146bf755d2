"""What each strategy's step graph contains: order, buckets, bytes, placement, memory."""
from __future__ import annotations

import pytest

from helpers.sim_fakes import fake_collective_us as cost
from helpers.sim_fakes import random_layer_costs
from kfacperf import vocab as S
from kfacperf.buckets import plan_buckets
from kfacperf.sim.graphs.placement import (
    layer_cost,
    nodes_spanned,
    spngd_placement,
)
from kfacperf.sim.graphs.strategies import build_graph, make_step, parse_strategy
from kfacperf.sim.graphs.strategies.common import (
    CommSettings,
    StepSpec,
    ddp_buckets,
    factor_plan,
)
from kfacperf.vocab import FACTOR_STEP, INVERSE_STEP, PLAIN_STEP

LAYERS = random_layer_costs(8, seed=11, other_params=3000)
A, G = LAYERS.dim_a, LAYERS.dim_g
N = range(len(A))


def graph(strategy: str, p: int, kind=INVERSE_STEP, comm: CommSettings | None = None,
          per_rank: bool = True, gpn: int = 4):
    spec = StepSpec(costs=LAYERS, world_size=p, gpus_per_node=gpn, kind=kind,
                    comm=comm or CommSettings(factor_bucket_mb=0.1, ddp_bucket_mb=0.05))
    step = make_step(parse_strategy(strategy), spec)
    return step, build_graph(step, cost, per_rank=per_rank)


def payload(g, stage: str) -> int:
    return sum(c.payload for c in g.collectives if c.stage == stage)


# ------------------------------------------------------------------ buckets
def test_factor_buckets_are_the_optimizers_plan_each_sent_after_its_last_layer():
    """Whole layers, last first, statistics and one flag each, split by the optimizer's own
    rule (kfacperf.buckets.plan_buckets); a bucket is launched right after the factor
    statistics of its last layer, so nothing is left for after the backward pass."""
    comm = CommSettings(factor_bucket_mb=0.01)
    after, end = factor_plan(LAYERS, comm)
    events = sorted((ev for evs in after.values() for ev in evs), key=lambda ev: ev.index)
    sizes = [(l, (A[l] ** 2 + G[l] ** 2 + 1) * 4) for l in reversed(N)]
    assert [list(ev.layers) for ev in events] == plan_buckets(sizes, 10_000)
    assert len(events) > 2 and end == []
    assert all(after[ev.layers[-1]] == [ev] for ev in events)
    assert [ev.nbytes for ev in events] == [sum(n for l, n in sizes if l in ev.layers)
                                            for ev in events]


def test_ddp_buckets_close_once_they_reach_the_limit_in_reverse_layer_order():
    sizes = {l: a * g * 4 for l, (a, g) in enumerate(zip(A, G))}
    cap = 0.05
    buckets, nbytes = ddp_buckets(LAYERS, CommSettings(ddp_bucket_mb=cap, ddp_first_bucket_mb=cap))
    flat = [i for b in buckets for i in b]
    assert flat == list(reversed(N)) + [-1]
    limit = int(cap * 2**20)
    for b, nb in zip(buckets, nbytes):
        assert nb == sum(sizes.get(i, LAYERS.other_params * 4) for i in b)
        assert sum(sizes.get(i, 0) for i in b[:-1]) < limit  # closed by its last item
    assert all(nb >= limit for nb in nbytes[:-1])


@pytest.mark.parametrize("strategy", ["spngd", "kaisa"])
def test_factor_steps_pay_the_capture_overhead_on_forward_and_backward_only(strategy):
    """With capture scales 1.1 (forward) and 1.5 (backward), a factor step's forward and
    backward take exactly that much longer than with none; other stages, and plain steps,
    are unchanged."""
    from dataclasses import replace

    def stage_sums(costs, kind):
        spec = StepSpec(costs=costs, world_size=2, gpus_per_node=4, kind=kind,
                        comm=CommSettings(factor_bucket_mb=0.1, ddp_bucket_mb=0.05))
        prog = build_graph(make_step(parse_strategy(strategy), spec), cost).programs[0]
        sums: dict[str, float] = {}
        for s, d in zip(prog.stage, prog.dur):
            sums[s] = sums.get(s, 0.0) + d
        return sums

    scaled = replace(LAYERS, fwd_capture=1.1, bwd_capture=1.5)
    for kind in (FACTOR_STEP, INVERSE_STEP):
        base, capt = stage_sums(LAYERS, kind), stage_sums(scaled, kind)
        assert capt[S.FORWARD] == pytest.approx(1.1 * base[S.FORWARD], rel=1e-12)
        assert capt[S.BACKWARD] == pytest.approx(1.5 * base[S.BACKWARD], rel=1e-12)
        rest = {s: v for s, v in base.items() if s not in (S.FORWARD, S.BACKWARD)}
        assert {s: capt[s] for s in rest} == rest
    assert stage_sums(scaled, PLAIN_STEP) == stage_sums(LAYERS, PLAIN_STEP)


# ------------------------------------------------------------------ order and bytes
def test_backward_runs_last_layer_first_with_each_hook_before_its_layer():
    _, g = graph("kaisa", 4, FACTOR_STEP)
    prog = g.programs[0]
    factor_layers = [l for s, l in zip(prog.stage, prog.layer) if s == S.FACTOR_COMPUTE]
    assert factor_layers == [f"layer{i}" for i in reversed(N)]
    first_bwd = prog.stage.index(S.BACKWARD)
    assert prog.stage[:first_bwd] == [S.FORWARD, S.FACTOR_COMPUTE]


@pytest.mark.parametrize("strategy", ["kaisa", "kaisa:0.5", "spngd"])
@pytest.mark.parametrize("dtype,symmetric", [("fp32", False), ("fp16", False), ("bf16", True)])
def test_factor_payload_is_every_layers_a_and_g(strategy, dtype, symmetric):
    """Every layer's A and G, and its presence flag, in the factor precision."""
    comm = CommSettings(factor_dtype=dtype, symmetric=symmetric, factor_bucket_mb=0.1)
    _, g = graph(strategy, 4, FACTOR_STEP, comm)
    elems = sum((n * (n + 1) // 2 if symmetric else n * n) for d in (A, G) for n in d) + len(A)
    assert payload(g, S.FACTOR_COMM) == elems * (4 if dtype == "fp32" else 2)
    _, plain = graph(strategy, 4, PLAIN_STEP, comm)
    assert payload(plain, S.FACTOR_COMM) == 0


def test_spngd_sends_gradients_to_owners_and_gathers_preconditioned_ones():
    step, g = graph("spngd", 4)
    grads = [c for c in g.collectives if c.stage == S.GRAD_COMM]
    assert [c.op for c in grads] == ["reduce_scatter_v", "all_reduce"]
    # each gradient with the flag of whether the rank had it
    assert grads[0].payload == sum((a * b + 1) * 4 for a, b in zip(A, G))
    assert grads[1].payload == LAYERS.other_params * 4
    (ag,) = [c for c in g.collectives if c.stage == S.PRECOND_COMM]
    assert ag.op == "all_gather_v" and ag.payload == sum((a * b + 1) * 4 for a, b in zip(A, G))
    owner = spngd_placement([layer_cost(a, b) for a, b in zip(A, G)], 4).inverse_worker
    for r, prog in enumerate(g.programs):  # inverse and precondition exactly on owners
        for stage in (S.INVERSE, S.PRECONDITION):
            mine = [l for s, l in zip(prog.stage, prog.layer) if s == stage]
            assert mine == [f"layer{l}" for l in N if owner[l] == r]


def test_kaisa_broadcasts_depend_on_the_fraction():
    eigen = sum((a * a + b * b + a + b) * 4 for a, b in zip(A, G))
    precond = sum((a * b + 1) * 4 for a, b in zip(A, G))
    _, comm_opt = graph("kaisa", 8)  # one column of 8: inverses to all, nothing to send back
    assert payload(comm_opt, S.INVERSE_COMM) == eigen and payload(comm_opt, S.PRECOND_COMM) == 0
    _, mem_opt = graph("kaisa:mem-opt", 8)  # columns of one: no inverse broadcast
    assert payload(mem_opt, S.INVERSE_COMM) == 0 and payload(mem_opt, S.PRECOND_COMM) == precond
    _, hybrid = graph("kaisa:0.5", 8)  # 2 columns of 4 ranks, 4 rows of 2
    assert payload(hybrid, S.INVERSE_COMM) == eigen
    assert payload(hybrid, S.PRECOND_COMM) == 4 * precond  # every row sends every layer
    assert {c.size for c in hybrid.collectives if c.stage == S.PRECOND_COMM} == {2}
    assert {c.size for c in hybrid.collectives if c.stage == S.INVERSE_COMM} == {4}


def test_cholesky_inverse_state_is_two_matrices():
    comm = CommSettings(inverse_method="cholesky", symmetric=True, factor_bucket_mb=0.1)
    _, g = graph("kaisa", 4, INVERSE_STEP, comm)
    assert payload(g, S.INVERSE_COMM) == sum(
        (a * (a + 1) // 2 + b * (b + 1) // 2) * 4 for a, b in zip(A, G))


def test_no_communication_on_one_gpu():
    for s in ("sgd", "spngd", "kaisa", "kaisa:mem-opt"):
        for kind in (INVERSE_STEP, FACTOR_STEP, PLAIN_STEP):
            _, g = graph(s, 1, kind)
            assert g.collectives == []


def test_sgd_all_reduces_every_gradient_once():
    _, g = graph("sgd", 8)
    assert {c.op for c in g.collectives} == {"all_reduce"}
    assert payload(g, S.GRAD_COMM) == sum(a * b * 4 for a, b in zip(A, G)) + 3000 * 4
    assert {c.nodes for c in g.collectives} == {2}  # 8 GPUs, 4 per node


# ------------------------------------------------------------------ placement and memory
def test_nodes_spanned_counts_distinct_nodes():
    for first in range(12):
        for count in range(1, 12):
            for stride in range(1, 12):
                for g in (1, 2, 3, 4, 8):
                    expected = len({(first + k * stride) // g for k in range(count)})
                    assert nodes_spanned(first, count, stride, g) == expected


def test_memory_per_gpu():
    """Every rank keeps every layer's batch statistics; a layer's running averages live on
    the rank that inverts it, its inverse state on the ranks that precondition it; both
    numbers are those of the one GPU that holds the most."""
    store = [(a * a + b * b) * 4 for a, b in zip(A, G)]
    eigen = [(a * a + b * b + a + b) * 4 for a, b in zip(A, G)]
    spngd, _ = graph("spngd", 3)
    owner = spngd.place.inverse_worker
    per_rank = [(sum(store) + sum(store[l] for l in N if owner[l] == r),
                 sum(eigen[l] for l in N if owner[l] == r)) for r in range(3)]
    assert spngd.memory() == max(per_rank, key=sum)
    comm_opt, _ = graph("kaisa", 4)
    assert comm_opt.memory()[1] == sum(eigen)  # every rank holds every inverse
    worker = comm_opt.place.inverse_worker
    assert comm_opt.memory()[0] == sum(store) + max(
        sum(store[l] for l in N if worker[l] == r) for r in range(4))
    one, _ = graph("kaisa", 1)
    assert one.memory() == (2 * sum(store), sum(eigen))  # statistics and running averages
    # stored full even when sent as triangles: packing changes no held byte
    packed, _ = graph("kaisa:0.5", 4, comm=CommSettings(symmetric=True,
                                                        inverse_method="cholesky"))
    full, _ = graph("kaisa:0.5", 4, comm=CommSettings(inverse_method="cholesky"))
    assert packed.memory() == full.memory()
    assert graph("sgd", 4)[0].memory() == (0, 0)


def test_kaisa_fraction_must_divide_the_gpus():
    with pytest.raises(ValueError, match="must be an integer dividing 6"):
        graph("kaisa:0.25", 6)
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_strategy("lars")
    with pytest.raises(ValueError, match="not a number"):
        parse_strategy("kaisa:half")
    with pytest.raises(ValueError, match="only kaisa"):
        parse_strategy("spngd:0.5")
    assert parse_strategy("kaisa:1/4").fraction == 0.25
    assert parse_strategy("kaisa", default_fraction=0.5).fraction == 0.5
