"""Step-graph building blocks: host programs and their assembly into a graph."""
from __future__ import annotations

import pytest

from helpers.sim_fakes import fake_collective_us
from kfacperf import vocab as S
from kfacperf.sim.graphs.graph import Group, Program, RankClass, assemble, shared_prefix

WORLD2 = Group(("world",), ("world",), 2, 1)


def test_compute_merges_only_uninterrupted_runs_of_one_stage_and_layer():
    p = Program()
    p.compute(S.BACKWARD, "", 10.0)
    p.compute(S.BACKWARD, "", 5.0)  # merged
    p.compute(S.FACTOR_COMPUTE, "a", 1.0)
    p.compute(S.FACTOR_COMPUTE, "b", 2.0)  # other layer: new task
    p.launch("x", S.GRAD_COMM, "", "all_reduce", 100, WORLD2)
    p.compute(S.FACTOR_COMPUTE, "b", 3.0)  # a launch in between: new task
    p.wait("x")
    p.compute(S.FACTOR_COMPUTE, "b", 4.0)  # a wait in between: new task
    assert p.stage == [S.BACKWARD, S.FACTOR_COMPUTE, S.FACTOR_COMPUTE, S.FACTOR_COMPUTE,
                       S.FACTOR_COMPUTE]
    assert p.dur == [15.0, 1.0, 2.0, 3.0, 4.0]
    assert p.waits == [(), (), (), (), ("x",)]
    assert p.launches[0].after == 3


def test_program_rejects_bad_use():
    p = Program()
    with pytest.raises(ValueError, match="never launched"):
        p.wait("nope")
    p.launch("x", S.GRAD_COMM, "", "all_reduce", 1, WORLD2)
    with pytest.raises(ValueError, match="launched twice"):
        p.launch("x", S.GRAD_COMM, "", "all_reduce", 1, WORLD2)
    with pytest.raises(ValueError, match="unknown collective op"):
        p.launch("y", S.GRAD_COMM, "", "alltoall", 1, WORLD2)
    with pytest.raises(ValueError, match=">= 0"):
        p.compute(S.FORWARD, "", -1.0)


def test_copy_is_independent_and_never_merges_into_its_base():
    base = Program()
    base.compute(S.FORWARD, "", 3.0)
    a, b = base.copy(), base.copy()
    a.compute(S.FORWARD, "", 2.0)
    assert a.dur == [3.0, 2.0] and base.dur == [3.0] and b.dur == [3.0]
    assert shared_prefix([a, b]) == (1, 0)
    assert shared_prefix([a, Program()]) == (0, 0)


def _two_rank_programs(bytes1: int = 100) -> list[Program]:
    progs = []
    for nbytes in (100, bytes1):
        p = Program()
        p.compute(S.FORWARD, "", 1.0)
        p.launch("g", S.GRAD_COMM, "", "all_reduce", nbytes, WORLD2)
        p.wait("g")
        p.compute(S.UPDATE, "", 1.0)
        progs.append(p)
    return progs


def test_assemble_joins_one_collective_with_its_cost():
    g = assemble([RankClass(0, 1), RankClass(1, 1)], _two_rank_programs(), fake_collective_us,
                 per_rank=True)
    assert len(g.collectives) == 1
    c = g.collectives[0]
    assert c.members == [0, 1] and c.payload == 100
    assert c.cost_us == fake_collective_us("all_reduce", 100, 2, 1)
    assert g.comm == [[(0, 1)], [(0, 1)]] and g.waits[0] == [(), (0,)]


def test_assemble_reports_members_that_disagree_or_are_missing():
    with pytest.raises(ValueError, match="disagrees"):
        assemble([RankClass(0, 1), RankClass(1, 1)], _two_rank_programs(bytes1=99),
                 fake_collective_us, per_rank=True)
    with pytest.raises(ValueError, match="launched by 1 ranks"):
        assemble([RankClass(0, 1)], _two_rank_programs()[:1], fake_collective_us, per_rank=True)
    # by family: 3 ranks cannot fill groups of 2
    with pytest.raises(ValueError, match="cannot fill groups of 2"):
        assemble([RankClass(0, 3)], _two_rank_programs()[:1], fake_collective_us, per_rank=False)


def test_unknown_stage_is_an_error():
    p = Program()
    p.compute("warmup", "", 1.0)
    with pytest.raises(ValueError, match="unknown stage"):
        assemble([RankClass(0, 1)], [p], fake_collective_us, per_rank=True)
