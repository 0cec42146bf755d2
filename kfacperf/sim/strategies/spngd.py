"""``spngd``: every layer has an owner; factors and gradients go to it, results come back.

One step, as the optimizer issues it (``kfacperf.kfac.strategy`` call order):

* forward; backward last layer first — on factor steps each layer's factors are computed in
  its hook and reduce-scattered (-v, in buckets) so each owner receives the global factors of
  its layers, overlapping the rest of the backward pass;
* ``step()``: wait for the factors; on inverse steps owners invert their layers; gradients are
  reduce-scattered (-v, in buckets) to the owners and the non-K-FAC gradients all-reduced;
  owners precondition their layers; the preconditioned gradients are all-gathered (-v, in
  buckets) to every rank; update.

All collectives span every rank, so ranks differ only by the layers they own: one class per
owner, and one for all ranks that own nothing (there are many once P exceeds the layer count).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from kfacperf import stages as S
from kfacperf.sim.graph import Program, RankClass
from kfacperf.sim.placement import layer_cost, spngd_placement
from kfacperf.sim.strategies.common import (
    BucketEvent, QueueBuckets, StepSpec, bucket_label, emit_backward, emit_forward,
    factor_bucket_plan,
)


class SpngdStep:
    name = "spngd"

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        costs = spec.costs
        p = spec.world_size
        self.place = spngd_placement(
            [layer_cost(a, b) for a, b in zip(costs.dim_a, costs.dim_g)], p)
        self.owner = self.place.inverse_worker
        self.owned: dict[int, list[int]] = defaultdict(list)
        for l in range(costs.n):
            self.owned[self.owner[l]].append(l)
        self.world = spec.world()
        self.comm = p > 1
        self.fac_after: dict[int, list[BucketEvent]] = {}
        self.fac_end: list[BucketEvent] = []
        self.fac_label: dict[int, str] = {}
        self.fac_blocks: dict[int, tuple[int, ...]] = {}
        if spec.kind.factor and self.comm:
            self.fac_after, self.fac_end = factor_bucket_plan(costs, spec.comm)
            for ev in [e for evs in self.fac_after.values() for e in evs] + self.fac_end:
                self.fac_label[ev.index] = bucket_label([costs.names[l] for l in ev.layers])
                self.fac_blocks[ev.index] = self._blocks(
                    [(k[0], n) for k, n in ev.items])  # type: ignore[index]
        self.fac_names = [("fac", i) for i in self.fac_blocks]
        cap = int(spec.comm.factor_bucket_mb * 1_000_000)
        self.grads = self._buckets(cap, [costs.grad_bytes(l) for l in range(costs.n)])
        self.pgrads = self._buckets(cap, [costs.precond_bytes(l) for l in range(costs.n)])

    def _blocks(self, items: Sequence[tuple[int, int]]) -> tuple[int, ...]:
        blocks = [0] * self.spec.world_size
        for l, nbytes in items:
            blocks[self.owner[l]] += nbytes
        return tuple(blocks)

    def _buckets(self, cap: int, sizes: list[int]) -> list[tuple[str, tuple[int, ...]]]:
        """Layers in order, queued under ``cap``: ``(label, blocks per rank)`` per bucket."""
        if not self.comm:
            return []
        q = QueueBuckets(cap)
        raw: list[list[tuple[object, int]]] = []
        for l, nb in enumerate(sizes):
            raw += q.add(l, nb)
        raw += q.flush()
        names = self.spec.costs.names
        return [(bucket_label([names[int(k)] for k, _ in b]),  # type: ignore[call-overload]
                 self._blocks([(int(k), n) for k, n in b]))  # type: ignore[call-overload]
                for b in raw]

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

    def program(self, rank: int) -> Program:
        costs, kind = self.spec.costs, self.spec.kind
        prog = Program()
        emit_forward(prog, costs)

        def launch_factors(ev: BucketEvent) -> None:
            prog.launch(("fac", ev.index), S.FACTOR_COMM, self.fac_label[ev.index],
                        "reduce_scatter_v", self.fac_blocks[ev.index], self.world)

        def hooks(l: int) -> None:
            if kind.factor:
                prog.compute(S.FACTOR_COMPUTE, costs.names[l], costs.factor[l],
                             costs.factor_flops[l])
                for ev in self.fac_after.get(l, ()):
                    launch_factors(ev)

        emit_backward(prog, costs, hooks)
        if kind.factor:
            for ev in self.fac_end:
                launch_factors(ev)
            prog.wait_all(self.fac_names)
        mine = self.owned.get(rank, [])
        if kind.inverse:
            for l in mine:
                prog.compute(S.INVERSE, costs.names[l], costs.inverse[l], costs.inverse_flops[l])
        names = []
        for b, (label, blocks) in enumerate(self.grads):
            prog.launch(("grad", b), S.GRAD_COMM, "", "reduce_scatter_v", blocks, self.world)
            names.append(("grad", b))
        if self.comm and costs.other_params:
            prog.launch(("other",), S.GRAD_COMM, "", "all_reduce", costs.other_params * 4,
                        self.world)
            names.append(("other",))
        prog.wait_all(names)
        for l in mine:
            prog.compute(S.PRECONDITION, costs.names[l], costs.precond[l], costs.precond_flops[l])
        names = []
        for b, (label, blocks) in enumerate(self.pgrads):
            prog.launch(("pg", b), S.PRECOND_COMM, label, "all_gather_v", blocks, self.world)
            names.append(("pg", b))
        prog.wait_all(names)
        prog.compute(S.UPDATE, "", costs.update)
        return prog

    def memory(self) -> tuple[int, int]:
        """``(factor bytes, inverse bytes)`` on the most loaded GPU: its own layers only."""
        costs, cs = self.spec.costs, self.spec.comm
        factors = max(sum(costs.factor_store_bytes(l) for l in ls) for ls in self.owned.values())
        inverses = max(sum(costs.inverse_bytes(l, cs) for l in ls) for ls in self.owned.values())
        return factors, inverses
