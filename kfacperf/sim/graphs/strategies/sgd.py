"""``sgd``: the DDP baseline — bucketed gradient all-reduce overlapped with backward."""
from __future__ import annotations

from kfacperf import vocab as S
from kfacperf.sim.graphs.graph import Program, RankClass
from kfacperf.sim.graphs.strategies.common import (
    StepSpec,
    ddp_buckets,
    emit_backward,
    emit_forward,
)


class DdpGradients:
    """DDP's gradient buckets: each is all-reduced as soon as its last gradient exists.

    DDP's reducer waits for every bucket at the end of backward, so the compute issued after
    :meth:`finish` (the optimizer step) waits for all of them.
    """

    def __init__(self, spec: StepSpec) -> None:
        self.world = spec.world()
        buckets, self.sizes = ddp_buckets(spec.costs, spec.comm)
        self.after: dict[int, list[int]] = {}
        for b, items in enumerate(buckets):
            last = items[-1]
            self.after.setdefault(max(last, 0), []).append(b)
        self.names = [("ddp", b) for b in range(len(buckets))] if self.world.size > 1 else []

    def after_layer(self, prog: Program, l: int) -> None:
        if not self.names:
            return
        for b in self.after.get(l, ()):
            prog.launch(("ddp", b), S.GRAD_COMM, "", "all_reduce", self.sizes[b], self.world)

    def finish(self, prog: Program) -> None:
        prog.wait_all(self.names)


class SgdStep:
    """Every rank does the same work: one symmetry class."""

    name = "sgd"

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        self.ddp = DdpGradients(spec)

    def classes(self, *, per_rank: bool) -> list[RankClass]:
        p = self.spec.world_size
        return [RankClass(r, 1) for r in range(p)] if per_rank else [RankClass(0, p)]

    def program(self, rank: int) -> Program:
        costs = self.spec.costs
        prog = Program()
        emit_forward(prog, costs)
        emit_backward(prog, costs, factor=False, on_grad=lambda l: self.ddp.after_layer(prog, l))
        self.ddp.finish(prog)
        prog.compute(S.UPDATE, "", costs.update)
        return prog

    def memory(self) -> tuple[int, int]:
        """``(factor bytes, inverse bytes)`` held by the most loaded GPU."""
        return 0, 0
