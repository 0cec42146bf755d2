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

import math
import numbers
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

from kfacperf import vocab as S
from kfacperf.trace.arguments import one_or_many

STRATEGIES: tuple[str, ...] = S.SIM_STRATEGIES
DEFAULT_INTERVALS: tuple[tuple[int, int], ...] = (
    (1, 1), (5, 5), (10, 10), (1, 10), (5, 50), (10, 100), (20, 200), (50, 500),
)
"""Factor/inverse interval pairs searched by default; a convergence model's own (stalest)
pair at each batch is added to them."""
_UNKNOWN_STRATEGY = ("unknown strategy {v!r}; known: " + ", ".join(STRATEGIES)
                     + " (kaisa is searched over every grad-worker fraction)")
_UNKNOWN_DTYPE = ("factor communication precision {v!r} unknown; use "
                  + ", ".join(S.COMM_DTYPE_BYTES))


def parse_intervals(text: str, what: str = "intervals") -> list[tuple[int, int]]:
    """``"1/1,10/100"`` -> [(1, 1), (10, 100)]; errors name ``what`` and the pair as written."""
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        f, sep, i = part.partition("/")
        if not sep:
            raise ValueError(f"{what} {text!r}: {part!r} is not FACTOR/INVERSE, e.g. 10/100")
        values = []
        for v in (f.strip(), i.strip()):
            try:
                n = int(v)
            except ValueError:
                raise ValueError(f"{what} {text!r}: {part}: {v!r} is not a whole number"
                                 ) from None
            if n < 1:
                raise ValueError(f"{what} {text!r}: {part}: values must be >= 1, got {n}")
            values.append(n)
        pairs.append((values[0], values[1]))
    return pairs


def _whole(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _positive_ints(key: str, values: object) -> tuple[int, ...]:
    items = one_or_many(values, numbers.Integral, what=key, expected="a positive integer")
    if not items:
        raise ValueError(f"{key} is empty")
    for v in items:
        if not _whole(v) or v < 1:
            raise ValueError(f"{key} must be positive integers, got {v!r}")
    return tuple(sorted({int(v) for v in items}))


def _names(key: str, values: object, known: Collection[str], unknown: str) -> tuple[str, ...]:
    """Distinct names of ``known``, in order; ``unknown`` (formatted with the name) says what
    is wrong with one that is not."""
    items = one_or_many(values, str, what=key, expected="a name")
    for v in items:
        if not isinstance(v, str) or v not in known:
            raise ValueError(unknown.format(v=v))
    return tuple(dict.fromkeys(items))


def _interval_pairs(values: object) -> tuple[tuple[int, int], ...]:
    """Factor/inverse pairs: each a pair of integers or an ``"F/I"`` string (commas
    separating several), one alone or a list."""
    pairs: list[tuple[int, int]] = []
    for item in one_or_many(values, str, what="intervals", expected="an 'F/I' string"):
        if isinstance(item, str):
            pairs.extend(parse_intervals(item))
        elif isinstance(item, Sequence) and len(item) == 2 and all(map(_whole, item)):
            pairs.append((int(item[0]), int(item[1])))
        else:
            hint = (" (one pair alone is intervals=[(10, 100)] or '10/100')" if _whole(item)
                    else "")
            raise ValueError(f"intervals: {item!r} is neither a (factor, inverse) pair of "
                             f"integers nor an 'F/I' string such as '10/100'{hint}")
    return tuple(pairs)


def _bools(key: str, values: object) -> tuple[bool, ...]:
    items = one_or_many(values, bool, what=key, expected="True or False")
    for v in items:
        if not isinstance(v, bool):
            raise ValueError(f"{key} must be True or False, got {v!r}")
    return tuple(dict.fromkeys(items))


def _sizes_mb(key: str, values: object) -> tuple[float, ...]:
    items = one_or_many(values, numbers.Real, what=key, expected="a size in MB")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) \
                or not 0 < float(v) < math.inf:
            raise ValueError(f"bucket sizes must be > 0 MB, got {v!r}")
    return tuple(dict.fromkeys(float(v) for v in items))


@dataclass(frozen=True, kw_only=True)
class PlanSpace:
    """The grid of one plan; every tuple is searched in full (after the merges above).

    Built by :meth:`of` from what :func:`kfacperf.plan.plan` is given: every axis one value
    alone (``gpus=64``, ``strategies="kaisa"``, ``intervals="10/100"``) or a list."""

    gpus: tuple[int, ...]
    strategies: tuple[str, ...] = STRATEGIES
    batch_per_gpu: tuple[int, ...] = (32,)
    intervals: tuple[tuple[int, int], ...] = DEFAULT_INTERVALS
    comm_dtypes: tuple[str, ...] = S.COMM_DTYPES
    symmetric: tuple[bool, ...] = (False, True)
    bucket_mb: tuple[float, ...] = (25.0,)

    @classmethod
    def of(cls, *, gpus: int | Iterable[int], strategies: str | Iterable[str] = STRATEGIES,
           batch_per_gpu: int | Iterable[int] = (32,),
           intervals: str | Iterable[tuple[int, int] | str] = DEFAULT_INTERVALS,
           comm_dtypes: str | Iterable[str] = S.COMM_DTYPES,
           symmetric: bool | Iterable[bool] = (False, True),
           bucket_mb: float | Iterable[float] = (25.0,)) -> PlanSpace:
        return cls(gpus=_positive_ints("gpus", gpus),
                   strategies=_names("strategies", strategies, STRATEGIES, _UNKNOWN_STRATEGY),
                   batch_per_gpu=_positive_ints("batch_per_gpu", batch_per_gpu),
                   intervals=_interval_pairs(intervals),
                   comm_dtypes=_names("comm_dtypes", comm_dtypes, S.COMM_DTYPE_BYTES,
                                      _UNKNOWN_DTYPE),
                   symmetric=_bools("symmetric", symmetric),
                   bucket_mb=_sizes_mb("bucket_mb", bucket_mb))

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", _positive_ints("gpus", self.gpus))
        object.__setattr__(self, "batch_per_gpu",
                           _positive_ints("batch_per_gpu", self.batch_per_gpu))
        strategies = _names("strategies", self.strategies, STRATEGIES, _UNKNOWN_STRATEGY)
        if not strategies:
            raise ValueError("no strategy to search")
        object.__setattr__(self, "strategies", strategies)
        intervals = _interval_pairs(self.intervals)
        if not intervals:
            raise ValueError("no factor/inverse interval pair to search")
        for f, i in intervals:
            if min(f, i) < 1 or i % f:
                raise ValueError(f"intervals {f}/{i}: both must be >= 1 and the inverse "
                                 "interval a multiple of the factor interval")
        object.__setattr__(self, "intervals", tuple(dict.fromkeys(intervals)))
        comm_dtypes = _names("comm_dtypes", self.comm_dtypes, S.COMM_DTYPE_BYTES,
                             _UNKNOWN_DTYPE)
        if not comm_dtypes:
            raise ValueError("no factor communication precision to search")
        object.__setattr__(self, "comm_dtypes", comm_dtypes)
        symmetric = _bools("symmetric", self.symmetric)
        if not symmetric:
            raise ValueError("no symmetric-packing choice to search")
        object.__setattr__(self, "symmetric", symmetric)
        bucket_mb = _sizes_mb("bucket_mb", self.bucket_mb)
        if not bucket_mb:
            raise ValueError("bucket sizes must be > 0 MB, got []")
        object.__setattr__(self, "bucket_mb", bucket_mb)

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
