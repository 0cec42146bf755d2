"""Symmetry classes: simulating one rank per class gives every rank's exact timeline.

The reference simulates every rank as its own class and matches every group by its concrete
members (no families, no shared prefix).  The class simulation must reproduce the per-rank
timelines as a multiset: each class's timeline ``count`` times.
"""
from __future__ import annotations

from collections import Counter

import pytest

from helpers.sim_fakes import fake_collective_us as cost
from helpers.sim_fakes import random_layer_costs
from kfacperf.sim.engine import StepResult, run_step
from kfacperf.sim.graphs.graph import RankClass, assemble
from kfacperf.sim.graphs.strategies import build_graph, make_step, parse_strategy
from kfacperf.sim.graphs.strategies.common import CommSettings, StepSpec
from kfacperf.vocab import STEP_KINDS

STRATEGIES = ("sgd", "spngd", "kaisa", "kaisa:0.5", "kaisa:0.25", "kaisa:1/8", "kaisa:mem-opt")
GPUS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
COMM = CommSettings(ddp_bucket_mb=0.05, factor_bucket_mb=0.3)


def timelines(res: StepResult) -> list[tuple]:
    out = []
    for ci in range(len(res.graph.classes)):
        ks = [k for k, _ in res.graph.comm[ci]]
        out.append((tuple(round(float(x), 6) for x in res.compute_start[ci]),
                    tuple(round(float(res.coll_start[k]), 6) for k in ks),
                    round(float(res.class_end[ci]), 6)))
    return out


def by_class(res: StepResult) -> Counter:
    out: Counter = Counter()
    for tl, c in zip(timelines(res), res.graph.classes):
        out[tl] += c.count
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_classes_reproduce_every_rank(strategy):
    layers = random_layer_costs(10, seed=len(strategy), other_params=2000)
    checked = 0
    for p in GPUS:
        for gpn in (4, 3):
            for kind in STEP_KINDS:
                spec = StepSpec(costs=layers, world_size=p, gpus_per_node=gpn, kind=kind,
                                comm=COMM)
                try:
                    step = make_step(parse_strategy(strategy), spec)
                except ValueError:  # f * P not an integer dividing P
                    continue
                classes = step.classes(per_rank=False)
                assert sum(c.count for c in classes) == p
                assert len({c.rank for c in classes}) == len(classes)
                fast = run_step(build_graph(step, cost))
                full = run_step(build_graph(step, cost, per_rank=True))
                assert by_class(fast) == Counter(timelines(full)), (p, gpn, kind.name)
                assert fast.step_us == full.step_us
                checked += 1
    assert checked >= 30


def test_a_wrong_partition_is_caught():
    """Claiming all ranks of HYBRID-OPT alike simulates rank 0 only: the check must see it."""
    layers = random_layer_costs(10, seed=1)
    spec = StepSpec(costs=layers, world_size=8, gpus_per_node=4, kind=STEP_KINDS[0], comm=COMM)
    step = make_step(parse_strategy("kaisa:0.5"), spec)
    wrong = assemble([RankClass(0, 8)], [step.program(0)], cost, per_rank=False)
    full = run_step(build_graph(step, cost, per_rank=True))
    assert by_class(run_step(wrong)) != Counter(timelines(full))


@pytest.mark.parametrize("strategy,expected", [
    ("sgd", 1), ("spngd", 55), ("kaisa", 55), ("kaisa:mem-opt", 55)])
def test_class_count_at_scale(strategy, expected):
    """Past the layer count: one class per layer owner plus one for everybody else."""
    layers = random_layer_costs(54, seed=5)
    spec = StepSpec(costs=layers, world_size=4096, gpus_per_node=8, kind=STEP_KINDS[0],
                    comm=CommSettings())
    classes = make_step(parse_strategy(strategy), spec).classes(per_rank=False)
    assert len(classes) == expected
    assert sum(c.count for c in classes) == 4096


@pytest.mark.parametrize("strategy", ("sgd", "spngd", "kaisa:0.5"))
def test_classes_reproduce_every_rank_with_a_straggle(strategy):
    """The straggle depends on each class's own history, so classes must still be exact."""
    layers = random_layer_costs(6, seed=3, other_params=2000)
    for p in (2, 4, 6, 8, 16):
        for kind in STEP_KINDS:
            spec = StepSpec(costs=layers, world_size=p, gpus_per_node=4, kind=kind, comm=COMM)
            step = make_step(parse_strategy(strategy), spec)
            straggle = (lambda n: 0.02 * n)  # noqa: E731 - grows with the group
            fast = run_step(build_graph(step, cost, straggle=straggle))
            full = run_step(build_graph(step, cost, per_rank=True, straggle=straggle))
            assert by_class(fast) == Counter(timelines(full)), (p, kind.name)
            plain = run_step(build_graph(step, cost))
            assert fast.step_us > plain.step_us  # it waits somewhere: every step synchronises
