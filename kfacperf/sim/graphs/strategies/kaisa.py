"""``kaisa`` with gradient-worker fraction f (COMM-OPT f = 1, HYBRID-OPT, MEM-OPT f = 1/P).

One step as :class:`kfacperf.kfac.strategies.kaisa.KAISAStrategy` and the trainer issue it:

* forward; backward last layer first — on factor steps each layer's output-gradient hook
  computes its batch statistics, and the factor bucket it completes (whole layers, planned
  at set-up: :func:`~kfacperf.sim.graphs.strategies.common.factor_plan`) is all-reduced at
  once; after the layer's own backward, DDP all-reduces every gradient bucket that is
  complete;
* ``step()``: DDP's buckets and the factor buckets are waited for; on inverse steps each rank
  inverts the layers assigned to it, then every inverse worker of a column broadcasts its
  layers' inverse state to the column (one broadcast per source, all in flight, then
  waited); each rank preconditions the layers of its column; when f < 1, in each row every
  column's member broadcasts its column's preconditioned gradients to the row (one broadcast
  per source); update.

**Symmetry classes.**  Rank ``r`` sits in row ``j = r // cols``, column ``i = r % cols``.  Its
work depends on its column's layers, the layers it inverts, and its row, since the row
broadcasts wait for every member of the row.  A row's *type* is the set of inverse workers in
it (with their columns and layers); rows without inverse workers are all alike.  Classes are
therefore the ranks of rows holding inverse workers (one class per nonempty column, one for
the empty columns) and, for the idle rows (grouped by how many nodes a row spans), one class
per nonempty column plus one for the empty columns.  The row groups' *family* is (row type,
nodes): every row of a family has the same class composition, so simulating the classes is
exact — the symmetry test checks it against simulating every rank.
"""
from __future__ import annotations

from collections import defaultdict

from kfacperf import vocab as S
from kfacperf.buckets import bucket_label
from kfacperf.sim.graphs.graph import Group, Program, RankClass
from kfacperf.sim.graphs.memory import fisher_blocks_of, kfac_state_per_gpu
from kfacperf.sim.graphs.placement import (
    grad_workers,
    kaisa_placement,
    nodes_spanned,
)
from kfacperf.sim.graphs.strategies.common import (
    BucketEvent,
    StepSpec,
    emit_factor_prefix,
    emit_unstaged,
    factor_plan,
)
from kfacperf.sim.graphs.strategies.sgd import DdpGradients


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
            [costs.placement_cost(l) for l in range(costs.n)], p, gw)
        self.world = spec.world()
        self.ddp = DdpGradients(spec)
        if spec.kind.factor and self.world.size > 1:
            self.fac_after, self.fac_end = factor_plan(costs, spec.comm)
        else:
            self.fac_after, self.fac_end = {}, []
        self.col_layers: dict[int, list[int]] = defaultdict(list)
        self.inv_layers: dict[int, list[int]] = defaultdict(list)
        for l in range(costs.n):
            self.col_layers[pl.column[l]].append(l)
            self.inv_layers[pl.inverse_worker[l]].append(l)
        self.full_cols = sorted(self.col_layers)
        # inverse workers of each column, ascending: the sources of its broadcasts
        self.col_sources: dict[int, list[int]] = defaultdict(list)
        for w in sorted(self.inv_layers):
            self.col_sources[w % cols].append(w)
        self.col_group = {
            c: Group(("col", c), ("col", c), gw, nodes_spanned(c, gw, cols, g))
            for c in self.col_layers
        }
        row_workers: dict[int, list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
        for w, layers in self.inv_layers.items():
            row_workers[w // cols].append((w % cols, tuple(layers)))
        self.row_type = {j: tuple(sorted(v)) for j, v in row_workers.items()}
        names = costs.names
        # only the layers a step refreshes send new inverses (stale statistics)
        frac = spec.comm.statistics_fraction
        self.inv_bytes = {w: round(frac * sum(costs.inverse_bytes(l, spec.comm) for l in ls))
                          for w, ls in self.inv_layers.items()}
        self.inv_label = {w: bucket_label([names[l] for l in ls])
                          for w, ls in self.inv_layers.items()}
        self.pg_bytes = {c: sum(costs.precond_bytes(l, spec.comm) for l in ls)
                         for c, ls in self.col_layers.items()}
        self.pg_label = {c: bucket_label([names[l] for l in ls])
                         for c, ls in self.col_layers.items()}
        self._shared: Program | None = None

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
        full = self.full_cols
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
    def _prefix(self) -> Program:
        """What every rank issues alike: forward, backward, waiting for DDP and factors."""
        def launch(prog: Program, ev: BucketEvent, label: str) -> None:
            prog.launch(("fac", ev.index), S.FACTOR_COMM, label, "all_reduce", ev.nbytes,
                        self.world)

        return emit_factor_prefix(self.spec.costs, self.spec.kind, (self.fac_after, self.fac_end),
                                  launch, on_grad=self.ddp.after_layer,
                                  after_backward=self.ddp.finish)

    def program(self, rank: int) -> Program:
        costs, kind = self.spec.costs, self.spec.kind
        j, i = divmod(rank, self.cols)
        if self._shared is None:
            self._shared = self._prefix()
        prog = self._shared.copy()
        if kind.inverse:
            for l in self.inv_layers.get(rank, ()):
                prog.compute(S.INVERSE, costs.names[l], costs.inverse[l], costs.inverse_flops[l])
            if self.gw > 1 and i in self.col_group:
                names = []
                for src in self.col_sources[i]:
                    prog.launch(("inv", src), S.INVERSE_COMM, self.inv_label[src], "broadcast",
                                self.inv_bytes[src], self.col_group[i])
                    names.append(("inv", src))
                prog.wait_all(names)
        for l in self.col_layers.get(i, ()):
            prog.compute(S.PRECONDITION, costs.names[l], costs.precond[l], costs.precond_flops[l])
        if self.cols > 1:
            rg = self.row_group(j)
            for c in self.full_cols:
                prog.launch(("pg", c), S.PRECOND_COMM, self.pg_label[c], "broadcast",
                            self.pg_bytes[c], rg)
            prog.wait_all([("pg", c) for c in self.full_cols])
        emit_unstaged(prog, costs.grad_write)
        prog.compute(S.UPDATE, "", costs.update)
        return prog

    def memory(self) -> tuple[int, int]:
        """``(factor bytes, inverse bytes)`` of the GPU holding the most K-FAC state
        (:func:`kfacperf.sim.graphs.memory.kfac_state_per_gpu`).

        Every rank forms every layer's batch statistics on a factor step (released by the
        step's update); only a layer's inverse worker keeps its running-average factors; the
        ranks of its column hold its inverse state.
        """
        state = kfac_state_per_gpu(fisher_blocks_of(self.spec.costs), self.place,
                                   self.spec.comm.inverse_method)
        return state.factors, state.inverses
