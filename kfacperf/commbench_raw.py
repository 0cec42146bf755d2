"""Read back ``kfacperf commbench --raw`` files and merge several into one measurement.

Why merge: on a shared virtual machine the compute slowdown of ranks sharing cores is a state
of the host, not a constant (the same two-rank step ran 1.05x or 1.35x slower than one rank
within a quarter of an hour).  A recording session therefore takes a contention probe before
each round of runs (``kfacperf commbench --contention-only --raw ...``), and the session's
cluster model is fitted from all of them together (``kfacperf commbench --from-raw ...``):
the slowdowns are averaged over the probes, the collective times are the median over the
files that measured them.

API::

    result_from_dict(data, *, source="raw data") -> CommbenchResult
    load_raw(path) -> CommbenchResult
    merge_results(results) -> CommbenchResult
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from kfacperf.commbench import CommbenchResult, Point
from kfacperf.sim.cluster_model import OPS
from kfacperf.sim.device_model import STAGE_KINDS

KEYS = {"backend", "cores", "points", "slowdowns", "stage_slowdowns", "probes", "stragglers"}
POINT_KEYS = {"op", "world_size", "nbytes", "time_us", "reps"}


class RawFileError(ValueError):
    """A commbench raw file that cannot be read; the message names the file and the key."""


def _world(key: str, where: str) -> int:
    try:
        world = int(key)
    except ValueError:
        raise RawFileError(f"{where}: world size {key!r} is not an integer") from None
    if world < 2:
        raise RawFileError(f"{where}: world size {world} must be >= 2")
    return world


def _slowdown(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise RawFileError(f"{where}: slowdown {value!r} must be a positive number")
    return float(value)


def result_from_dict(data: Any, *, source: str = "raw data") -> CommbenchResult:
    """The :class:`CommbenchResult` that :meth:`CommbenchResult.to_dict` wrote."""
    if not isinstance(data, dict):
        raise RawFileError(f"{source}: expected a JSON object written by commbench --raw")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise RawFileError(f"{source}: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    backend = data.get("backend")
    if backend not in ("gloo", "nccl"):
        raise RawFileError(f"{source}: 'backend' must be gloo or nccl, got {backend!r}")
    points = []
    for i, p in enumerate(data.get("points", [])):
        where = f"{source}: points[{i}]"
        if not isinstance(p, dict) or set(p) != POINT_KEYS:
            raise RawFileError(f"{where}: expected the keys {sorted(POINT_KEYS)}")
        if p["op"] not in OPS:
            raise RawFileError(f"{where}: unknown collective {p['op']!r}; known: {', '.join(OPS)}")
        nums = [p["world_size"], p["nbytes"], p["time_us"], p["reps"]]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
               or v <= 0 for v in nums):
            raise RawFileError(f"{where}: world_size, nbytes, time_us and reps must be > 0")
        points.append(Point(op=p["op"], world_size=int(p["world_size"]), nbytes=int(p["nbytes"]),
                            time_us=float(p["time_us"]), reps=int(p["reps"])))
    slowdowns = {_world(k, f"{source}: slowdowns"): _slowdown(v, f"{source}: slowdowns[{k}]")
                 for k, v in dict(data.get("slowdowns", {})).items()}
    stage: dict[int, dict[str, float]] = {}
    for k, per in dict(data.get("stage_slowdowns", {})).items():
        where = f"{source}: stage_slowdowns[{k}]"
        bad = sorted(set(per) - set(STAGE_KINDS))
        if bad:
            raise RawFileError(f"{where}: unknown stage kind(s) {bad}; known: {', '.join(STAGE_KINDS)}")
        stage[_world(k, where)] = {kind: _slowdown(v, f"{where}[{kind}]") for kind, v in per.items()}
    probes = {}
    for k, n in dict(data.get("probes", {})).items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RawFileError(f"{source}: probes[{k}] must be a positive integer, got {n!r}")
        probes[_world(k, f"{source}: probes")] = n
    # files written before probes were counted hold one probe per measured world size
    probes = {w: probes.get(w, 1) for w in slowdowns}
    stragglers = {}
    for k, v in dict(data.get("stragglers", {})).items():
        where = f"{source}: stragglers[{k}]"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise RawFileError(f"{where}: straggler {v!r} must be a number >= 0")
        stragglers[_world(k, where)] = float(v)
    cores = data.get("cores", 0)
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 0:
        raise RawFileError(f"{source}: 'cores' must be a non-negative integer, got {cores!r}")
    return CommbenchResult(backend=backend, points=tuple(points), slowdowns=slowdowns,
                           cores=cores, stage_slowdowns=stage, probes=probes,
                           stragglers=stragglers)


def load_raw(path: str | Path) -> CommbenchResult:
    """Read one ``commbench --raw`` file; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RawFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise RawFileError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return result_from_dict(data, source=str(path))


def merge_results(results: Sequence[CommbenchResult]) -> CommbenchResult:
    """One measurement from several: slowdowns averaged over every probe (a file holding the
    mean of ``n`` probes counts ``n`` times; the straggler over the probes that measured it),
    collective times the median over the files."""
    if not results:
        raise ValueError("nothing to merge: no commbench results given")
    backends = sorted({r.backend for r in results})
    if len(backends) > 1:
        raise ValueError(f"cannot merge measurements of different backends: {backends}")
    times: dict[tuple[str, int, int], list[Point]] = defaultdict(list)
    for r in results:
        for p in r.points:
            times[(p.op, p.world_size, p.nbytes)].append(p)
    points = tuple(Point(op=op, world_size=w, nbytes=n,
                         time_us=statistics.median(p.time_us for p in ps),
                         reps=sum(p.reps for p in ps))
                   for (op, w, n), ps in times.items())
    weight: dict[int, int] = defaultdict(int)
    total: dict[int, float] = defaultdict(float)
    stage_total: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    stage_weight: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    strag_total: dict[int, float] = defaultdict(float)
    strag_weight: dict[int, int] = defaultdict(int)
    for r in results:
        for w, s in r.slowdowns.items():
            n = r.probes.get(w, 1)
            weight[w] += n
            total[w] += n * s
            if w in r.stragglers:
                strag_weight[w] += n
                strag_total[w] += n * r.stragglers[w]
            for kind, v in r.stage_slowdowns.get(w, {}).items():
                stage_weight[w][kind] += n
                stage_total[w][kind] += n * v
    slowdowns = {w: total[w] / weight[w] for w in sorted(weight)}
    stage = {w: {k: stage_total[w][k] / stage_weight[w][k]
                 for k in STAGE_KINDS if k in stage_weight[w]} for w in sorted(stage_weight)}
    return CommbenchResult(backend=backends[0], points=points, slowdowns=slowdowns,
                           cores=max(r.cores for r in results), stage_slowdowns=stage,
                           probes=dict(sorted(weight.items())),
                           stragglers={w: strag_total[w] / strag_weight[w] for w in sorted(strag_weight)})
