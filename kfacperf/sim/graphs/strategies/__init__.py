"""Step-graph builders, one per distribution strategy (same names as the real optimizer).

``parse_strategy("kaisa:0.5")`` gives a :class:`StrategySpec`; ``make_step(strategy, spec)``
the builder for one step kind at one GPU count; ``build_graph(step, cost)`` the
:class:`~kfacperf.sim.graphs.graph.StepGraph` over its symmetry classes (or over every rank with
``per_rank=True``, the reference the symmetry test compares against).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

from kfacperf.sim.graphs.graph import (
    CollectiveCost,
    Program,
    RankClass,
    StepGraph,
    assemble,
)
from kfacperf.sim.graphs.strategies.common import StepSpec
from kfacperf.sim.graphs.strategies.kaisa import KaisaStep
from kfacperf.sim.graphs.strategies.sgd import SgdStep
from kfacperf.sim.graphs.strategies.spngd import SpngdStep
from kfacperf.vocab import KAISA, SGD, SIM_STRATEGIES, SPNGD

STRATEGIES: tuple[str, ...] = SIM_STRATEGIES
KAISA_ALIASES: dict[str, float] = {"comm-opt": 1.0, "mem-opt": 0.0}


class StepBuilder(Protocol):
    name: str

    def classes(self, *, per_rank: bool) -> list[RankClass]: ...

    def program(self, rank: int) -> Program: ...

    def memory(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class StrategySpec:
    """A strategy to simulate; ``fraction`` is KAISA's f (0 = MEM-OPT, 1/P at every P)."""

    name: str
    fraction: float | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}; known: {', '.join(STRATEGIES)}")
        if self.name == KAISA:
            f = self.fraction
            if f is None or isinstance(f, bool) or not 0.0 <= f <= 1.0:
                raise ValueError(f"kaisa grad_worker_fraction must be in [0, 1] "
                                 f"(0 = MEM-OPT), got {f!r}")
        elif self.fraction is not None:
            raise ValueError(f"strategy {self.name!r} takes no grad_worker_fraction")
        if not self.label:
            object.__setattr__(self, "label", self.name)


def parse_strategy(text: str, *, default_fraction: float = 1.0) -> StrategySpec:
    """``sgd``, ``spngd``, ``kaisa``, ``kaisa:0.5``, ``kaisa:1/8``, ``kaisa:mem-opt``..."""
    raw = text.strip()
    name, sep, arg = raw.partition(":")
    name = name.strip().lower()
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {raw!r}; known: {', '.join(STRATEGIES)} "
                         f"(kaisa takes :f, e.g. kaisa:0.5 or kaisa:mem-opt)")
    if name != KAISA:
        if sep:
            raise ValueError(f"strategy {raw!r}: only kaisa takes a parameter (kaisa:f)")
        return StrategySpec(name)
    if not sep:
        return StrategySpec(KAISA, float(default_fraction), KAISA)
    arg = arg.strip().lower()
    if arg in KAISA_ALIASES:
        f = KAISA_ALIASES[arg]
    else:
        try:
            f = float(Fraction(arg))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"strategy {raw!r}: grad_worker_fraction {arg!r} is not a number "
                             f"in [0, 1], comm-opt or mem-opt") from None
    return StrategySpec(KAISA, f, f"kaisa:{arg}")


def make_step(strategy: StrategySpec, spec: StepSpec) -> StepBuilder:
    if strategy.name == SGD:
        return SgdStep(spec)
    if strategy.name == SPNGD:
        return SpngdStep(spec)
    assert strategy.fraction is not None
    return KaisaStep(spec, strategy.fraction)


def build_graph(step: StepBuilder, cost: CollectiveCost, *, per_rank: bool = False,
                straggle: Callable[[int], float] | None = None) -> StepGraph:
    classes = step.classes(per_rank=per_rank)
    programs = [step.program(c.rank) for c in classes]
    return assemble(classes, programs, cost, per_rank=per_rank, straggle=straggle)


__all__ = [
    "STRATEGIES", "StepBuilder", "StrategySpec", "build_graph", "make_step", "parse_strategy",
]
