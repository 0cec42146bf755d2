"""Timings of the device's kernels: the raw material of the device model's inverse and
factor costs.

One module per measurement, each returning a list of records (frozen dataclasses,
:mod:`~kfacperf.bench.kernels.records`):

* :mod:`~kfacperf.bench.kernels.inverses`: ``torch.linalg.eigh`` of an ``n x n`` symmetric
  positive definite matrix (the ``eigen`` inverse method does one per Kronecker factor), and
  what the ``cholesky`` method does per factor (:func:`kfacperf.kfac.inverse._spd_inverse`)
  with its two kernels alone;
* :mod:`~kfacperf.bench.kernels.factors`: the optimizer's factor computation of
  representative ResNet-50 layers, with each layer's own shapes, at several batch sizes and
  in each precision;
* :mod:`~kfacperf.bench.kernels.gemm`: square matmul rates in fp32 (TF32 off), tf32 and bf16.

**Timing** (:mod:`~kfacperf.bench.kernels.timing`).  On a GPU, a pair of CUDA events around
each call, then a synchronisation (so one call never overlaps the next, and time the device
idles inside a call, e.g. while ``eigh`` checks its result on the host, counts); on a CPU,
``perf_counter_ns``.  Each measurement makes ``warmup`` calls first (left out: they include
the libraries' set-up, such as a solver's workspace for a new size), then the median of
``repeats`` calls, fewer (down to ``min_repeats``) when one call is long.  A record keeps
median, min and max.

**Dtype.** :class:`~kfacperf.kfac.preconditioner.KFACPreconditioner` decomposes in float64
by default (``inverse_dtype``), so inverses are timed in fp64 as well as in fp32; every
record names its dtype.  Sizes whose predicted time (the previous size's, scaled by
``n^3``) exceeds ``max_call_s``, or that would outrun the :class:`Budget`, are skipped and
listed as such (:mod:`~kfacperf.bench.kernels.plan`).

:func:`run_all` runs a whole :class:`KernelPlan` and writes ``kernels.json``; from a shell,
``python -m kfacperf.bench.kernels --out DIR [--dry-run]`` (``--dry-run`` runs every
measurement tiny, sizes up to 128, and works on a CPU).
"""
from kfacperf.bench.kernels.factors import (
    LayerShape,
    kfac_layer,
    network_layer_shapes,
    time_factors,
)
from kfacperf.bench.kernels.gemm import time_gemm
from kfacperf.bench.kernels.inverses import (
    eigh_residual,
    inverse_residual,
    random_spd,
    time_cholesky,
    time_eigh,
    torch_dtype,
)
from kfacperf.bench.kernels.plan import (
    DRY_PLAN,
    FACTOR_PRECISIONS,
    FULL_PLAN,
    GEMM_PRECISIONS,
    Budget,
    KernelPlan,
)
from kfacperf.bench.kernels.records import (
    FORMAT,
    OUTPUT_FILE,
    FactorTiming,
    GemmTiming,
    InverseTiming,
    Report,
    Skipped,
    Timing,
    write_json,
)
from kfacperf.bench.kernels.run import describe_device, run_all, summary_lines
from kfacperf.bench.kernels.timing import (
    CallTimer,
    call_timer,
    cpu_call_timer,
    cuda_call_timer,
    measure,
)

__all__ = [
    "DRY_PLAN", "FACTOR_PRECISIONS", "FORMAT", "FULL_PLAN", "GEMM_PRECISIONS", "OUTPUT_FILE",
    "Budget", "CallTimer", "FactorTiming", "GemmTiming", "InverseTiming", "KernelPlan",
    "LayerShape", "Report", "Skipped", "Timing", "call_timer", "cpu_call_timer",
    "cuda_call_timer", "describe_device", "eigh_residual", "inverse_residual", "kfac_layer",
    "measure", "network_layer_shapes", "random_spd", "run_all", "summary_lines", "time_cholesky",
    "time_eigh", "time_factors", "time_gemm", "torch_dtype", "write_json",
]
