"""What ``kfacperf commbench`` measured: points, probes and their units (no torch, no launcher).

Kept apart from the launcher (:mod:`kfacperf.bench.commbench`) so that reading raw files
(:mod:`kfacperf.bench.raw`) and fitting them (:mod:`kfacperf.calibrate.cluster`) never start
processes or import torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

ALL = "all"
"""The probes' key for the slowdown of every stage kind together."""
STRAGGLER = "straggler"
"""The probes' key for the straggler (synchronised training-like steps)."""
COMM_AFTER_COMPUTE = "comm_after_compute"
"""The probes' key for collectives timed right after compute."""

KIB = 1024
MIB = 1024 * 1024
DEFAULT_SIZES: tuple[int, ...] = (4 * KIB, 256 * KIB, 4 * MIB)

TIMINGS: tuple[str, ...] = ("per_call", "batched")
"""How a repetition times a collective: one call alone, or back-to-back calls."""


@dataclass(frozen=True, kw_only=True)
class Point:
    op: str
    world_size: int
    nbytes: int
    time_us: float  # mean over repetitions of the slowest rank's time per call
    reps: int
    timing: str = "batched"  # how a repetition timed (TIMINGS); files before it: batched
    nodes: int = 1  # nodes the group spans (ranks spread evenly, consecutive on a node)


@dataclass(frozen=True, kw_only=True)
class CommbenchResult:
    backend: str
    points: tuple[Point, ...]
    slowdowns: dict[int, float] = field(default_factory=dict)  # world size -> compute slowdown
    cores: int = 0
    # world size -> stage kind -> compute slowdown of that kind's work
    stage_slowdowns: dict[int, dict[str, float]] = field(default_factory=dict)
    # world size -> how many probes the slowdowns are the mean of
    probes: dict[int, int] = field(default_factory=dict)
    # world size -> the straggler: (slowest - mean) / mean rank time per synchronised step
    stragglers: dict[int, float] = field(default_factory=dict)
    # world size -> mean collective time right after compute over right after a barrier
    comm_slowdowns: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "cores": self.cores,
                "points": [asdict(p) for p in self.points],
                "slowdowns": {str(k): v for k, v in self.slowdowns.items()},
                "stage_slowdowns": {str(k): v for k, v in self.stage_slowdowns.items()},
                "probes": {str(k): v for k, v in self.probes.items()},
                "stragglers": {str(k): v for k, v in self.stragglers.items()},
                "comm_slowdowns": {str(k): v for k, v in self.comm_slowdowns.items()}}


PROBE_TABLES = ("slowdowns", "stage_slowdowns", "probes", "stragglers", "comm_slowdowns")
"""The :class:`CommbenchResult` fields a contention probe fills, per world size."""


def probe_tables(world: int, probe: Mapping[str, float]) -> dict[str, dict[int, Any]]:
    """What one probe of ``world`` ranks sharing a node (:func:`kfacperf.bench.probe.
    measure_slowdowns` on its rank 0) adds to each of :data:`PROBE_TABLES`; nothing for a probe
    that measured nothing."""
    out: dict[str, dict[int, Any]] = {k: {} for k in PROBE_TABLES}
    if not probe or math.isnan(probe[ALL]):
        return out
    out["slowdowns"][world] = probe[ALL]
    out["stage_slowdowns"][world] = {k: v for k, v in probe.items()
                                     if k not in (ALL, STRAGGLER, COMM_AFTER_COMPUTE)}
    out["probes"][world] = 1
    if STRAGGLER in probe and math.isfinite(probe[STRAGGLER]):
        out["stragglers"][world] = probe[STRAGGLER]
    if COMM_AFTER_COMPUTE in probe and math.isfinite(probe[COMM_AFTER_COMPUTE]):
        out["comm_slowdowns"][world] = probe[COMM_AFTER_COMPUTE]
    return out


def parse_size(text: str) -> int:
    """``"4KiB"``, ``"1MiB"``, ``"65536"`` -> bytes."""
    t = text.strip()
    units = {"KiB": KIB, "MiB": MIB, "GiB": 1024 * MIB, "KB": 1000, "MB": 10**6, "GB": 10**9,
             "B": 1}
    number, mult = t, 1
    for suffix, unit in units.items():
        if t.endswith(suffix):
            number, mult = t[: -len(suffix)], unit
            break
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read size {text!r}; use e.g. 4096, 64KiB, 8MiB") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be > 0")
    return int(value * mult)


def fmt_size(n: int) -> str:
    for unit, mult in (("MiB", MIB), ("KiB", KIB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"
