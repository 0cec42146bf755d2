"""What a plan searches: the grid of settings per GPU count, and which of them are the same.

A *configuration* is one strategy (KAISA with its number of grad workers), batch per GPU,
factor/inverse intervals, factor communication precision, symmetric packing and bucket
size at one GPU count.  A *setting* is a configuration without its intervals: the intervals
only weight the kinds of step of a cycle (:func:`kfacperf.sim.summary.cycle`), so every
interval pair of a setting is evaluated from the same simulated steps.

Settings whose step is provably the same are merged before anything is simulated (the
first in the grid's order stands for the others):

* SGD communicates no factors: precision and packing do not change it (nor do intervals);
* fp16 and bf16 factors are the same number of bytes, and the simulator prices bytes;
* on one GPU nothing is communicated: precision, packing and bucket size change nothing.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kfacperf import vocab as S

STRATEGIES: tuple[str, ...] = S.SIM_STRATEGIES
DEFAULT_INTERVALS: tuple[tuple[int, int], ...] = (
    (1, 1), (5, 5), (10, 10), (1, 10), (5, 50), (10, 100), (20, 200), (50, 500),
)
"""Factor/inverse interval pairs searched by default; a convergence model's own (stalest)
pair at each batch is added to them."""


def _positive_ints(key: str, values: Sequence[int]) -> tuple[int, ...]:
    if not len(values):
        raise ValueError(f"{key} is empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be positive integers, got {v!r}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True, kw_only=True)
class PlanSpace:
    """The grid of one plan; every tuple is searched in full (after the merges above)."""

    gpus: tuple[int, ...]
    strategies: tuple[str, ...] = STRATEGIES
    batch_per_gpu: tuple[int, ...] = (32,)
    intervals: tuple[tuple[int, int], ...] = DEFAULT_INTERVALS
    comm_dtypes: tuple[str, ...] = S.COMM_DTYPES
    symmetric: tuple[bool, ...] = (False, True)
    bucket_mb: tuple[float, ...] = (25.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", _positive_ints("gpus", self.gpus))
        object.__setattr__(self, "batch_per_gpu",
                           _positive_ints("batch_per_gpu", self.batch_per_gpu))
        if not self.strategies:
            raise ValueError("no strategy to search")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ValueError(f"unknown strategy {s!r}; known: {', '.join(STRATEGIES)} "
                                 "(kaisa is searched over every grad-worker fraction)")
        object.__setattr__(self, "strategies", tuple(dict.fromkeys(self.strategies)))
        if not self.intervals:
            raise ValueError("no factor/inverse interval pair to search")
        for pair in self.intervals:
            f, i = pair
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (f, i)) \
                    or min(f, i) < 1 or i % f:
                raise ValueError(f"intervals {f}/{i}: both must be >= 1 and the inverse "
                                 "interval a multiple of the factor interval")
        object.__setattr__(self, "intervals",
                           tuple(dict.fromkeys(tuple(p) for p in self.intervals)))
        if not self.comm_dtypes:
            raise ValueError("no factor communication precision to search")
        for d in self.comm_dtypes:
            if d not in S.COMM_DTYPE_BYTES:
                raise ValueError(f"factor communication precision {d!r} unknown; use "
                                 f"{', '.join(S.COMM_DTYPE_BYTES)}")
        object.__setattr__(self, "comm_dtypes", tuple(dict.fromkeys(self.comm_dtypes)))
        if not self.symmetric:
            raise ValueError("no symmetric-packing choice to search")
        object.__setattr__(self, "symmetric", tuple(dict.fromkeys(bool(s) for s in self.symmetric)))
        if not self.bucket_mb or any(not (b > 0) for b in self.bucket_mb):
            raise ValueError(f"bucket sizes must be > 0 MB, got {list(self.bucket_mb)}")
        object.__setattr__(self, "bucket_mb",
                           tuple(dict.fromkeys(float(b) for b in self.bucket_mb)))

    def as_dict(self) -> dict[str, object]:
        return {
            "gpus": list(self.gpus), "strategies": list(self.strategies),
            "batch_per_gpu": list(self.batch_per_gpu),
            "intervals": [f"{f}/{i}" for f, i in self.intervals],
            "comm_dtypes": list(self.comm_dtypes), "symmetric": list(self.symmetric),
            "bucket_mb": list(self.bucket_mb),
        }


def grad_worker_counts(world_size: int) -> tuple[int, ...]:
    """KAISA's grad workers per layer searched at ``world_size`` GPUs: f from 1/P to 1, every
    count that divides P (KAISA's rule; at 12 GPUs 3/12 and 6/12 as well as 1, 2, 4 and 12)."""
    out: set[int] = set()
    g = 1
    while g * g <= world_size:
        if world_size % g == 0:
            out.update((g, world_size // g))
        g += 1
    return tuple(sorted(out))


@dataclass(frozen=True, kw_only=True)
class Setting:
    """A configuration without its intervals (see the module docstring).

    ``grad_workers`` is KAISA's number of grad workers per layer (0 for the others);
    ``comm_dtype``, ``symmetric`` and ``bucket_mb`` are None where they change nothing.
    ``stands_for`` counts the grid's settings this one represents (itself included).
    """

    strategy: str
    grad_workers: int
    batch_per_gpu: int
    comm_dtype: str | None
    symmetric: bool | None
    bucket_mb: float | None
    stands_for: int = 1

    def label(self, world_size: int) -> str:
        if self.strategy != S.KAISA:
            return self.strategy
        if self.grad_workers == world_size:
            return "kaisa:1"
        return f"kaisa:{self.grad_workers}/{world_size}"


def settings(space: PlanSpace, strategy: str, world_size: int) -> Iterator[Setting]:
    """The distinct settings of ``strategy`` at ``world_size`` GPUs, in the grid's order."""
    alone = world_size == 1
    buckets: tuple[float | None, ...] = (None,) if alone else space.bucket_mb
    nb = len(space.bucket_mb)
    for batch in space.batch_per_gpu:
        if strategy == S.SGD:
            for bucket in buckets:
                yield Setting(strategy=S.SGD, grad_workers=0, batch_per_gpu=batch,
                              comm_dtype=None, symmetric=None, bucket_mb=bucket,
                              stands_for=nb if alone else 1)
            continue
        workers = grad_worker_counts(world_size) if strategy == S.KAISA else (0,)
        for gw in workers:
            if alone:
                yield Setting(strategy=strategy, grad_workers=gw, batch_per_gpu=batch,
                              comm_dtype=None, symmetric=None, bucket_mb=None,
                              stands_for=len(space.comm_dtypes) * len(space.symmetric) * nb)
                continue
            widths: dict[int, list[str]] = {}
            for d in space.comm_dtypes:
                widths.setdefault(S.COMM_DTYPE_BYTES[d], []).append(d)
            for same in widths.values():
                for sym in space.symmetric:
                    for bucket in buckets:
                        yield Setting(strategy=strategy, grad_workers=gw, batch_per_gpu=batch,
                                      comm_dtype=same[0], symmetric=sym, bucket_mb=bucket,
                                      stands_for=len(same))
