"""What the kernel timings record: one frozen dataclass per kind of measurement, the
:class:`Report` that holds them all (``kernels.json``), and JSON writing."""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from kfacperf.bench.kernels.plan import KernelPlan

FORMAT = "kfacperf-kernels-1"
OUTPUT_FILE = "kernels.json"


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Median, min and max of the timed calls (µs), and how many were made."""

    median_us: float
    min_us: float
    max_us: float
    repeats: int
    warmup: int

    @classmethod
    def of(cls, samples_us: Sequence[float], *, warmup: int) -> Timing:
        if not samples_us:
            raise ValueError("no timed calls")
        return cls(median_us=float(statistics.median(samples_us)), min_us=float(min(samples_us)),
                   max_us=float(max(samples_us)), repeats=len(samples_us), warmup=warmup)


@dataclass(frozen=True, kw_only=True)
class InverseTiming:
    """One inverse kernel at one size.  ``op``: ``eigh``, ``spd_inverse`` (the cholesky
    method's whole per-factor work), ``cholesky_ex`` or ``cholesky_inverse``.
    ``nominal_flops`` is what :meth:`~kfacperf.kfac.layers.KFACLayer.inverse_flops` charges
    (9n^3 per eigendecomposition, n^3 per Cholesky factorisation plus inverse).
    ``residual`` checks the result: ``|A Q - Q diag(w)| / |A|`` for eigh, ``|L L^T - M| / |M|``
    for the factorisation, ``|M M^-1 - I| / sqrt(n)`` for the inverses (Frobenius norms)."""

    op: str
    n: int
    dtype: str
    timing: Timing
    nominal_flops: float
    residual: float


@dataclass(frozen=True, kw_only=True)
class FactorTiming:
    """One layer's batch statistics at one batch size and precision.  ``input_shape`` and
    ``output_shape`` are the activation and output-gradient shapes timed (the layer's own in
    ResNet-50 at ``batch``); ``flops`` is
    :meth:`~kfacperf.kfac.layers.KFACLayer.factor_flops` of them; ``rows`` is R."""

    layer: str
    kind: str
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    batch: int
    precision: str
    activation_dtype: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dim_a: int
    dim_g: int
    rows: int
    flops: float
    timing: Timing


@dataclass(frozen=True, kw_only=True)
class GemmTiming:
    """``C = A B`` with square ``n x n`` operands; ``tflops`` = 2n^3 / median."""

    n: int
    precision: str
    timing: Timing
    tflops: float


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """A measurement left out, and why."""

    measurement: str
    what: str
    reason: str


@dataclass
class Report:
    """Everything one :func:`run_all` measured (``kernels.json``)."""

    device: dict[str, Any]
    clock: str
    dry_run: bool
    plan: KernelPlan
    eigh: list[InverseTiming] = field(default_factory=list)
    cholesky: list[InverseTiming] = field(default_factory=list)
    factors: list[FactorTiming] = field(default_factory=list)
    gemm: list[GemmTiming] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **as_json(self)}


def as_json(obj: Any) -> Any:
    """Dataclasses, tuples and lists as dicts and lists (NaN stays a float here;
    :func:`write_json` writes it as null)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: as_json(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_json(v) for v in obj]
    return obj


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` (dataclasses allowed) as indented JSON, atomically; returns ``path``.

    Strict JSON, as the project's reader (:func:`kfacperf.safety.load_json_file`) takes it:
    NaN and infinities (a median of nothing, a clock that did not tick) are written as
    null; one NaN would otherwise make the whole file unreadable to the landing.  Atomic: a
    process stopped while writing leaves the previous file, never half of one."""
    from kfacperf.safety import atomic_write_text, dumps_json

    return atomic_write_text(path, dumps_json(as_json(data), indent=1) + "\n")


def note_skipped(skipped: list[Skipped] | None, measurement: str, what: str,
                 reason: str) -> None:
    """Add a :class:`Skipped` record to ``skipped`` (if a list is given)."""
    if skipped is not None:
        skipped.append(Skipped(measurement=measurement, what=what, reason=reason))

