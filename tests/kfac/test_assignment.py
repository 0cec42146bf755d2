"""Golden cases for the LPT layer-to-rank assignment (worked out by hand in the comments)."""
from __future__ import annotations

import itertools

import pytest

from kfacperf.kfac.assignment import (
    LayerShape,
    grad_worker_groups,
    grad_workers_count,
    inverse_cost,
    kaisa_assignment,
    lpt_assign,
    receiver_groups,
    spngd_assignment,
)

# cost = dim_a**3 + dim_g**3
LAYERS = [
    LayerShape(name="L0", dim_a=28, dim_g=16),    # 21,952 + 4,096 = 26,048
    LayerShape(name="L1", dim_a=145, dim_g=16),   # 3,048,625 + 4,096 = 3,052,721
    LayerShape(name="L2", dim_a=145, dim_g=32),   # 3,048,625 + 32,768 = 3,081,393
    LayerShape(name="L3", dim_a=289, dim_g=32),   # 24,137,569 + 32,768 = 24,170,337
    LayerShape(name="L4", dim_a=65, dim_g=10),    # 274,625 + 1,000 = 275,625
]
# LPT order: L3, L2, L1, L4, L0.


def test_inverse_cost() -> None:
    assert inverse_cost(289, 32) == 24_170_337
    with pytest.raises(ValueError, match="dim_a=0"):
        inverse_cost(0, 3)


def test_spngd_two_ranks() -> None:
    # L3 -> 0; L2 -> 1 (3.08M); L1 -> 1 (6.13M < 24.2M); L4 -> 1; L0 -> 1.
    a = spngd_assignment(LAYERS, 2)
    assert dict(a.inverse_worker) == {"L0": 1, "L1": 1, "L2": 1, "L3": 0, "L4": 1}
    assert a.owned_by(0) == ["L3"] and a.owned_by(1) == ["L0", "L1", "L2", "L4"]
    assert a.loads() == [24_170_337, 26_048 + 3_052_721 + 3_081_393 + 275_625]
    assert all(a.grad_workers[n] == (a.inverse_worker[n],) for n in a.inverse_worker)


def test_spngd_four_ranks() -> None:
    # L3 -> 0, L2 -> 1, L1 -> 2, L4 -> 3, L0 -> 3 (275,625 is the lowest load).
    a = spngd_assignment(LAYERS, 4)
    assert dict(a.inverse_worker) == {"L0": 3, "L1": 2, "L2": 1, "L3": 0, "L4": 3}


def test_more_ranks_than_layers_leaves_idle_ranks() -> None:
    a = spngd_assignment(LAYERS, 8)
    assert dict(a.inverse_worker) == {"L0": 4, "L1": 2, "L2": 1, "L3": 0, "L4": 3}
    assert [a.owned_by(r) for r in (5, 6, 7)] == [[], [], []]


def test_ties_keep_layer_order_and_lowest_rank() -> None:
    same = [LayerShape(name=f"l{i}", dim_a=10, dim_g=10) for i in range(4)]
    assert dict(spngd_assignment(same, 2).inverse_worker) == {"l0": 0, "l1": 1, "l2": 0,
                                                              "l3": 1}


def test_lpt_is_deterministic_and_independent_of_input_order_for_distinct_costs() -> None:
    costs = [(s.name, float(inverse_cost(s.dim_a, s.dim_g))) for s in LAYERS]
    expected = lpt_assign(costs, 3)
    for perm in itertools.permutations(costs):
        assert lpt_assign(list(perm), 3) == expected


def test_lpt_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        lpt_assign([("a", 1.0), ("a", 2.0)], 2)
    with pytest.raises(ValueError, match="bins"):
        lpt_assign([("a", 1.0)], 0)
    with pytest.raises(ValueError, match="no K-FAC layers"):
        spngd_assignment([], 2)


def test_grid_groups() -> None:
    assert grad_worker_groups(4, 2) == [(0, 2), (1, 3)]
    assert receiver_groups(4, 2) == [(0, 1), (2, 3)]
    assert grad_worker_groups(4, 4) == [(0, 1, 2, 3)]
    assert receiver_groups(4, 4) == [(0,), (1,), (2,), (3,)]
    assert grad_worker_groups(4, 1) == [(0,), (1,), (2,), (3,)]
    assert receiver_groups(4, 1) == [(0, 1, 2, 3)]
    # every receiver row meets every grad-worker column exactly once
    for p, gw in ((8, 2), (8, 4), (6, 3)):
        for col in grad_worker_groups(p, gw):
            for row in receiver_groups(p, gw):
                assert len(set(col) & set(row)) == 1


def test_kaisa_hybrid_four_ranks_half() -> None:
    # columns (0, 2) and (1, 3).  Columns by LPT: L3 -> c0; L2, L1, L4, L0 -> c1.
    # Inside c1: L2 -> 1, L1 -> 3, L4 -> 3 (3.05M < 3.08M), L0 -> 1 (3.08M < 3.33M).
    a = kaisa_assignment(LAYERS, 4, 0.5)
    assert dict(a.inverse_worker) == {"L0": 1, "L1": 3, "L2": 1, "L3": 0, "L4": 3}
    assert a.grad_workers["L3"] == (0, 2)
    assert all(a.grad_workers[n] == (1, 3) for n in ("L0", "L1", "L2", "L4"))
    # rank 1 (row 0) receives L3 from 0, rank 3 (row 1) from 2
    assert a.grad_source("L3", 1) == 0 and a.grad_source("L3", 3) == 2
    assert a.grad_source("L2", 0) == 1 and a.grad_source("L2", 2) == 3
    assert a.grad_source("L2", 3) == 3
    assert a.preconditioned_by(2) == ["L3"]


def test_kaisa_comm_opt_and_mem_opt_match_lpt_over_ranks() -> None:
    spngd = dict(spngd_assignment(LAYERS, 4).inverse_worker)
    comm_opt = kaisa_assignment(LAYERS, 4, 1.0)
    mem_opt = kaisa_assignment(LAYERS, 4, 0.25)
    assert dict(comm_opt.inverse_worker) == spngd == dict(mem_opt.inverse_worker)
    assert all(w == (0, 1, 2, 3) for w in comm_opt.grad_workers.values())
    assert all(mem_opt.grad_workers[n] == (r,) for n, r in spngd.items())
    assert mem_opt.grad_source("L3", 2) == 0


@pytest.mark.parametrize("f,world", [(0.75, 4), (1 / 3, 4), (0.0, 4), (1.5, 4), (0.3, 10),
                                     (True, 2), ("1", 2)])
def test_grad_worker_fraction_that_does_not_divide_the_world(f: object, world: int) -> None:
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        grad_workers_count(world, f)  # type: ignore[arg-type]


@pytest.mark.parametrize("f,world,gw", [(1.0, 4, 4), (0.5, 4, 2), (0.25, 4, 1), (1 / 3, 6, 2),
                                        (1.0, 1, 1)])
def test_grad_worker_fraction_valid(f: float, world: int, gw: int) -> None:
    assert grad_workers_count(world, f) == gw


@pytest.mark.parametrize("strategy", ["spngd", "kaisa", "kaisa:0.5", "kaisa:mem-opt"])
def test_the_optimizer_places_layers_where_the_simulator_does(strategy: str) -> None:
    """The real optimizer's assignment for ResNet-20 (its registered K-FAC layers) equals
    the simulator's placement for the committed resnet20 workload model, at several world
    sizes: the same layer costs from two sources, placed by the one LPT rule."""
    from kfacperf.kfac.preconditioner import KFACPreconditioner
    from kfacperf.kfac.strategies import make_strategy
    from kfacperf.kfac.strategies.base import layer_shapes
    from kfacperf.sim.costs.model import CostModel
    from kfacperf.sim.graphs.layer_costs import layer_costs
    from kfacperf.sim.graphs.strategies import make_step, parse_strategy
    from kfacperf.sim.graphs.strategies.common import CommSettings, StepSpec
    from kfacperf.sim.models import load_cluster, load_device, load_workload
    from kfacperf.vocab import INVERSE_STEP
    from kfacperf.workloads import get_workload

    model = get_workload("resnet20").build_model(seed=0)
    shapes = layer_shapes(KFACPreconditioner(model, damping=1e-3, lr=0.1).layers)
    workload = load_workload("resnet20")
    costs = layer_costs(CostModel(workload=workload, device=load_device("h100-sxm5"),
                                  cluster=load_cluster("dgx-h100-ndr")), workload, batch=32)
    assert list(costs.names) == [s.name for s in shapes]
    spec = parse_strategy(strategy)
    for world in (1, 2, 3, 4, 8, 64):
        fraction = spec.fraction if spec.fraction else 1.0 / world
        if spec.name == "kaisa" and (fraction * world) % 1:
            continue
        options = {"grad_worker_fraction": fraction} if spec.name == "kaisa" else {}
        real = make_strategy(spec.name, **options).make_assignment(shapes, world)
        sim = make_step(spec, StepSpec(costs=costs, world_size=world, gpus_per_node=8,
                                       kind=INVERSE_STEP, comm=CommSettings())).place
        assert [real.inverse_worker[s.name] for s in shapes] == list(sim.inverse_worker)
        assert [real.grad_workers[s.name] for s in shapes] == [
            tuple(sim.column_members(c)) for c in sim.column]
