"""``spngd``: every layer has an owner; factors and gradients go to it, results come back.

One step as :class:`kfacperf.kfac.strategies.spngd.SPNGDStrategy` and the trainer issue it
(no DDP):

* forward; backward last layer first — on factor steps each layer's output-gradient hook
  computes its batch statistics, and the factor bucket it completes (whole layers, planned
  at set-up: :func:`~kfacperf.sim.graphs.strategies.common.factor_plan`) is
  reduce-scattered (-v) at once, so each owner receives the global factors of its layers
  while the backward pass goes on;
* ``step()``: the factor buckets are waited for; on inverse steps owners
  invert their layers; one reduce-scatter-v sends every K-FAC gradient to its owner and an
  all-reduce averages the other gradients; owners precondition their layers; one
  all-gather-v returns every preconditioned gradient to every rank; update.

All collectives span every rank, so ranks differ only by the layers they own: one class per
owner and one for all ranks that own nothing (most of them once P exceeds the layer count).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from kfacperf import vocab as S
from kfacperf.buckets import bucket_label
from kfacperf.sim.graphs.graph import Program, RankClass
from kfacperf.sim.graphs.memory import fisher_blocks_of, kfac_state_per_gpu
from kfacperf.sim.graphs.placement import contiguous_placement, spngd_placement
from kfacperf.sim.graphs.strategies.common import (
    FP32,
    BucketEvent,
    StepSpec,
    emit_factor_prefix,
    emit_unstaged,
    factor_plan,
)


class SpngdStep:
    name = "spngd"

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        costs = spec.costs
        p = spec.world_size
        if spec.comm.placement == S.CONTIGUOUS:
            self.place = contiguous_placement(costs.names, p)
        else:
            self.place = spngd_placement(
                [costs.placement_cost(l) for l in range(costs.n)], p)
        self.owner = self.place.inverse_worker
        self.owned: dict[int, list[int]] = defaultdict(list)
        for l in range(costs.n):
            self.owned[self.owner[l]].append(l)
        self.world = spec.world()
        self.comm = p > 1
        self.fac_after: dict[int, list[BucketEvent]] = {}
        self.fac_end: list[BucketEvent] = []
        self.fac_blocks: dict[int, tuple[int, ...]] = {}
        if spec.kind.factor and self.comm:
            self.fac_after, self.fac_end = factor_plan(costs, spec.comm)
            for ev in [e for evs in self.fac_after.values() for e in evs] + self.fac_end:
                self.fac_blocks[ev.index] = self._blocks(
                    [(k[0], n) for k, n in ev.items])
        all_layers = range(costs.n)
        # each layer's gradient and the flag of whether this rank had it (kfacperf.kfac)
        self.grad_blocks = self._blocks([(l, costs.grad_bytes(l) + FP32) for l in all_layers])
        self.pg_blocks = self._blocks([(l, costs.precond_bytes(l, spec.comm)) for l in all_layers])
        self.all_label = bucket_label(costs.names)
        self._shared: Program | None = None

    def _blocks(self, items: Sequence[tuple[int, int]]) -> tuple[int, ...]:
        """Bytes per rank: each item counts on its layer's owner."""
        blocks = [0] * self.spec.world_size
        for l, nbytes in items:
            blocks[self.owner[l]] += nbytes
        return tuple(blocks)

    def classes(self, *, per_rank: bool) -> list[RankClass]:
        p = self.spec.world_size
        if per_rank:
            return [RankClass(r, 1) for r in range(p)]
        owners = sorted(self.owned)
        out = [RankClass(r, 1) for r in owners]
        if p > len(owners):
            taken = set(owners)
            out.append(RankClass(next(r for r in range(p) if r not in taken), p - len(owners)))
        return out

    def _prefix(self) -> Program:
        """What every rank issues alike: forward, backward, waiting for the factors."""
        def launch(prog: Program, ev: BucketEvent, label: str) -> None:
            prog.launch(("fac", ev.index), S.FACTOR_COMM, label, "reduce_scatter_v",
                        self.fac_blocks[ev.index], self.world)

        return emit_factor_prefix(self.spec.costs, self.spec.kind, (self.fac_after, self.fac_end),
                                  launch)

    def program(self, rank: int) -> Program:
        costs, kind = self.spec.costs, self.spec.kind
        if self._shared is None:
            self._shared = self._prefix()
        prog = self._shared.copy()
        mine = self.owned.get(rank, [])
        if kind.inverse:
            for l in mine:
                prog.compute(S.INVERSE, costs.names[l], costs.inverse[l], costs.inverse_flops[l])
        if self.comm:
            prog.launch(("grad",), S.GRAD_COMM, "", "reduce_scatter_v", self.grad_blocks,
                        self.world)
            names = [("grad",)]
            if costs.other_params:
                prog.launch(("other",), S.GRAD_COMM, "", "all_reduce", costs.other_params * FP32,
                            self.world)
                names.append(("other",))
            prog.wait_all(names)
        for l in mine:
            prog.compute(S.PRECONDITION, costs.names[l], costs.precond[l], costs.precond_flops[l])
        if self.comm:
            prog.launch(("pg",), S.PRECOND_COMM, self.all_label, "all_gather_v", self.pg_blocks,
                        self.world)
            prog.wait(("pg",))
        emit_unstaged(prog, costs.grad_write)
        prog.compute(S.UPDATE, "", costs.update)
        return prog

    def memory(self) -> tuple[int, int]:
        """``(factor bytes, inverse bytes)`` of the GPU holding the most K-FAC state: every
        layer's batch statistics, and the running averages and inverse state of its own
        layers (:func:`kfacperf.sim.graphs.memory.kfac_state_per_gpu`)."""
        state = kfac_state_per_gpu(fisher_blocks_of(self.spec.costs), self.place,
                                   self.spec.comm.inverse_method)
        return state.factors, state.inverses
