"""The cost model: how long each compute stage and each collective takes.

This is the one interface between the models and the step graphs/engine::

    cost = CostModel(workload=w, device=d, cluster=c, *, dtype="fp32", kfac_dtype="fp32",
                     inverse_method="eigen", comm_dtype="fp32", symmetric_factors=False,
                     v_form=None, bandwidth_scale=1.0, alpha_scale=1.0, compute_scale=1.0,
                     ranks_per_node=1, threads_per_rank=1, use_measured=True)
    cost.compute_us(stage, layer: LayerModel | None, *, batch: int, workload=None) -> float
    cost.collective_us(op, nbytes, *, group_size: int, nodes: int) -> float
    cost.for_gpus(gpus) -> CostModel        # ranks_per_node = min(gpus, gpus_per_node)
    cost.with_overrides(**kwargs) -> CostModel
    cost.flops(stage, layer, *, batch, workload=None) -> float
    cost.bytes_moved(stage, layer, *, batch, workload=None) -> float
    cost.nodes_spanned(group_size) -> int
    # payload helpers for the step graphs (comm_dtype and symmetric packing applied):
    cost.factor_bytes(layer) -> int          # A and G of one layer
    cost.inverse_bytes(layer) -> int         # eigenbases + eigenvalues, or the two inverses
    cost.grad_bytes(layer | None, *, workload=None) -> int   # None: all parameters
    dtype_bytes(dtype) -> int;  factor_elements(d, symmetric) -> int

``stage`` is a compute stage of :mod:`kfacperf.stages`.  With ``layer=None``, ``forward``,
``backward`` and ``update`` cost the whole model; with a layer they cost that layer's share, so
the engine can interleave per-layer backward with communication.  For forward and backward the
whole model is exactly the sum of the per-layer shares (each layer carries a FLOP-proportional
share of the non-K-FAC work, ``other_fwd_flops_per_example``); ``update`` of the whole model is
one fused call over all parameters (K-FAC layers and ``other_params``).  ``factor_compute``,
``inverse`` and ``precondition`` need a layer.  Backward is the backward pass alone: the factor
statistics computed in backward hooks are ``factor_compute`` (calibration subtracts them from
the measured backward, where they are nested).

Compute time (roofline per call)::

    slowdown * (overhead_us[kind] * calls + max(F / peak(dtype), B / mem_bw) / efficiency[kind])
               / compute_scale

with analytic FLOPs ``F`` and bytes ``B`` (batch ``N``, rows ``r``, dims ``dA``, ``dG``,
forward FLOPs ``f`` per example):

=================  ==================================================  ====================
stage              FLOPs                                               calls
=================  ==================================================  ====================
forward            N f                                                 1 per layer
backward           2 N f (input and weight gradients)                  1 per layer
factor_compute     2 N r (dA^2 + dG^2) (conv with geometry: phases,    1
                   see ``_factor_phases``)
inverse            eigen: 9 (dA^3 + dG^3); cholesky: dA^3 + dG^3       1
precondition       eigen: 4 dA dG (dA + dG); cholesky: 2 dA dG (dA+dG) 1
update             4 per parameter (momentum SGD)                      1
=================  ==================================================  ====================

The constants (9 for a symmetric eigendecomposition with vectors, Golub & Van Loan; 1 for a
Cholesky factorisation plus inverse) only set the eigen/cholesky ratio; the fitted efficiency
absorbs the rest.  When the device model holds a time measured on this workload
(``[[measured]]``), the roofline is scaled to reproduce it: ``time = roofline(N) *
measured(N_m) / roofline(N_m)`` for the nearest measured batch ``N_m`` (exact when ``N = N_m``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

from kfacperf import stages as S
from kfacperf.sim.cluster_model import ClusterModel
from kfacperf.sim.collectives import ALL_OPS, group_collective_us
from kfacperf.sim.device_model import DTYPES, INVERSE_METHODS, STAGE_KINDS, DeviceModel
from kfacperf.sim.workload_model import LayerModel, WorkloadModel

DTYPE_BYTES: dict[str, int] = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
BATCH_STAGES = (S.FORWARD, S.BACKWARD, S.FACTOR_COMPUTE)
WHOLE_MODEL_STAGES = (S.FORWARD, S.BACKWARD, S.UPDATE)
INVERSE_FLOPS_PER_D3 = {"eigen": 9.0, "cholesky": 1.0}
PRECOND_FLOPS_FACTOR = {"eigen": 4.0, "cholesky": 2.0}
UPDATE_FLOPS_PER_PARAM = 4.0
UPDATE_BYTES_PER_PARAM = 20.0  # read param, grad, momentum; write param, momentum (fp32)


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


def factor_elements(d: int, symmetric: bool = False) -> int:
    """Elements of a d x d factor, d(d+1)/2 with upper-triangle packing."""
    return d * (d + 1) // 2 if symmetric else d * d


@dataclass(frozen=True, kw_only=True)
class CostOptions:
    """Knobs and what-if overrides of a :class:`CostModel`."""

    dtype: str = "fp32"
    kfac_dtype: str = "fp32"
    inverse_method: str = "eigen"
    comm_dtype: str = "fp32"
    symmetric_factors: bool = False
    v_form: str | None = None
    bandwidth_scale: float = 1.0
    alpha_scale: float = 1.0
    compute_scale: float = 1.0
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    use_measured: bool = True

    def __post_init__(self) -> None:
        for key in ("dtype", "kfac_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"{key} must be one of {DTYPES}, got {getattr(self, key)!r}")
        if self.inverse_method not in INVERSE_METHODS:
            raise ValueError(f"inverse_method must be one of {INVERSE_METHODS}, "
                             f"got {self.inverse_method!r}")
        dtype_bytes(self.comm_dtype)
        for key in ("bandwidth_scale", "compute_scale"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be > 0, got {value}")
        if not (math.isfinite(self.alpha_scale) and self.alpha_scale >= 0):
            raise ValueError(f"alpha_scale must be >= 0, got {self.alpha_scale}")
        if self.ranks_per_node < 1 or self.threads_per_rank < 1:
            raise ValueError("ranks_per_node and threads_per_rank must be >= 1")


_OPTION_NAMES = tuple(f.name for f in fields(CostOptions))


class CostModel:
    """Stage and collective times for one workload on one device and cluster."""

    def __init__(
        self, *, workload: WorkloadModel, device: DeviceModel, cluster: ClusterModel,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown CostModel option(s) {unknown}; known: {_OPTION_NAMES}")
        self.options = CostOptions(**options)
        self.workload = workload
        self.device = device
        self.base_cluster = cluster
        o = self.options
        self.cluster = (
            cluster.scaled(bandwidth=o.bandwidth_scale, alpha=o.alpha_scale)
            if (o.bandwidth_scale, o.alpha_scale) != (1.0, 1.0) else cluster
        )
        self.slowdown = cluster.compute_slowdown(o.ranks_per_node, o.threads_per_rank)
        self._compute_cache: dict[tuple, float] = {}
        self._comm_cache: dict[tuple, float] = {}
        self._measured: dict[tuple, list[tuple[int, float]]] = {}
        for m in device.measured:
            key = (m.workload, m.stage, m.layer, self._method_key(m.stage, m.inverse_method))
            self._measured.setdefault(key, []).append((m.batch, m.time_us))

    def __getattr__(self, name: str) -> Any:  # cost.inverse_method, cost.comm_dtype, ...
        if name in _OPTION_NAMES:
            return getattr(self.options, name)
        raise AttributeError(name)

    def with_overrides(self, **options: Any) -> "CostModel":
        merged = {f: getattr(self.options, f) for f in _OPTION_NAMES}
        merged.update(options)
        return CostModel(workload=self.workload, device=self.device, cluster=self.base_cluster,
                         **merged)

    def for_gpus(self, gpus: int) -> "CostModel":
        """This model with the compute contention of ``gpus`` ranks filling nodes in order."""
        ranks = max(1, min(gpus, self.base_cluster.gpus_per_node))
        return self if ranks == self.options.ranks_per_node else self.with_overrides(
            ranks_per_node=ranks)

    def nodes_spanned(self, group_size: int) -> int:
        return self.cluster.nodes_spanned(group_size)

    # -- communication ----------------------------------------------------------------------
    def collective_us(
        self, op: str, nbytes: float | Sequence[float], *, group_size: int, nodes: int
    ) -> float:
        """Time of collective ``op`` (see :mod:`kfacperf.sim.collectives` for ``nbytes``)."""
        size_key = tuple(nbytes) if op.endswith("_v") and not isinstance(nbytes, str) else nbytes
        key = (op, size_key, group_size, nodes)
        try:
            return self._comm_cache[key]
        except (KeyError, TypeError):
            pass
        t = group_collective_us(self.cluster, op, nbytes, group_size=group_size, nodes=nodes,
                                v_form=self.options.v_form)
        try:
            self._comm_cache[key] = t
        except TypeError:
            pass
        return t

    def factor_bytes(self, layer: LayerModel) -> int:
        o = self.options
        elems = factor_elements(layer.dim_a, o.symmetric_factors) + factor_elements(
            layer.dim_g, o.symmetric_factors)
        return elems * dtype_bytes(o.comm_dtype)

    def inverse_bytes(self, layer: LayerModel) -> int:
        o = self.options
        if o.inverse_method == "eigen":  # eigenvector matrices are not symmetric
            elems = layer.dim_a ** 2 + layer.dim_g ** 2 + layer.dim_a + layer.dim_g
        else:
            elems = factor_elements(layer.dim_a, o.symmetric_factors) + factor_elements(
                layer.dim_g, o.symmetric_factors)
        return elems * dtype_bytes(o.comm_dtype)

    def grad_bytes(self, layer: LayerModel | None, *, workload: WorkloadModel | None = None) -> int:
        w = workload or self.workload
        params = layer.params if layer is not None else w.total_params
        return params * dtype_bytes(self.options.comm_dtype)

    # -- compute ----------------------------------------------------------------------------
    def compute_us(
        self, stage: str, layer: LayerModel | None, *, batch: int,
        workload: WorkloadModel | None = None,
    ) -> float:
        """Time in microseconds of one call of compute ``stage`` (per layer or whole model)."""
        w = workload or self.workload
        key = (stage, layer.name if layer is not None else "", batch, w.name)
        cached = self._compute_cache.get(key)
        if cached is not None:
            return cached
        t = self._roofline_us(stage, layer, batch, w)
        if self.options.use_measured:
            t *= self._measured_ratio(stage, layer, batch, w)
        t = t * self.slowdown / self.options.compute_scale
        self._compute_cache[key] = t
        return t

    def flops(self, stage: str, layer: LayerModel | None, *, batch: int,
              workload: WorkloadModel | None = None) -> float:
        return self._work(stage, layer, batch, workload or self.workload)[0]

    def bytes_moved(self, stage: str, layer: LayerModel | None, *, batch: int,
                    workload: WorkloadModel | None = None) -> float:
        return self._work(stage, layer, batch, workload or self.workload)[1]

    def _method_key(self, stage: str, method: str) -> str:
        return method if stage in (S.INVERSE, S.PRECONDITION) else ""

    def _check(self, stage: str, layer: LayerModel | None, batch: int) -> None:
        if stage not in STAGE_KINDS:
            raise ValueError(f"{stage!r} is not a compute stage; compute stages: {STAGE_KINDS}")
        if layer is None and stage not in WHOLE_MODEL_STAGES:
            raise ValueError(f"stage {stage!r} is per layer: pass a LayerModel")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")

    def _fwd_flops(self, l: LayerModel, w: WorkloadModel) -> float:
        """Forward FLOPs per example of ``l`` plus its share (by FLOPs) of the non-K-FAC work."""
        if not w.other_fwd_flops_per_example:
            return l.fwd_flops_per_example
        total = sum(x.fwd_flops_per_example for x in w.layers)
        share = l.fwd_flops_per_example / total if total > 0 else 1.0 / len(w.layers)
        return l.fwd_flops_per_example + share * w.other_fwd_flops_per_example

    def _layer_work(self, stage: str, l: LayerModel, batch: int,
                    w: WorkloadModel) -> tuple[float, float, int]:
        """(FLOPs, bytes, calls) of one layer's share of ``stage``."""
        o = self.options
        act = dtype_bytes(o.dtype)
        fb = 4  # factors, inverses and preconditioned gradients stay in fp32
        da, dg = l.dim_a, l.dim_g
        if stage == S.FORWARD:
            return (batch * self._fwd_flops(l, w),
                    act * (batch * (l.in_elems_per_example + l.out_elems_per_example) + l.params), 1)
        if stage == S.BACKWARD:
            return (2 * batch * self._fwd_flops(l, w),
                    act * 2 * (batch * (l.in_elems_per_example + l.out_elems_per_example)
                               + l.params), 1)
        if stage == S.FACTOR_COMPUTE:
            phases = self._factor_phases(l, batch)
            return sum(f for f, _ in phases), sum(b for _, b in phases), 1
        if stage == S.INVERSE:
            return (INVERSE_FLOPS_PER_D3[o.inverse_method] * (da ** 3 + dg ** 3),
                    fb * 3 * (da * da + dg * dg), 1)
        if stage == S.PRECONDITION:
            return (PRECOND_FLOPS_FACTOR[o.inverse_method] * da * dg * (da + dg),
                    fb * (da * da + dg * dg + 3 * da * dg), 1)
        return (UPDATE_FLOPS_PER_PARAM * l.params, UPDATE_BYTES_PER_PARAM * l.params, 1)

    def _factor_phases(self, l: LayerModel, batch: int) -> list[tuple[float, float]]:
        """(FLOPs, bytes) of each phase of one layer's factor statistics and running average.

        Without conv geometry: the Gram matrices of the unfolded rows, one phase.  With it, the
        optimizer's convolution algorithm (``kfacperf.kfac.conv_factors``): a positions-major
        copy of the padded input; per displacement (i, j) between kernel taps (di in [0, kh),
        dj in (-kw, kw), the mirrored half skipped) a batched product over padded positions
        (2 N C^2 per position); the window sums of every tap pair of that displacement
        ((kh - di)(kw - |dj|) windows of Ho x Wo x C^2 elements, memory-bound and independent
        of the batch); G = g g^T; the running averages.  Sequential phases add.
        """
        fb = 4
        da, dg = l.dim_a, l.dim_g
        rows = batch * l.rows_per_example
        running = (3.0 * (da * da + dg * dg), fb * 3.0 * (da * da + dg * dg))
        c = l.conv
        if c is None:
            return [(2.0 * rows * (da * da + dg * dg),
                     fb * (rows * (da + dg) + 3 * (da * da + dg * dg)))]
        ch, (kh, kw), (hp, wp), (ho, wo) = c.in_channels, c.kernel, c.padded, c.output
        pos = hp * wp
        shifts = [(di, dj) for di in range(kh) for dj in range(-(kw - 1), kw)
                  if not (di == 0 and dj < 0)]
        windows = sum((kh - di) * (kw - abs(dj)) for di, dj in shifts) * ho * wo * ch * ch
        return [
            (0.0, fb * 2.0 * batch * ch * pos),
            (2.0 * batch * ch * ch * pos * len(shifts),
             fb * len(shifts) * (2.0 * batch * ch * pos + pos * ch * ch)),
            (float(windows), fb * float(windows)),
            (2.0 * rows * dg * dg, fb * 2.0 * rows * dg),
            running,
        ]

    def _work(self, stage: str, layer: LayerModel | None, batch: int,
              w: WorkloadModel) -> tuple[float, float]:
        self._check(stage, layer, batch)
        if layer is not None:
            f, b, _ = self._layer_work(stage, layer, batch, w)
            return f, b
        f = b = 0.0
        for l in w.layers:
            lf, lb, _ = self._layer_work(stage, l, batch, w)
            f, b = f + lf, b + lb
        if stage == S.UPDATE:
            f += UPDATE_FLOPS_PER_PARAM * w.other_params
            b += UPDATE_BYTES_PER_PARAM * w.other_params
        return f, b

    def _roof(self, stage: str, flops: float, nbytes: float) -> float:
        dtype = self.options.dtype if stage in (S.FORWARD, S.BACKWARD) else (
            "fp32" if stage in (S.INVERSE, S.UPDATE) else self.options.kfac_dtype)
        return max(flops / self.device.peak_flops_per_us(dtype),
                   nbytes / self.device.mem_bytes_per_us)

    def roofline_terms(self, stage: str, layer: LayerModel | None, *, batch: int,
                       workload: WorkloadModel | None = None) -> tuple[float, int]:
        """``(sum of max(F/peak, B/bw) in us, number of calls)``: the regressors of the fit."""
        w = workload or self.workload
        self._check(stage, layer, batch)
        if layer is not None:
            if stage == S.FACTOR_COMPUTE:  # sequential phases, each on its own roofline
                return sum(self._roof(stage, f, b) for f, b in
                           self._factor_phases(layer, batch)), 1
            f, b, calls = self._layer_work(stage, layer, batch, w)
            return self._roof(stage, f, b), calls
        if stage == S.UPDATE:  # one fused optimizer call over all parameters
            f, b = self._work(stage, None, batch, w)
            return self._roof(stage, f, b), 1
        roof, calls = 0.0, 0
        for l in w.layers:  # forward/backward: the sum of the per-layer shares
            f, b, c = self._layer_work(stage, l, batch, w)
            roof, calls = roof + self._roof(stage, f, b), calls + c
        return roof, calls

    def _roofline_us(self, stage: str, layer: LayerModel | None, batch: int,
                     w: WorkloadModel) -> float:
        roof, calls = self.roofline_terms(stage, layer, batch=batch, workload=w)
        eff = self.device.stage(stage)
        return eff.overhead_us * calls + roof / eff.efficiency

    def _measured_ratio(self, stage: str, layer: LayerModel | None, batch: int,
                        w: WorkloadModel) -> float:
        """measured / roofline at the nearest measured batch, or 1 without a measurement."""
        method = self._method_key(stage, self.options.inverse_method)
        name = layer.name if layer is not None else ""
        entries = self._measured.get((w.name, stage, name, method))
        target_layer = layer
        if entries is None and layer is not None and stage in WHOLE_MODEL_STAGES:
            entries = self._measured.get((w.name, stage, "", method))  # whole-model share
            target_layer = None
        if not entries:
            return 1.0
        b_m, t_m = min(entries, key=lambda e: (abs(math.log(e[0] / batch)), -e[0]))
        same = [t for b, t in entries if b == b_m]
        t_m = sum(same) / len(same)
        model = self._roofline_us(stage, target_layer, b_m, w)
        return t_m / model if model > 0 else 1.0
