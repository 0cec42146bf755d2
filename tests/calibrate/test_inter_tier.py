"""The inter-node tier fitted from groups spanning nodes recovers a known cluster exactly."""
from __future__ import annotations

from dataclasses import replace

import pytest

from kfacperf.bench.multinode import plan_groups, within_sizes
from kfacperf.bench.results import CommbenchResult, Point
from kfacperf.calibrate import cluster as cbf
from kfacperf.calibrate.inter_tier import spanning_terms
from kfacperf.sim.costs.collectives import group_collective_us
from kfacperf.sim.models.cluster import OPS, ClusterModel, Tier

SIZES = (4096, 65536, 1 << 20, 8 << 20)
INTRA_ALGOS = {"all_reduce": "ring", "reduce_scatter": "halving_doubling",
               "all_gather": "ring", "broadcast": "tree"}
INTER_ALGOS = {"all_reduce": "tree", "reduce_scatter": "ring",
               "all_gather": "halving_doubling", "broadcast": "tree"}


def truth(form: str, per_node: int = 4) -> ClusterModel:
    """Two tiers with their own per-collective values; the network is the slow link."""
    intra = Tier(alpha_us=8.0, bandwidth_GBps=20.0, algorithms=INTRA_ALGOS, assumed=False,
                 overrides={op: (8.0 + i, 20.0 + 5 * i) for i, op in enumerate(OPS)})
    inter = Tier(alpha_us=30.0, bandwidth_GBps=1.5, algorithms=INTER_ALGOS, assumed=False,
                 overrides={op: (30.0 + 7 * i, 1.5 + 0.25 * i) for i, op in enumerate(OPS)})
    return ClusterModel(name="truth", gpus_per_node=per_node, intra=intra, inter=inter,
                        multi_node={op: form for op in OPS})


def measured(cluster: ClusterModel, nnodes: int, per_node: int) -> CommbenchResult:
    """What commbench across ``nnodes`` nodes would time on ``cluster``: every planned group,
    at every size, as the simulator prices it."""
    points = []
    for g in plan_groups(nnodes, per_node, within_sizes(per_node)):
        for op in OPS:
            for n in SIZES:
                t = group_collective_us(cluster, op, n, group_size=g.size, nodes=g.nodes)
                points.append(Point(op=op, world_size=g.size, nbytes=n, time_us=t, reps=3,
                                    timing="batched", nodes=g.nodes))
    return CommbenchResult(backend="nccl", points=tuple(points))


@pytest.mark.parametrize("form", ["flat", "hierarchical"])
def test_both_tiers_are_recovered_from_groups_within_and_across_nodes(form: str) -> None:
    true = truth(form)
    model, tried = cbf.fit_cluster(measured(true, nnodes=8, per_node=4), name="fit",
                                   multi_node=form)
    assert model.gpus_per_node == 4 and dict(model.multi_node) == dict(true.multi_node)
    assert not model.intra.assumed and not model.inter.assumed
    for op in OPS:
        for tier in ("intra", "inter"):
            got, want = model.tier(tier).params(op), true.tier(tier).params(op)
            assert got.algorithm == want.algorithm, (op, tier)
            assert got.alpha_us == pytest.approx(want.alpha_us, rel=1e-5), (op, tier)
            assert got.bandwidth_GBps == pytest.approx(want.bandwidth_GBps, rel=1e-5), (op, tier)
        best_inter = next(f for f in tried[op] if f.tier == "inter")
        assert best_inter.rms_rel_error < 1e-6 and form in best_inter.note
    # the fitted model prices a group it never measured as the truth does
    for op in OPS:
        assert group_collective_us(model, op, 3 << 20, group_size=24, nodes=6) == pytest.approx(
            group_collective_us(true, op, 3 << 20, group_size=24, nodes=6), rel=1e-5)
    assert "groups spanning nodes: 2 nodes x 1 rank, 2 nodes x 4 ranks" in model.source
    assert f"the inter tier from groups spanning nodes ({form})" in model.description


def test_the_wrong_form_fits_worse_and_nccl_defaults_to_hierarchical() -> None:
    result = measured(truth("hierarchical"), nnodes=4, per_node=4)
    default, tried = cbf.fit_cluster(result, name="fit")  # backend nccl
    assert set(default.multi_node.values()) == {"hierarchical"}
    _, flat_tried = cbf.fit_cluster(result, name="fit", multi_node="flat")
    for op in OPS:
        right = next(f for f in tried[op] if f.tier == "inter").rms_rel_error
        wrong = next(f for f in flat_tried[op] if f.tier == "inter").rms_rel_error
        assert right < 1e-6 < wrong, op
    gloo = replace(result, backend="gloo")
    assert set(cbf.fit_cluster(gloo, name="g")[0].multi_node.values()) == {"flat"}
    with pytest.raises(ValueError, match="multi_node must be one of"):
        cbf.fit_cluster(result, name="x", multi_node="ring")


def test_one_rank_per_node_fits_the_inter_tier_and_copies_it_inside() -> None:
    """Two nodes of one rank (what the tests can run on one machine): no group within a node,
    so the intra tier is the inter tier's copy, marked assumed; the form does not matter."""
    true = truth("flat", per_node=1)
    result = measured(true, nnodes=2, per_node=1)
    assert {(p.world_size, p.nodes) for p in result.points} == {(2, 2)}
    for form in ("flat", "hierarchical"):
        model, _ = cbf.fit_cluster(result, name="two", multi_node=form)
        assert model.gpus_per_node == 1 and model.intra.assumed and not model.inter.assumed
        for op in OPS:  # (two ranks cannot tell a tree from a ring of half the bandwidth)
            for n in (1000, 3 << 20):
                assert group_collective_us(model, op, n, group_size=2, nodes=2) == pytest.approx(
                    group_collective_us(true, op, n, group_size=2, nodes=2), rel=1e-5)
            assert model.intra.params(op) == model.inter.params(op)
        assert "copy of the inter tier" in model.description


def test_a_hierarchical_group_of_several_ranks_per_node_needs_the_intra_tier() -> None:
    full = measured(truth("hierarchical"), nnodes=2, per_node=4)
    spanning_only = replace(full, points=tuple(p for p in full.points if p.nodes > 1))
    with pytest.raises(ValueError, match="needs the intra tier"):
        cbf.fit_cluster(spanning_only, name="x")
    with pytest.raises(ValueError, match="2 <= nodes"):
        spanning_terms("all_reduce", "ring", "flat", None, group_size=4, nodes=1, nbytes=1e6)


def test_single_machine_results_fit_as_before() -> None:
    """Without groups spanning nodes the inter tier stays the intra tier's copy, flat."""
    one = measured(truth("flat"), nnodes=2, per_node=4)
    within = replace(one, points=tuple(p for p in one.points if p.nodes == 1), backend="gloo")
    model, tried = cbf.fit_cluster(within, name="one")
    assert model.inter == replace(model.intra, assumed=True)
    assert set(model.multi_node.values()) == {"flat"} and model.gpus_per_node == 64
    assert all(f.tier == "intra" for fs in tried.values() for f in fs)
    assert model.description.startswith("Measured on one machine")


def test_groups_planned_across_nodes() -> None:
    assert (within_sizes(1) == () and within_sizes(6) == (2, 4, 6)
            and within_sizes(8, [4, 2]) == (2, 4))
    with pytest.raises(ValueError, match="cannot be larger"):
        within_sizes(2, [4])
    groups = plan_groups(4, 2, within_sizes(2))
    assert [(g.ranks, g.nodes) for g in groups] == [
        ((0, 1), 1),                                 # within node 0
        ((0, 2), 2), ((0, 1, 2, 3), 2),              # 2 nodes: one rank each, the whole nodes
        ((0, 2, 4, 6), 4), ((0, 1, 2, 3, 4, 5, 6, 7), 4)]
    assert [g.nodes for g in plan_groups(6, 1, ())] == [2, 4, 6]
    with pytest.raises(ValueError, match=">= 2 nodes"):
        plan_groups(1, 4, (2, 4))
