"""Timings of the device's kernels: the raw material of the device model's inverse and
factor costs.

One function per measurement, each returning a list of records (frozen dataclasses; see
:func:`as_json`):

* :func:`time_eigh`: ``torch.linalg.eigh`` of an ``n x n`` symmetric positive definite matrix
  (the ``eigen`` inverse method does one per Kronecker factor).
* :func:`time_cholesky`: what the ``cholesky`` inverse method does per factor,
  :func:`kfacperf.kfac.inverse._spd_inverse` (a copy with the damping on the diagonal,
  ``torch.linalg.cholesky_ex``, ``torch.cholesky_inverse``), and its two kernels alone.
* :func:`time_factors`: :meth:`kfacperf.kfac.layers.KFACLayer.compute_batch_factors` (the
  batch statistics ``A = a^T a / R`` and ``G``) of representative ResNet-50 layers, with
  the shapes each layer sees in the network, at several batch sizes and in each precision
  of :mod:`kfacperf.precision`.
* :func:`time_gemm`: square matmul rates in fp32 (TF32 off), tf32 and bf16.

**Timing.** On a GPU, a pair of CUDA events around each call, then a synchronisation (so one
call never overlaps the next, and time the device idles inside a call, e.g. while
``eigh`` checks its result on the host, counts); on a CPU, ``perf_counter_ns``.  Each
measurement makes ``warmup`` calls first (left out: they include the libraries' set-up,
such as a solver's workspace for a new size), then the median of ``repeats`` calls, fewer
(down to ``min_repeats``) when one call is long.  A record keeps median, min and max.

**Inputs.** Inverses take random SPD matrices ``X X^T / n + I`` (``X`` Gaussian): well
conditioned, eigenvalues in about [1, 5], like damped factors and never singular or zero.
Factors take Gaussian activations and output gradients of the layer's real shapes.

**Dtype.** :class:`~kfacperf.kfac.preconditioner.KFACPreconditioner` decomposes in float64
by default (``inverse_dtype``), so inverses are timed in fp64 as well as in fp32; every
record names its dtype.  Sizes whose predicted time (the previous size's, scaled by
``n^3``) exceeds ``max_call_s``, or that would outrun the :class:`Budget`, are skipped and
listed as such.

Run ``python -m kfacperf.bench.kernels --out DIR [--dry-run]``: writes ``DIR/kernels.json``.
``--dry-run`` runs every measurement tiny (sizes up to 128) and works on a CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

FORMAT = "kfacperf-kernels-1"
OUTPUT_FILE = "kernels.json"

INVERSE_SIZES: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
"""Matrix sizes of the inverse timings (ResNet-50's factors have dims 64 to 4608)."""
INVERSE_DTYPES: tuple[str, ...] = ("fp32", "fp64")
GEMM_SIZES: tuple[int, ...] = (1024, 2048, 4096, 8192)
GEMM_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
FACTOR_BATCHES: tuple[int, ...] = (32, 64, 128, 256)
FACTOR_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
RESNET50_FACTOR_LAYERS: tuple[str, ...] = (
    "conv1",                  # 7x7/2, 3 -> 64 channels at 224x224: A 147, G 64
    "layer1.0.conv1",         # 1x1, 64 -> 64 at 56x56
    "layer1.0.conv2",         # 3x3, 64 at 56x56: A 576
    "layer2.0.conv2",         # 3x3/2, 128, 56x56 -> 28x28: A 1152
    "layer3.0.downsample.0",  # 1x1/2 projection, 512 -> 1024
    "layer3.1.conv2",         # 3x3, 256 at 14x14: A 2304
    "layer4.0.conv3",         # 1x1, 512 -> 2048 at 7x7: G 2048
    "layer4.1.conv2",         # 3x3, 512 at 7x7: A 4608, the largest factor
    "fc",                     # Linear 2048 -> 1000 with bias: A 2049, G 1000
)
"""Layers whose factor computation is timed: every kind of layer ResNet-50 has (stem,
1x1, 3x3, strided, projection, classifier) and its largest factors."""

CallTimer = Callable[[Callable[[], Any]], float]
"""Times one call of a function and returns its duration in microseconds."""

_DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16"}


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True, kw_only=True)
class KernelPlan:
    """What :func:`run_all` measures, and how often."""

    inverse_sizes: tuple[int, ...] = INVERSE_SIZES
    inverse_dtypes: tuple[str, ...] = INVERSE_DTYPES
    gemm_sizes: tuple[int, ...] = GEMM_SIZES
    gemm_precisions: tuple[str, ...] = GEMM_PRECISIONS
    factor_layers: tuple[str, ...] = RESNET50_FACTOR_LAYERS
    factor_batches: tuple[int, ...] = FACTOR_BATCHES
    factor_precisions: tuple[str, ...] = FACTOR_PRECISIONS
    image_size: int = 224
    warmup: int = 1
    repeats: int = 10
    min_repeats: int = 2
    target_s: float = 1.0  # about this long per record (repeats permitting)
    max_call_s: float = 5.0  # skip an inverse size predicted to take longer per call


FULL_PLAN = KernelPlan()
"""The GPU plan: about 1.5 minutes on an H200 (most of it eigh of 4096 and 8192)."""

DRY_PLAN = KernelPlan(
    inverse_sizes=(16, 32, 64, 128), gemm_sizes=(64, 128),
    # every kind of layer (7x7 stem, 3x3, strided 1x1 projection, 1x1 with G 2048, linear),
    # without the wide 3x3 ones whose A (up to 4608) costs seconds on a CPU
    factor_layers=("conv1", "layer1.0.conv2", "layer3.0.downsample.0", "layer4.0.conv3", "fc"),
    factor_batches=(2,), image_size=32, repeats=3, min_repeats=2, target_s=0.05, max_call_s=2.0,
)
"""The same measurements tiny, for a CPU (a few seconds)."""


# --------------------------------------------------------------------------- records


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
    """Dataclasses, tuples and lists as JSON-ready dicts and lists (NaN stays a float)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: as_json(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_json(v) for v in obj]
    return obj


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` (dataclasses allowed) as indented JSON; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(as_json(data), indent=1, sort_keys=False) + "\n")
    return path


# --------------------------------------------------------------------------- timing


class Budget:
    """Seconds left until a deadline (None: no deadline), on a monotonic ``clock``."""

    def __init__(self, seconds: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.deadline = None if seconds is None else clock() + seconds

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self._clock()

    def allows(self, estimate_s: float) -> bool:
        """Whether something estimated to take ``estimate_s`` ends before the deadline."""
        return estimate_s <= self.left()


def cuda_call_timer() -> CallTimer:
    """Times a call with CUDA events on the current stream, synchronising after it."""
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def time_call(fn: Callable[[], Any]) -> float:
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    return time_call


def cpu_call_timer(clock: Callable[[], int] = time.perf_counter_ns) -> CallTimer:
    """Times a call with ``clock`` (nanoseconds)."""

    def time_call(fn: Callable[[], Any]) -> float:
        t0 = clock()
        fn()
        return (clock() - t0) / 1e3

    return time_call


def call_timer(device: Any) -> tuple[CallTimer, str]:
    """The timer for ``device`` and the name of its clock (``cuda_events``/``perf_counter``)."""
    if getattr(device, "type", str(device)) == "cuda":
        return cuda_call_timer(), "cuda_events"
    return cpu_call_timer(), "perf_counter"


def measure(fn: Callable[[], Any], *, timer: CallTimer, warmup: int = 1, repeats: int = 10,
            min_repeats: int = 3, target_s: float | None = None) -> Timing:
    """``warmup`` timed calls left out, then up to ``repeats`` kept.

    With ``target_s``, as many repeats as fit in about that long at the last warm-up call's
    duration, between ``min_repeats`` and ``repeats``.
    """
    if warmup < 0 or repeats < 1 or not 1 <= min_repeats <= repeats:
        raise ValueError(f"need warmup >= 0 and 1 <= min_repeats <= repeats, got {warmup}, "
                         f"{min_repeats}, {repeats}")
    last_us = None
    for _ in range(warmup):
        last_us = timer(fn)
    n = repeats
    if target_s is not None and last_us is not None and last_us > 0:
        n = max(min_repeats, min(repeats, int(target_s * 1e6 / last_us)))
    return Timing.of([timer(fn) for _ in range(n)], warmup=warmup)


def _predicted_call_s(done: Sequence[tuple[int, float]], n: int, power: float = 3.0) -> float:
    """A call at size ``n`` predicted from the largest size timed (``(size, µs)`` pairs) by
    ``n^power`` scaling; 0 when nothing was timed yet."""
    if not done:
        return 0.0
    size, us = max(done)
    return us / 1e6 * (n / size) ** power


# --------------------------------------------------------------------------- inputs


def torch_dtype(name: str) -> Any:
    """``fp32``/``fp64``/``bf16`` as a torch dtype."""
    import torch

    try:
        return getattr(torch, _DTYPES[name])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}") from None


def random_spd(n: int, *, dtype: Any, device: Any, seed: int = 0) -> Any:
    """``X X^T / n + I`` for a Gaussian ``n x n`` ``X``, exactly symmetric (see the module
    docstring); computed with TF32 off."""
    import torch

    from kfacperf import precision

    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + n)
    with precision.float32_math("fp32"):
        x = torch.randn(n, n, generator=gen, dtype=dtype, device=device)
        a = (x @ x.T).div_(n)
    a = (a + a.T).mul_(0.5)
    a.diagonal().add_(1.0)
    return a


def _rel(num: Any, den: Any) -> float:
    import torch

    return float(torch.linalg.matrix_norm(num) / torch.linalg.matrix_norm(den))


def eigh_residual(a: Any, w: Any, q: Any) -> float:
    """``|A Q - Q diag(w)|_F / |A|_F`` (in float64)."""
    a, w, q = (t.double() for t in (a, w, q))
    return _rel(a @ q - q * w, a)


def inverse_residual(m: Any, m_inv: Any) -> float:
    """``|M M^-1 - I|_F / sqrt(n)`` (in float64)."""
    import torch

    m, m_inv = m.double(), m_inv.double()
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return float(torch.linalg.matrix_norm(m @ m_inv - eye)) / math.sqrt(m.shape[0])


# --------------------------------------------------------------------------- measurements


def time_eigh(sizes: Iterable[int], *, dtype: str, device: Any, timer: CallTimer,
              plan: KernelPlan = FULL_PLAN, budget: Budget | None = None,
              skipped: list[Skipped] | None = None) -> list[InverseTiming]:
    """``torch.linalg.eigh`` of random SPD matrices, smallest size first (see the module
    docstring for skipping); the result of every size's last call is checked."""
    import torch

    budget = budget or Budget()
    out: list[InverseTiming] = []
    done: list[tuple[int, float]] = []
    for n in sizes:
        why = _skip_reason(done, n, plan, budget)
        if why:
            _note(skipped, "eigh", f"n={n} {dtype}", why)
            continue
        a = random_spd(n, dtype=torch_dtype(dtype), device=device)
        result: list[Any] = []

        def call(a: Any = a, result: list[Any] = result) -> None:
            result[:] = torch.linalg.eigh(a)

        t = measure(call, timer=timer, warmup=plan.warmup, repeats=plan.repeats,
                    min_repeats=plan.min_repeats, target_s=plan.target_s)
        w, q = result
        out.append(InverseTiming(op="eigh", n=n, dtype=dtype, timing=t,
                                 nominal_flops=9.0 * n**3, residual=eigh_residual(a, w, q)))
        done.append((n, t.median_us))
        del a, result, w, q
    return out


def time_cholesky(sizes: Iterable[int], *, dtype: str, device: Any, timer: CallTimer,
                  plan: KernelPlan = FULL_PLAN, budget: Budget | None = None,
                  skipped: list[Skipped] | None = None,
                  damping: float = 1e-3) -> list[InverseTiming]:
    """The cholesky method's per-factor work (``spd_inverse``) and its two kernels alone
    (``cholesky_ex``, ``cholesky_inverse``), per size; ``damping`` goes on the diagonal."""
    import torch

    from kfacperf.kfac.inverse import _spd_inverse

    budget = budget or Budget()
    out: list[InverseTiming] = []
    done: list[tuple[int, float]] = []
    for n in sizes:
        why = _skip_reason(done, n, plan, budget, calls_per_size=3)
        if why:
            _note(skipped, "cholesky", f"n={n} {dtype}", why)
            continue
        a = random_spd(n, dtype=torch_dtype(dtype), device=device)
        damp = torch.tensor(damping, dtype=a.dtype, device=a.device)
        m = a.clone()
        m.diagonal().add_(damp)
        chol, _ = torch.linalg.cholesky_ex(m)
        held: dict[str, Any] = {}

        def whole(a: Any = a, damp: Any = damp, held: dict[str, Any] = held) -> None:
            held["inv"] = _spd_inverse(a, damp)

        def factorise(m: Any = m, held: dict[str, Any] = held) -> None:
            held["chol"] = torch.linalg.cholesky_ex(m)[0]

        def invert(chol: Any = chol, held: dict[str, Any] = held) -> None:
            held["inv_only"] = torch.cholesky_inverse(chol)

        kw: dict[str, Any] = dict(timer=timer, warmup=plan.warmup, repeats=plan.repeats,
                                  min_repeats=plan.min_repeats, target_s=plan.target_s)
        t_whole, t_chol, t_inv = (measure(f, **kw) for f in (whole, factorise, invert))
        lower, md = held["chol"].double(), m.double()
        out += [
            InverseTiming(op="spd_inverse", n=n, dtype=dtype, timing=t_whole,
                          nominal_flops=float(n**3), residual=inverse_residual(m, held["inv"])),
            InverseTiming(op="cholesky_ex", n=n, dtype=dtype, timing=t_chol,
                          nominal_flops=n**3 / 3.0, residual=_rel(lower @ lower.T - md, md)),
            InverseTiming(op="cholesky_inverse", n=n, dtype=dtype, timing=t_inv,
                          nominal_flops=2.0 * n**3 / 3.0,
                          residual=inverse_residual(m, held["inv_only"])),
        ]
        done.append((n, t_whole.median_us))
        del a, m, chol, held, lower, md
    return out


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    """A layer of the network and the shapes it sees at batch 1."""

    name: str
    module: Any
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def network_layer_shapes(names: Sequence[str], *, image_size: int = 224,
                         workload: str = "resnet50") -> list[LayerShape]:
    """The named layers of ``workload`` and their input/output shapes at batch 1, from a
    forward pass of the real model (CPU, no gradients)."""
    import torch

    from kfacperf.workloads import get_workload

    w = get_workload(workload, image_size=image_size)
    model = w.build_model(seed=0).eval()
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{workload} has no layer(s) {', '.join(missing)}")
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    for name in names:
        def hook(mod: Any, inputs: Any, output: Any, name: str = name) -> None:
            seen[name] = (tuple(inputs[0].shape), tuple(output.shape))

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros((1, *w.input_shape), dtype=w.input_dtype))
    finally:
        for h in handles:
            h.remove()
    return [LayerShape(name=n, module=modules[n], input_shape=seen[n][0],
                       output_shape=seen[n][1]) for n in names]


def kfac_layer(shape: LayerShape) -> Any:
    """The optimizer's :class:`~kfacperf.kfac.layers.KFACLayer` for a network layer."""
    from torch import nn

    from kfacperf.kfac.layers import Conv2dLayer, LinearLayer

    if isinstance(shape.module, nn.Conv2d):
        return Conv2dLayer(name=shape.name, module=shape.module, inverse_method="eigen")
    if isinstance(shape.module, nn.Linear):
        return LinearLayer(name=shape.name, module=shape.module, inverse_method="eigen")
    raise ValueError(f"layer {shape.name!r} is a {type(shape.module).__name__}, not a K-FAC layer")


def time_factors(shapes: Sequence[LayerShape], *, batches: Iterable[int],
                 precisions: Iterable[str], device: Any, timer: CallTimer,
                 plan: KernelPlan = FULL_PLAN, budget: Budget | None = None,
                 skipped: list[Skipped] | None = None, seed: int = 0) -> list[FactorTiming]:
    """``compute_batch_factors`` of each layer at each batch size and precision.

    The precision sets what :mod:`kfacperf.precision` sets in a profiled run: ``fp32`` and
    ``tf32`` activations are float32 (TF32 off / on), ``bf16`` activations are bfloat16 (as
    autocast leaves them; the layer computes its factors in float32 after a cast).
    """
    import torch

    from kfacperf import precision as P

    budget = budget or Budget()
    batches, precisions = tuple(batches), tuple(precisions)
    out: list[FactorTiming] = []
    gen = torch.Generator(device=device).manual_seed(seed)
    for shape in shapes:
        module = shape.module.to(device)  # in place: ``shape.module`` is it
        layer = kfac_layer(shape)
        for batch in batches:
            for prec in precisions:
                what = f"{shape.name} batch {batch} {prec}"
                if budget.left() <= 0:
                    _note(skipped, "factors", what, "time budget spent")
                    continue
                act = torch.bfloat16 if prec == "bf16" else torch.float32
                x = torch.randn((batch, *shape.input_shape[1:]), generator=gen, device=device,
                                dtype=torch.float32).to(act)
                g = torch.randn((batch, *shape.output_shape[1:]), generator=gen, device=device,
                                dtype=torch.float32).div_(batch).to(act)

                def call(layer: Any = layer, x: Any = x, g: Any = g) -> None:
                    layer.compute_batch_factors(x, g)

                with P.float32_math(prec):
                    t = measure(call, timer=timer, warmup=plan.warmup, repeats=plan.repeats,
                                min_repeats=plan.min_repeats, target_s=plan.target_s)
                m = module
                out.append(FactorTiming(
                    layer=shape.name, kind=layer.kind,
                    kernel_size=tuple(getattr(m, "kernel_size", ())),
                    stride=tuple(getattr(m, "stride", ())), batch=batch, precision=prec,
                    activation_dtype=str(act).removeprefix("torch."),
                    input_shape=tuple(x.shape), output_shape=tuple(g.shape),
                    dim_a=layer.dim_a, dim_g=layer.dim_g, rows=layer.rows,
                    flops=float(layer.factor_flops(x, g)), timing=t))
                del x, g
        layer.a_batch = layer.g_batch = None
        shape.module.to("cpu")
    return out


def time_gemm(sizes: Iterable[int], *, precisions: Iterable[str], device: Any,
              timer: CallTimer, plan: KernelPlan = FULL_PLAN, budget: Budget | None = None,
              skipped: list[Skipped] | None = None) -> list[GemmTiming]:
    """Square matmuls: ``fp32`` (float32, TF32 off), ``tf32`` (float32, TF32 on), ``bf16``."""
    import torch

    from kfacperf import precision as P

    budget = budget or Budget()
    out: list[GemmTiming] = []
    sizes = tuple(sizes)
    for prec in precisions:
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        for n in sizes:
            if budget.left() <= 0:
                _note(skipped, "gemm", f"n={n} {prec}", "time budget spent")
                continue
            gen = torch.Generator(device=device).manual_seed(n)
            a = torch.randn(n, n, generator=gen, device=device).to(dtype)
            b = torch.randn(n, n, generator=gen, device=device).to(dtype)
            c = torch.empty(n, n, device=device, dtype=dtype)

            def call(a: Any = a, b: Any = b, c: Any = c) -> None:
                torch.matmul(a, b, out=c)

            with P.float32_math(prec):
                t = measure(call, timer=timer, warmup=plan.warmup, repeats=plan.repeats,
                            min_repeats=plan.min_repeats, target_s=plan.target_s)
            out.append(GemmTiming(n=n, precision=prec, timing=t,
                                  tflops=2.0 * n**3 / (t.median_us * 1e-6) / 1e12))
            del a, b, c
    return out


def _skip_reason(done: Sequence[tuple[int, float]], n: int, plan: KernelPlan, budget: Budget,
                 calls_per_size: int = 1) -> str:
    call_s = _predicted_call_s(done, n)
    if call_s > plan.max_call_s:
        return (f"predicted {call_s:.1f} s per call (n^3 from the largest size timed) > "
                f"{plan.max_call_s:g} s")
    need = call_s * calls_per_size * (plan.warmup + plan.min_repeats)
    if not budget.allows(need):
        return f"time budget: predicted {need:.1f} s, {max(0.0, budget.left()):.1f} s left"
    return ""


def _note(skipped: list[Skipped] | None, measurement: str, what: str, reason: str) -> None:
    if skipped is not None:
        skipped.append(Skipped(measurement=measurement, what=what, reason=reason))


# --------------------------------------------------------------------------- all of it


def describe_device(device: Any) -> dict[str, Any]:
    """torch, CUDA and cuDNN versions and the device's name, capability and memory."""
    import platform

    import torch

    info: dict[str, Any] = {
        "type": getattr(device, "type", str(device)),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": (torch.backends.cudnn.version()
                          if torch.backends.cudnn.is_available() else None),
        "python_version": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    if info["type"] == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, capability=list(torch.cuda.get_device_capability(device)),
            memory_total_mib=props.total_memory / 2**20,
            multiprocessors=props.multi_processor_count,
            preferred_linalg_library=str(torch.backends.cuda.preferred_linalg_library()),
        )
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def default_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_all(out_dir: str | Path, *, dry_run: bool = False, budget_s: float | None = None,
            device: Any = None, plan: KernelPlan | None = None,
            log: Callable[[str], None] = print) -> Report:
    """Every measurement of ``plan`` (default: :data:`DRY_PLAN` or :data:`FULL_PLAN`) on
    ``device``; writes ``out_dir/kernels.json`` (also when the budget cut it short) and
    returns the report."""
    t0 = time.monotonic()
    device = default_device() if device is None else device
    plan = plan or (DRY_PLAN if dry_run else FULL_PLAN)
    budget = Budget(budget_s)
    timer, clock = call_timer(device)
    report = Report(device=describe_device(device), clock=clock, dry_run=dry_run, plan=plan)
    path = Path(out_dir) / OUTPUT_FILE

    def step(label: str, fn: Callable[[], list]) -> list:
        s0 = time.monotonic()
        got = fn()
        log(f"  kernels: {label}: {len(got)} record(s) in {time.monotonic() - s0:.1f} s")
        return got

    for dtype in plan.inverse_dtypes:
        report.eigh += step(f"eigh {dtype}", lambda dtype=dtype: time_eigh(
            plan.inverse_sizes, dtype=dtype, device=device, timer=timer, plan=plan,
            budget=budget, skipped=report.skipped))
    for dtype in plan.inverse_dtypes:
        report.cholesky += step(f"cholesky {dtype}", lambda dtype=dtype: time_cholesky(
            plan.inverse_sizes, dtype=dtype, device=device, timer=timer, plan=plan,
            budget=budget, skipped=report.skipped))
    shapes = network_layer_shapes(plan.factor_layers, image_size=plan.image_size)
    report.factors = step("factors", lambda: time_factors(
        shapes, batches=plan.factor_batches, precisions=plan.factor_precisions, device=device,
        timer=timer, plan=plan, budget=budget, skipped=report.skipped))
    report.gemm = step("gemm", lambda: time_gemm(
        plan.gemm_sizes, precisions=plan.gemm_precisions, device=device, timer=timer,
        plan=plan, budget=budget, skipped=report.skipped))
    report.elapsed_s = time.monotonic() - t0
    write_json(path, report.to_json())
    for s in report.skipped:
        log(f"  kernels: skipped {s.measurement} {s.what}: {s.reason}")
    return report


def summary_lines(report: Report) -> list[str]:
    """A few lines for a terminal: eigh and spd_inverse per size, GEMM rates."""
    lines = []
    for name, rows in (("eigh", report.eigh),
                       ("cholesky (spd_inverse)", [r for r in report.cholesky
                                                   if r.op == "spd_inverse"])):
        for dtype in sorted({r.dtype for r in rows}):
            cells = ", ".join(f"{r.n}: {r.timing.median_us / 1e3:.3g} ms" for r in rows
                              if r.dtype == dtype)
            lines.append(f"{name} {dtype}: {cells}")
    for prec in sorted({g.precision for g in report.gemm}):
        cells = ", ".join(f"{g.n}: {g.tflops:.1f}" for g in report.gemm if g.precision == prec)
        lines.append(f"gemm {prec} TFLOP/s: {cells}")
    if report.factors:
        slowest = max(report.factors, key=lambda f: f.timing.median_us)
        lines.append(f"factors: {len(report.factors)} records; slowest {slowest.layer} "
                     f"batch {slowest.batch} {slowest.precision}: "
                     f"{slowest.timing.median_us / 1e3:.3g} ms")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfacperf.bench.kernels",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for kernels.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (runs on a CPU)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip what would end later than this many seconds from now")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, as kfacperf profile's ranks)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else None
    report = run_all(args.out, dry_run=args.dry_run, budget_s=args.budget_s, device=device)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {Path(args.out) / OUTPUT_FILE} ({report.elapsed_s:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
