"""Read back ``kfacperf commbench --raw`` files and merge several into one measurement.

Why merge: on a shared virtual machine the compute slowdown of ranks sharing cores is a state
of the host, not a constant (the same two-rank step ran 1.05x or 1.35x slower than one rank
within a quarter of an hour).  A recording session therefore takes a contention probe before
every second configuration (``kfacperf commbench --raw ...``), and the session's cluster
model is fitted from all of them together (``kfacperf commbench --from-raw ...``): the
slowdowns are averaged over the probes, a collective's time over every repetition of every
file that measured it (each file's mean weighted by its repetitions).  Collective times
are the same kind of quantity in every file they merge from: one file timing calls alone and
another back to back (``timing``) is an error.

API::

    result_from_dict(data, *, source="raw data") -> CommbenchResult
    load_raw(path) -> CommbenchResult
    merge_results(results) -> CommbenchResult
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kfacperf.bench.results import (
    ALL,
    COMM_AFTER_COMPUTE,
    STRAGGLER,
    TIMINGS,
    CommbenchResult,
    Point,
)
from kfacperf.sim.models.cluster import OPS
from kfacperf.sim.models.device import STAGE_KINDS
from kfacperf.sim.models.toml_io import Table

BACKENDS = ("gloo", "nccl")
MIN_TIME_US = 1e-3
"""The shortest collective time read (1 ns): anything shorter is no measurement."""
MAX_TIME_US = 3.6e9
"""The longest collective time read (an hour)."""
MAX_SLOWDOWN = 1e3
"""The largest slowdown factor read (ranks sharing cores, collectives after compute)."""


def _time_us(p: Table) -> float:
    t = p.float("time_us", positive=True, maximum=MAX_TIME_US)
    if t < MIN_TIME_US:
        raise p.error("time_us", f"must be at least {MIN_TIME_US:g} µs, got {t:g}")
    return t


def _world_table(root: Table, key: str) -> list[tuple[int, Table, str]]:
    """``(world size, table, key)`` for each entry of the table ``key`` (absent: none)."""
    if not root.has(key):
        return []
    table = root.table(key)
    out = []
    for k in table.keys():
        try:
            world = int(k)
        except ValueError:
            raise table.error(k, "a world size must be an integer") from None
        if world < 2:
            raise table.error(k, f"a world size must be >= 2, got {world}")
        out.append((world, table, k))
    return out


def result_from_dict(data: Any, *, source: str = "raw data") -> CommbenchResult:
    """The :class:`CommbenchResult` that :meth:`CommbenchResult.to_dict` wrote.

    Read as strictly as a model file (:class:`kfacperf.sim.models.toml_io.Table`): every error is a
    ``ValueError`` naming ``source`` and the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object written by commbench --raw")
    root = Table(data, source=source, prefix="")
    backend = root.str("backend", choices=BACKENDS)
    cores = root.int("cores", minimum=0) if root.has("cores") else 0
    points = []
    for p in root.tables("points") if root.has("points") else []:
        points.append(Point(op=p.str("op", choices=OPS), world_size=p.int("world_size", minimum=2),
                            nbytes=p.int("nbytes", minimum=1),
                            time_us=_time_us(p),
                            reps=p.int("reps", minimum=1),
                            timing=p.str("timing", choices=TIMINGS) if p.has("timing")
                            else "batched",
                            nodes=p.int("nodes", minimum=1) if p.has("nodes") else 1))
        if points[-1].nodes > points[-1].world_size:
            raise p.error("nodes", f"a group of {points[-1].world_size} ranks cannot span "
                                   f"{points[-1].nodes} nodes")
        p.done()
    slowdowns = {w: t.float(k, positive=True, maximum=MAX_SLOWDOWN)
                 for w, t, k in _world_table(root, "slowdowns")}
    stage: dict[int, dict[str, float]] = {}
    for w, t, k in _world_table(root, "stage_slowdowns"):
        kinds = t.table(k)
        for kind in kinds.keys():
            if kind not in STAGE_KINDS:
                raise kinds.error(kind, f"unknown stage kind; the stage kinds are: "
                                        f"{', '.join(STAGE_KINDS)}")
        stage[w] = {kind: kinds.float(kind, positive=True, maximum=MAX_SLOWDOWN)
                    for kind in kinds.keys()}
    probes = {w: t.int(k, minimum=1) for w, t, k in _world_table(root, "probes")}
    # files written before probes were counted hold one probe per measured world size
    probes = {w: probes.get(w, 1) for w in slowdowns}
    stragglers = {w: t.float(k, nonnegative=True, maximum=MAX_SLOWDOWN)
                  for w, t, k in _world_table(root, "stragglers")}
    comm = {w: t.float(k, positive=True, maximum=MAX_SLOWDOWN)
            for w, t, k in _world_table(root, "comm_slowdowns")}
    root.done()
    return CommbenchResult(backend=backend, points=tuple(points), slowdowns=slowdowns,
                           cores=cores, stage_slowdowns=stage, probes=probes,
                           stragglers=stragglers, comm_slowdowns=comm)


def load_raw(path: str | Path) -> CommbenchResult:
    """Read one ``commbench --raw`` file; errors name the file."""
    from kfacperf.safety import load_json_file

    path = Path(path)
    try:
        data = load_json_file(path, what="commbench raw file")
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    return result_from_dict(data, source=str(path))


def merge_results(results: Sequence[CommbenchResult]) -> CommbenchResult:
    """One measurement from several: slowdowns averaged over every probe (a file holding the
    mean of ``n`` probes counts ``n`` times; the straggler and the collectives' slowdown after
    compute over the probes that measured them),
    collective times the mean over every repetition (each file's mean weighted by its
    repetitions), never across timings."""
    if not results:
        raise ValueError("nothing to merge: no commbench results given")
    backends = sorted({r.backend for r in results})
    if len(backends) > 1:
        raise ValueError(f"cannot merge measurements of different backends: {backends}")
    times: dict[tuple[str, int, int, int], list[Point]] = defaultdict(list)
    for r in results:
        for p in r.points:
            times[(p.op, p.world_size, p.nodes, p.nbytes)].append(p)
    for (op, w, _, n), ps in times.items():
        timings = sorted({p.timing for p in ps})
        if len(timings) > 1:
            raise ValueError(f"cannot merge {op} of {n} bytes on {w} ranks timed as "
                             f"{' and '.join(timings)}: measure every file with one --timing")
    points = tuple(Point(op=op, world_size=w, nbytes=n,
                         time_us=sum(p.time_us * p.reps for p in ps) / sum(p.reps for p in ps),
                         reps=sum(p.reps for p in ps), timing=ps[0].timing, nodes=nodes)
                   for (op, w, nodes, n), ps in times.items())
    # (world size, what) -> (probes, value) of every file that measured it
    samples: dict[tuple[int, str], list[tuple[int, float]]] = defaultdict(list)
    for r in results:
        for w, slowdown in r.slowdowns.items():
            n = r.probes.get(w, 1)
            samples[(w, ALL)].append((n, slowdown))
            if w in r.stragglers:
                samples[(w, STRAGGLER)].append((n, r.stragglers[w]))
            if w in r.comm_slowdowns:
                samples[(w, COMM_AFTER_COMPUTE)].append((n, r.comm_slowdowns[w]))
            for kind, v in r.stage_slowdowns.get(w, {}).items():
                samples[(w, kind)].append((n, v))

    def mean(w: int, what: str) -> float:
        pairs = samples[(w, what)]
        return sum(n * v for n, v in pairs) / sum(n for n, _ in pairs)

    worlds = sorted(w for w, what in samples if what == ALL)
    return CommbenchResult(
        backend=backends[0], points=points, cores=max(r.cores for r in results),
        slowdowns={w: mean(w, ALL) for w in worlds},
        stage_slowdowns={w: {k: mean(w, k) for k in STAGE_KINDS if (w, k) in samples}
                         for w in worlds if any((w, k) in samples for k in STAGE_KINDS)},
        probes={w: sum(n for n, _ in samples[(w, ALL)]) for w in worlds},
        stragglers={w: mean(w, STRAGGLER) for w in worlds if (w, STRAGGLER) in samples},
        comm_slowdowns={w: mean(w, COMM_AFTER_COMPUTE) for w in worlds
                        if (w, COMM_AFTER_COMPUTE) in samples})
