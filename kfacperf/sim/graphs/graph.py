"""Step graphs: what each simulated rank runs in one training step, on which stream.

A strategy writes, for each representative rank, its *host program* in issue order — the same
order as the real optimizer's Python code — with three kinds of operation:

* ``compute(stage, layer, dur_us)``: a kernel on the rank's compute stream (``stage``
  :data:`UNSTAGED`: host work between stages, which no event row reports);
* ``launch(name, ...)``: an asynchronous collective on the rank's comm stream;
* ``wait(name)``: the compute stream waits for that collective to finish.

The stream semantics are those of CUDA + NCCL (and of gloo on a CPU): each stream runs its work
in issue order; a collective cannot start before the compute issued ahead of it has finished
(ProcessGroupNCCL makes its stream wait for the current stream at issue time); compute issued
after ``wait`` cannot start before the collective has finished; a collective starts once every
member of its group has reached it on its own comm stream, and takes the cost model's time.

**Symmetry classes.**  Ranks with identical work are simulated once: a :class:`StepGraph`
holds one program per *class* (a representative rank and how many ranks it stands for).  A
collective is identified by its ``name`` and its group.  Each :class:`Group` carries two keys:
``concrete`` names the actual set of ranks (used when every rank is simulated), ``family``
names the set of equivalent groups it belongs to (used with classes), e.g. "every row whose
members have this composition".  A family collective starts at the latest arrival over its
member classes, which equals each concrete group's start exactly when the classes are an
equitable partition — the tests check that against simulating every rank.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from kfacperf import vocab as S

COLLECTIVE_OPS: tuple[str, ...] = S.ALL_COLLECTIVE_OPS
V_OPS: tuple[str, ...] = S.V_OPS
UNSTAGED = ""
"""The stage of compute that belongs to no stage (host work between stages): it takes time
on the compute stream but yields no event row and no stage time, as in a measured trace."""

Bytes = int | tuple[int, ...]
CollectiveCost = Callable[[str, Bytes, int, int], float]
"""``cost(op, nbytes, group_size, nodes) -> microseconds``."""


@dataclass(frozen=True)
class Group:
    """A communicator: ``size`` ranks over ``nodes`` nodes, with its two identities."""

    concrete: Hashable
    family: Hashable
    size: int
    nodes: int


class Launch:
    """One collective as a rank issued it (``after``: compute tasks issued before it)."""

    __slots__ = ("name", "stage", "layer", "op", "nbytes", "group", "after")

    def __init__(self, name: Hashable, stage: str, layer: str, op: str, nbytes: Bytes,
                 group: Group, after: int) -> None:
        self.name, self.stage, self.layer, self.op = name, stage, layer, op
        self.nbytes, self.group, self.after = nbytes, group, after

    @property
    def payload(self) -> int:
        """Bytes of the logical collective (sum of the blocks for the -v forms)."""
        return sum(self.nbytes) if isinstance(self.nbytes, tuple) else self.nbytes


class Program:
    """The host program of one rank in issue order (see the module docstring).

    Consecutive ``compute`` calls with the same stage and layer and nothing issued between
    them become one task (one kernel sequence), which keeps graphs small.
    """

    __slots__ = ("stage", "layer", "dur", "flops", "waits", "launches", "_names",
                 "_pending", "_mergeable", "base")

    def __init__(self) -> None:
        self.stage: list[str] = []
        self.layer: list[str] = []
        self.dur: list[float] = []
        self.flops: list[float] = []
        self.waits: list[tuple[Hashable, ...]] = []
        self.launches: list[Launch] = []
        self._names: set[Hashable] = set()
        self._pending: list[Hashable] = []
        self._mergeable = False
        self.base: tuple[Program, int, int] | None = None
        """Set by :meth:`copy`: the program copied and its compute/launch counts then."""

    def compute(self, stage: str, layer: str, dur_us: float, flops: float = 0.0) -> None:
        """Issue ``dur_us`` of work of ``stage`` (on ``layer``, "" for whole-model stages)."""
        if not dur_us >= 0:
            raise ValueError(f"{stage}/{layer}: compute time must be >= 0, got {dur_us!r}")
        if (self._mergeable and not self._pending and self.stage[-1] == stage
                and self.layer[-1] == layer):
            self.dur[-1] += dur_us
            self.flops[-1] += flops
            return
        self.stage.append(stage)
        self.layer.append(layer)
        self.dur.append(float(dur_us))
        self.flops.append(float(flops))
        self.waits.append(tuple(self._pending))
        self._pending = []
        self._mergeable = True

    def launch(self, name: Hashable, stage: str, layer: str, op: str, nbytes: Bytes,
               group: Group) -> None:
        """Issue an asynchronous collective called ``name`` (unique within the step)."""
        if name in self._names:
            raise ValueError(f"collective {name!r} launched twice in one step")
        S.check_choice("collective op", op, COLLECTIVE_OPS)
        self._names.add(name)
        self.launches.append(Launch(name, stage, layer, op, nbytes, group, len(self.dur)))
        self._mergeable = False

    def copy(self) -> Program:
        """An independent program that starts with everything issued so far."""
        out = Program.__new__(Program)
        out.stage, out.layer = self.stage[:], self.layer[:]
        out.dur, out.flops, out.waits = self.dur[:], self.flops[:], self.waits[:]
        out.launches = self.launches[:]
        out._names = set(self._names)
        out._pending = self._pending[:]
        out._mergeable = False  # never grow the copied program's last task
        out.base = (self, len(self.dur), len(self.launches))
        return out

    def wait(self, name: Hashable) -> None:
        """Make the compute issued from now on wait for collective ``name``."""
        if name not in self._names:
            raise ValueError(f"wait for collective {name!r} that this rank never launched")
        self._pending.append(name)

    def wait_all(self, names: Sequence[Hashable]) -> None:
        for n in names:
            self.wait(n)


@dataclass(frozen=True)
class RankClass:
    """A representative rank and the number of ranks whose work is identical to it."""

    rank: int
    count: int


@dataclass
class Collective:
    """One collective (or a family of equivalent ones) of a step graph."""

    stage: str
    layer: str
    op: str
    payload: int
    size: int
    nodes: int
    cost_us: float
    straggle: float = 0.0
    """The last member arrives this fraction of the compute it ran since its previous
    collective late: the expected wait for the slowest of uneven ranks
    (``HostModel.straggler``)."""
    members: list[int] = field(default_factory=list)
    """Class indices that take part, in order of first launch."""


@dataclass
class StepGraph:
    """Programs of the simulated classes plus the collectives that connect them."""

    classes: list[RankClass]
    programs: list[Program]
    collectives: list[Collective]
    comm: list[list[tuple[int, int]]]
    """Per class: its comm stream, ``(collective index, compute tasks that precede it)``."""
    waits: list[list[tuple[int, ...]]]
    """Per class and compute task: collective indices that task waits for."""
    prefix: tuple[int, int] = (0, 0)
    """``(compute tasks, launches)`` that every class issues identically first (all programs
    copied from one shared program, whose collectives every class joins): the engine may
    simulate that part once.  ``(0, 0)``: no shared prefix."""

    @property
    def world_size(self) -> int:
        return sum(c.count for c in self.classes)


def shared_prefix(programs: Sequence[Program]) -> tuple[int, int]:
    """``(compute tasks, launches)`` of the program every one of ``programs`` was copied from,
    or ``(0, 0)`` when they were not all copied from the same program at the same point."""
    bases = {(id(p.base[0]), p.base[1], p.base[2]) if p.base else None for p in programs}
    if len(bases) != 1 or None in bases:
        return 0, 0
    base = bases.pop()
    assert base is not None  # excluded above
    _, n_c, n_l = base
    return n_c, n_l


class _Joiner:
    """Matches the launches of the programs of ``classes`` to collectives, program by program.

    ``first[k]``: the launch that made collective ``k``, which later members must agree with.
    """

    def __init__(self, classes: Sequence[RankClass], cost: CollectiveCost, *, per_rank: bool,
                 straggle: Callable[[int], float] | None) -> None:
        self.classes, self.cost, self.per_rank, self.straggle = classes, cost, per_rank, straggle
        self.collectives: list[Collective] = []
        self.first: list[Launch] = []
        self._index: dict[tuple[Hashable, Hashable], int] = {}
        self._costs: dict[tuple[str, Bytes, int, int], float] = {}
        self._seen: dict[int, int] = {}

    def join(self, ci: int, prog: Program) -> list[tuple[int, int]]:
        """Class ``ci``'s comm stream: ``(collective index, compute tasks before it)`` for each
        launch of ``prog``."""
        items: list[tuple[int, int]] = []
        for ln in prog.launches:
            # the same launch object (a shared prefix) is the same collective
            k = self._seen.get(id(ln))
            if k is None:
                k = self._match(ci, ln)
                if not self.per_rank:
                    self._seen[id(ln)] = k
            self.collectives[k].members.append(ci)
            items.append((k, ln.after))
        return items

    def _match(self, ci: int, ln: Launch) -> int:
        """The index of the collective that ``ln`` (of class ``ci``) is part of, made on its
        first launch."""
        g = ln.group
        key = (ln.name, g.concrete if self.per_rank else g.family)
        k = self._index.get(key)
        if k is not None:
            _check_agrees(self.classes[ci].rank, self.first[k], ln)
            return k
        c_us = self._cost_us(ln)
        k = self._index[key] = len(self.collectives)
        self.collectives.append(Collective(
            stage=ln.stage, layer=ln.layer, op=ln.op, payload=ln.payload,
            size=g.size, nodes=g.nodes, cost_us=c_us,
            straggle=float(self.straggle(g.size)) if self.straggle is not None else 0.0))
        self.first.append(ln)
        return k

    def _cost_us(self, ln: Launch) -> float:
        g = ln.group
        ck = (ln.op, ln.nbytes, g.size, g.nodes)
        c_us = self._costs.get(ck)
        if c_us is None:
            c_us = self._costs[ck] = float(self.cost(ln.op, ln.nbytes, g.size, g.nodes))
            if not c_us >= 0:
                raise ValueError(f"cost model gave {c_us!r} us for {ln.op}")
        return c_us


def _check_agrees(rank: int, f: Launch, ln: Launch) -> None:
    """``rank``'s launch ``ln`` describes the same collective as its first launch ``f``."""
    g = ln.group
    same_bytes = f.nbytes is ln.nbytes or f.nbytes == ln.nbytes
    if not same_bytes or (f.op, f.stage, f.layer, f.group.size, f.group.nodes) != (
            ln.op, ln.stage, ln.layer, g.size, g.nodes):
        raise ValueError(
            f"rank {rank} disagrees with other members on collective "
            f"{ln.name!r}: {f.op}/{f.group.size} ranks vs {ln.op}/{g.size} ranks"
        )


def _check_members(classes: Sequence[RankClass], collectives: Sequence[Collective],
                   first: Sequence[Launch], *, per_rank: bool) -> None:
    """Each collective's members can run it: no class launches it twice, and its groups are
    filled (per rank: by every member; with classes: by the ranks the classes stand for)."""
    for k, coll in enumerate(collectives):
        if len(set(coll.members)) != len(coll.members):
            raise ValueError(f"collective {first[k].name!r} launched twice by one class")
        if per_rank and len(coll.members) != coll.size:
            raise ValueError(
                f"collective {first[k].name!r} on a group of {coll.size} ranks was launched "
                f"by {len(coll.members)} ranks; the others would hang"
            )
        if not per_rank:
            total = sum(classes[c].count for c in coll.members)
            if total % coll.size:
                raise ValueError(
                    f"collective family {first[k].name!r}: {total} ranks cannot fill groups "
                    f"of {coll.size}"
                )


def _wait_indices(programs: Sequence[Program], comm: Sequence[Sequence[tuple[int, int]]]
                  ) -> list[list[tuple[int, ...]]]:
    """Per class and compute task, the collective indices its waits name."""
    waits: list[list[tuple[int, ...]]] = []
    for ci, prog in enumerate(programs):
        names = {ln.name: k for ln, (k, _) in zip(prog.launches, comm[ci])}
        waits.append([tuple(names[n] for n in w) if w else () for w in prog.waits])
    return waits


def _check_stages(classes: Sequence[RankClass], programs: Sequence[Program]) -> None:
    known = set(S.STAGE_NAMES) | {UNSTAGED}
    for ci, prog in enumerate(programs):
        bad = set(prog.stage) - known
        if bad:
            raise ValueError(f"rank {classes[ci].rank}: unknown stage(s) {sorted(bad)}")


def assemble(
    classes: Sequence[RankClass], programs: Sequence[Program], cost: CollectiveCost, *,
    per_rank: bool, straggle: Callable[[int], float] | None = None,
) -> StepGraph:
    """Join the programs of ``classes`` into a step graph.

    ``per_rank``: every rank is its own class and groups are matched by their concrete
    identity (the reference mode); otherwise groups are matched by family, and a prefix that
    every program shares (see :meth:`Program.copy`) is marked so the engine runs it once.
    Checks that the members of one collective agree on what it is, and (per rank) that every
    member of a group launched it, so a strategy bug shows up as an error, not a wrong time.
    ``straggle(group_size)``: each collective's :attr:`Collective.straggle` (0 without it).
    """
    if len(classes) != len(programs):
        raise ValueError("one program per class is needed")
    joiner = _Joiner(classes, cost, per_rank=per_rank, straggle=straggle)
    comm = [joiner.join(ci, prog) for ci, prog in enumerate(programs)]
    _check_members(classes, joiner.collectives, joiner.first, per_rank=per_rank)
    waits = _wait_indices(programs, comm)
    _check_stages(classes, programs)
    prefix = (0, 0) if per_rank else shared_prefix(programs)
    return StepGraph(classes=list(classes), programs=list(programs),
                     collectives=joiner.collectives, comm=comm, waits=waits, prefix=prefix)
