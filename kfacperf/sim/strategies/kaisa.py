"""``kaisa`` with gradient-worker fraction f (COMM-OPT f = 1, HYBRID-OPT, MEM-OPT f = 1/P).

One step, as the optimizer issues it (``kfacperf.kfac.strategy`` call order):

* forward; backward last layer first — DDP gradient buckets are all-reduced as they fill and,
  on factor steps, each layer's factors are computed in its hook and all-reduced in buckets;
* ``step()``: wait for DDP and the factor buckets; on inverse steps each rank inverts the
  layers assigned to it, then broadcasts every layer of its column to the column (f*P grad
  workers); it preconditions the layers of its column; when f < 1 every layer's
  preconditioned gradient is broadcast along each row from the row's grad worker; update.

**Symmetry classes.**  Rank ``r`` sits in row ``j = r // cols``, column ``i = r % cols``.  Its
work depends on its column's layers, the layers it inverts, and its row; the row broadcasts
depend on who is in the row.  A row's *type* is the set of inverse workers in it (with their
columns and layers); rows without inverse workers are all alike.  Classes are therefore the
ranks of rows holding inverse workers (one class per nonempty column, one for the empty
columns), and, for the idle rows (grouped by how many nodes a row spans), one class per
nonempty column plus one for the empty columns.  The row groups' *family* is (row type,
nodes); every row of a family has the same class composition, so the class simulation is
exact — ``tests/sim/test_engine_symmetry.py`` checks it against simulating every rank.
"""
from __future__ import annotations

from collections import defaultdict

from kfacperf import stages as S
from kfacperf.sim.graph import Group, Program, RankClass
from kfacperf.sim.placement import grad_workers, kaisa_placement, layer_cost, nodes_spanned
from kfacperf.sim.strategies.common import (
    BucketEvent, StepSpec, bucket_label, emit_backward, emit_forward, factor_bucket_plan,
)
from kfacperf.sim.strategies.sgd import DdpGradients


def resolve_fraction(fraction: float, world_size: int) -> float:
    """``0`` stands for MEM-OPT, ``1/P`` at every P."""
    return 1.0 / world_size if fraction == 0 else fraction


class KaisaStep:
    name = "kaisa"

    def __init__(self, spec: StepSpec, fraction: float) -> None:
        self.spec = spec
        costs = spec.costs
        p, g = spec.world_size, spec.gpus_per_node
        self.fraction = resolve_fraction(fraction, p)
        self.gw = gw = grad_workers(p, self.fraction)
        self.cols = cols = p // gw
        self.place = pl = kaisa_placement(
            [layer_cost(a, b) for a, b in zip(costs.dim_a, costs.dim_g)], p, gw)
        self.world = spec.world()
        self.ddp = DdpGradients(spec)
        if spec.kind.factor and self.world.size > 1:
            self.fac_after, self.fac_end = factor_bucket_plan(costs, spec.comm)
        else:
            self.fac_after, self.fac_end = {}, []
        self.fac_names = [("fac", ev.index) for evs in self.fac_after.values() for ev in evs]
        self.fac_names += [("fac", ev.index) for ev in self.fac_end]
        self.col_layers: dict[int, list[int]] = defaultdict(list)
        self.inv_layers: dict[int, list[int]] = defaultdict(list)
        for l in range(costs.n):
            self.col_layers[pl.column[l]].append(l)
            self.inv_layers[pl.inverse_worker[l]].append(l)
        self.col_group = {
            c: Group(("col", c), ("col", c), gw, nodes_spanned(c, gw, cols, g))
            for c in self.col_layers
        }
        row_workers: dict[int, list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
        for w, layers in self.inv_layers.items():
            row_workers[w // cols].append((w % cols, tuple(layers)))
        self.row_type = {j: tuple(sorted(v)) for j, v in row_workers.items()}
        self.inv_bytes = [costs.inverse_bytes(l, spec.comm) for l in range(costs.n)]
        self.pg_bytes = [costs.precond_bytes(l) for l in range(costs.n)]

    # ------------------------------------------------------------------ classes
    def _row_nodes(self, j: int) -> int:
        return nodes_spanned(j * self.cols, self.cols, 1, self.spec.gpus_per_node)

    def row_group(self, j: int) -> Group:
        n = self._row_nodes(j)
        return Group(("row", j), ("row", self.row_type.get(j, ()), n), self.cols, n)

    def classes(self, *, per_rank: bool) -> list[RankClass]:
        p, cols, g = self.spec.world_size, self.cols, self.spec.gpus_per_node
        if per_rank:
            return [RankClass(r, 1) for r in range(p)]
        full = sorted(self.col_layers)
        full_set = set(full)
        empty = cols - len(full)
        first_empty = next((c for c in range(cols) if c not in full_set), -1)
        out: list[RankClass] = []

        def row_classes(j: int, rows: int) -> None:
            out.extend(RankClass(j * cols + c, rows) for c in full)
            if empty:
                out.append(RankClass(j * cols + first_empty, rows * empty))

        busy = sorted(self.row_type)
        for j in busy:
            row_classes(j, 1)
        busy_set = set(busy)
        idle_rows = self.gw - len(busy)
        if idle_rows:
            if g % cols == 0 or cols % g == 0:  # every row spans the same number of nodes
                first = next(j for j in range(self.gw) if j not in busy_set)
                row_classes(first, idle_rows)
            else:
                by_nodes: dict[int, list[int]] = defaultdict(list)
                for j in range(self.gw):
                    if j not in busy_set:
                        by_nodes[self._row_nodes(j)].append(j)
                for rows in by_nodes.values():
                    row_classes(rows[0], len(rows))
        return out

    # ------------------------------------------------------------------ program
    def _launch_factors(self, prog: Program, ev: BucketEvent) -> None:
        label = bucket_label([self.spec.costs.names[l] for l in ev.layers])
        prog.launch(("fac", ev.index), S.FACTOR_COMM, label, "all_reduce", ev.nbytes, self.world)

    def program(self, rank: int) -> Program:
        spec, costs, kind = self.spec, self.spec.costs, self.spec.kind
        j, i = divmod(rank, self.cols)
        prog = Program()
        emit_forward(prog, costs)

        def hooks(l: int) -> None:
            self.ddp.after_layer(prog, l)
            if kind.factor:
                prog.compute(S.FACTOR_COMPUTE, costs.names[l], costs.factor[l],
                             costs.factor_flops[l])
                for ev in self.fac_after.get(l, ()):
                    self._launch_factors(prog, ev)

        emit_backward(prog, costs, hooks)
        self.ddp.finish(prog)
        if kind.factor:
            for ev in self.fac_end:
                self._launch_factors(prog, ev)
            prog.wait_all(self.fac_names)
        mine = self.col_layers.get(i, [])
        share = kind.inverse and self.gw > 1
        if kind.inverse:
            for l in self.inv_layers.get(rank, ()):
                prog.compute(S.INVERSE, costs.names[l], costs.inverse[l], costs.inverse_flops[l])
            if share:
                for l in mine:
                    prog.launch(("inv", l), S.INVERSE_COMM, costs.names[l], "broadcast",
                                self.inv_bytes[l], self.col_group[i])
        for l in mine:
            if share:
                prog.wait(("inv", l))
            prog.compute(S.PRECONDITION, costs.names[l], costs.precond[l], costs.precond_flops[l])
        if self.cols > 1:
            rg = self.row_group(j)
            for l in range(costs.n):
                prog.launch(("pg", l), S.PRECOND_COMM, costs.names[l], "broadcast",
                            self.pg_bytes[l], rg)
            prog.wait_all([("pg", l) for l in range(costs.n)])
        prog.compute(S.UPDATE, "", costs.update)
        return prog

    def memory(self) -> tuple[int, int]:
        """``(factor bytes, inverse bytes)`` on the most loaded GPU.

        Every rank keeps the running averages of every layer (the all-reduce delivers them
        everywhere); a rank holds the inverses of the layers of its column.
        """
        costs = self.spec.costs
        factors = sum(costs.factor_store_bytes(l) for l in range(costs.n))
        inverses = max(sum(self.inv_bytes[l] for l in ls) for ls in self.col_layers.values())
        return factors, inverses
