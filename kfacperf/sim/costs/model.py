"""The cost model: how long each compute stage and each collective takes.

This is the one interface between the models and the step graphs/engine::

    cost = CostModel(workload=w, device=d, cluster=c, *, dtype="fp32", kfac_dtype="fp32",
                     inverse_method="eigen", comm_dtype="fp32", symmetric_factors=False,
                     v_form=None, bandwidth_scale=1.0, alpha_scale=1.0, compute_scale=1.0,
                     ranks_per_node=1, threads_per_rank=1, use_measured=True,
                     bn_blocks="none", fisher="emp")
    cost.compute_us(stage, layer: LayerModel | None, *, batch: int, workload=None) -> float
    cost.collective_us(op, nbytes, *, group_size: int, nodes: int) -> float  # x comm_slowdown
    cost.host -> HostDelays                 # the cluster's host model (straggle of a group, ...)
    cost.for_gpus(gpus) -> CostModel        # ranks_per_node = min(gpus, gpus_per_node)
    cost.with_overrides(**options) -> CostModel
    cost.options -> CostOptions (frozen, hashable; also readable as cost.<option>)
    cost.layer_host_us(step) -> float      # per K-FAC layer, between stages (load/write_grad)
    cost.flops(stage, layer, *, batch, workload=None) -> float
    cost.bytes_moved(stage, layer, *, batch, workload=None) -> float
    cost.regressors(stage, layer, *, batch, workload=None) -> Regressors  # for calibration
    cost.nodes_spanned(group_size) -> int
    cost.has_measured(workload=None) -> bool   # [[measured]] times of this workload apply
    # payload helpers (comm_dtype and symmetric packing applied):
    cost.factor_bytes(layer) -> int          # A and G of one layer (or its BatchNorm block)
    cost.inverse_bytes(layer) -> int         # eigenbases + eigenvalues, or the two inverses
    cost.grad_bytes(layer | None, *, workload=None) -> int   # None: all parameters
    dtype_bytes(dtype) -> int;  factor_elements(d, symmetric) -> int

``stage`` is a compute stage of :mod:`kfacperf.vocab`.  With ``layer=None``, ``forward``,
``backward`` and ``update`` cost the whole model; with a layer they cost that layer's share, so
the engine can interleave per-layer backward with communication.  For forward and backward the
whole model is exactly the sum of the per-layer shares (each layer carries a FLOP-proportional
share of the non-K-FAC work, ``other_fwd_flops_per_example``); ``update`` of the whole model is
one fused call over all parameters (K-FAC layers and ``other_params``).  ``factor_compute``,
``inverse`` and ``precondition`` need a layer.  Backward is the backward pass alone: the factor
statistics computed in backward hooks are ``factor_compute`` (calibration subtracts them from
the measured backward, where they are nested).

``bn_blocks`` (``none``, ``unit``, ``full``) says whether the workload's BatchNorm layers are
Fisher blocks (:meth:`WorkloadModel.fisher_layers`) and of which form; ``fisher`` (``emp``,
``mc``) whether factor steps run the Monte-Carlo backward (the step graphs read both).  A
BatchNorm block's stage times always come from its analytic work: ``[[measured]]`` times are
keyed by layer and inverse method, not by block form, so they are not applied to it.

Compute time of one call: the stage's phases (FLOPs and bytes, :mod:`kfacperf.sim.costs.stage_work`)
on the device's rates and efficiencies (:mod:`kfacperf.sim.models.device`), plus the per-call
overhead, times the compute slowdown of ranks sharing a node's cores (the cluster's host model,
:mod:`kfacperf.sim.models.host`; 1 on dedicated devices), over ``compute_scale``.
When the device model holds a time measured on this workload (``[[measured]]`` entries of
the same workload model: its name, options included, and its fingerprint,
:func:`~kfacperf.sim.models.device.workload_key`; a user's model of the same file and function
name but another file or another version is another model), the model is scaled to
reproduce it: ``time(N) = model(N) * measured(N_m) / model(N_m)`` for the nearest measured
batch ``N_m`` (exact when ``N = N_m``); per-layer forward/backward shares are scaled by the
whole-model measurement.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from kfacperf import vocab as S
from kfacperf.sim.costs import blocks
from kfacperf.sim.costs.collectives import group_collective_us
from kfacperf.sim.costs.stage_work import (
    DTYPE_BYTES,
    WHOLE_MODEL_STAGES,
    Phase,
    stage_phases,
)
from kfacperf.sim.models.cluster import V_FORMS, ClusterModel
from kfacperf.sim.models.device import (
    DTYPES,
    INVERSE_METHODS,
    STAGE_KINDS,
    DeviceModel,
    workload_key,
)
from kfacperf.sim.models.host import HostDelays
from kfacperf.sim.models.workload import BATCHNORM, LayerModel, WorkloadModel

STATISTICS_STAGES = (S.FACTOR_COMPUTE, S.INVERSE)
"""Stages a factor step does only for the layers whose statistics it refreshes."""


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES[S.check_choice("dtype", dtype, tuple(DTYPE_BYTES))]


def factor_elements(d: int, symmetric: bool = False) -> int:
    """Elements of a d x d factor, d(d+1)/2 with upper-triangle packing."""
    return blocks.triangle(d, symmetric)


@dataclass(frozen=True, kw_only=True)
class Regressors:
    """A call's terms at efficiency 1: ``time = overhead * calls + ...`` (see DeviceModel)."""

    calls: int
    compute_us: float  # sum over phases of FLOPs / peak
    memory_us: float  # sum over phases of bytes / memory bandwidth
    roofline_us: float  # sum over phases of max(compute, memory)
    rows: int = 0  # rows of the matrices factorised (the device's row_us applies per row)


@dataclass(frozen=True, kw_only=True)
class CostOptions:
    """Knobs and what-if overrides of a :class:`CostModel`."""

    dtype: str = "fp32"
    kfac_dtype: str = "fp32"
    inverse_method: str = "eigen"
    comm_dtype: str = "fp32"
    precond_dtype: str = "fp32"
    symmetric_factors: bool = False
    statistics_fraction: float = 1.0
    placement: str = "balanced"  # checked by the step graphs' CommSettings
    conv_factors: str = "displacement"
    v_form: str | None = None
    bandwidth_scale: float = 1.0
    alpha_scale: float = 1.0
    compute_scale: float = 1.0
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    use_measured: bool = True
    bn_blocks: str = S.BN_NONE
    fisher: str = S.FISHER_EMP

    def __post_init__(self) -> None:
        S.check_choice("bn_blocks", self.bn_blocks, S.BN_BLOCKS)
        S.check_choice("fisher", self.fisher, S.FISHER_TYPES)
        for key in ("dtype", "kfac_dtype"):
            S.check_choice(key, getattr(self, key), DTYPES)
        S.check_choice("inverse_method", self.inverse_method, INVERSE_METHODS)
        S.check_choice("comm_dtype", self.comm_dtype, S.COMM_DTYPES)
        S.check_choice("precond_dtype", self.precond_dtype, S.COMM_DTYPES)
        S.check_choice("conv_factors", self.conv_factors, S.CONV_FACTORS)
        S.check_choice("placement", self.placement, S.PLACEMENTS)
        f = self.statistics_fraction
        if isinstance(f, bool) or not (isinstance(f, (int, float)) and 0 < f <= 1):
            raise ValueError(f"statistics_fraction must be in (0, 1], got {f!r}")
        if self.v_form not in (None, *V_FORMS):
            raise ValueError(f"v_form must be one of {V_FORMS} (or None: the cluster's), "
                             f"got {self.v_form!r}")
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
        # what ranks sharing a node's host add (nothing on dedicated devices)
        self.host: HostDelays = cluster.host_delays
        self.slowdown = self.host.compute_factor(None, ranks_on_node=o.ranks_per_node,
                                                 threads_per_rank=o.threads_per_rank)
        self.comm_slowdown = self.host.comm_factor(o.ranks_per_node)
        # each stage kind slows by its own contention (the host's single one by default)
        self.stage_slowdown: dict[str, float] = {
            k: self.host.compute_factor(k, ranks_on_node=o.ranks_per_node,
                                        threads_per_rank=o.threads_per_rank)
            for k in STAGE_KINDS}
        # (stage, layer name, batch, workload name and fingerprint)
        self._compute_cache: dict[tuple[str, str, int, tuple[str, str]], float] = {}
        # (op, size or per-rank block sizes, group size, nodes)
        self._comm_cache: dict[tuple[str, float | Sequence[float], int, int], float] = {}
        # ((workload name, fingerprint), stage, layer, inverse method) -> [(batch, time_us)]
        self._measured: dict[tuple[tuple[str, str], str, str, str], list[tuple[int, float]]] = {}
        for m in device.measured:
            key = (m.model_key, m.stage, m.layer, self._method_key(m.stage, m.inverse_method))
            self._measured.setdefault(key, []).append((m.batch, m.time_us))

    def __getattr__(self, name: str) -> Any:  # cost.inverse_method, cost.comm_dtype, ...
        if name in _OPTION_NAMES:
            return getattr(self.options, name)
        raise AttributeError(name)

    def with_overrides(self, **options: Any) -> CostModel:
        merged = {f: getattr(self.options, f) for f in _OPTION_NAMES}
        merged.update(options)
        return CostModel(workload=self.workload, device=self.device, cluster=self.base_cluster,
                         **merged)

    def for_gpus(self, gpus: int) -> CostModel:
        """This model with the compute contention of ``gpus`` ranks filling nodes in order."""
        ranks = max(1, min(gpus, self.base_cluster.gpus_per_node))
        return self if ranks == self.options.ranks_per_node else self.with_overrides(
            ranks_per_node=ranks)

    def nodes_spanned(self, group_size: int) -> int:
        return self.cluster.nodes_spanned(group_size)

    def capture_scale(self, stage: str) -> float:
        """Forward/backward on a factor step take this times their plain-step time."""
        return self.device.capture_scale(stage)

    def layer_host_us(self, step: str) -> float:
        """Host time per K-FAC layer of the optimizer's ``step`` between stages
        (:data:`~kfacperf.sim.models.device.HOST_STEPS`), slowed like compute by ranks that
        share cores."""
        return self.device.host_us(step) * self.slowdown / self.options.compute_scale

    # -- communication ----------------------------------------------------------------------
    def collective_us(
        self, op: str, nbytes: float | Sequence[float], *, group_size: int, nodes: int
    ) -> float:
        """Time of collective ``op`` (see :mod:`kfacperf.sim.costs.collectives` for ``nbytes``)."""
        # a number for a *_v op is left to group_collective_us to reject (a ValueError)
        size_key = (nbytes if not op.endswith("_v")
                    or isinstance(nbytes, (int, float, numbers.Number, str)) else tuple(nbytes))
        key = (op, size_key, group_size, nodes)
        try:
            return self._comm_cache[key]
        except (KeyError, TypeError):
            pass
        t = group_collective_us(self.cluster, op, nbytes, group_size=group_size, nodes=nodes,
                                v_form=self.options.v_form) * self.comm_slowdown
        try:
            self._comm_cache[key] = t
        except TypeError:
            pass
        return t

    def block_form(self, layer: LayerModel) -> str:
        """``kronecker``, or a BatchNorm layer's ``unit``/``full`` (:mod:`blocks`)."""
        return blocks.block_form(layer.kind, self.options.bn_blocks)

    def factor_bytes(self, layer: LayerModel) -> int:
        o = self.options
        elems = blocks.statistic_elements(self.block_form(layer), layer.dim_a, layer.dim_g,
                                          o.symmetric_factors)
        return elems * dtype_bytes(o.comm_dtype)

    def inverse_bytes(self, layer: LayerModel) -> int:
        o = self.options
        elems = blocks.inverse_elements(self.block_form(layer), layer.dim_a, layer.dim_g,
                                        o.inverse_method, o.symmetric_factors)
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
        key = (stage, layer.name if layer is not None else "", batch, workload_key(w))
        cached = self._compute_cache.get(key)
        if cached is not None:
            return cached
        t = self._model_us(stage, layer, batch, w)
        if self.options.use_measured and (layer is None or layer.kind != BATCHNORM):
            t *= self._measured_ratio(stage, layer, batch, w)
        t = t * self.stage_slowdown[stage] / self.options.compute_scale
        if stage in STATISTICS_STAGES:  # stale statistics: only some layers are refreshed
            t *= self.options.statistics_fraction
        self._compute_cache[key] = t
        return t

    def flops(self, stage: str, layer: LayerModel | None, *, batch: int,
              workload: WorkloadModel | None = None) -> float:
        return sum(p.flops for p in self._phases(stage, layer, batch, workload)[0])

    def bytes_moved(self, stage: str, layer: LayerModel | None, *, batch: int,
                    workload: WorkloadModel | None = None) -> float:
        return sum(p.nbytes for p in self._phases(stage, layer, batch, workload)[0])

    def regressors(self, stage: str, layer: LayerModel | None, *, batch: int,
                   workload: WorkloadModel | None = None) -> Regressors:
        """The terms a call's time is linear in, at efficiency 1 (what calibration fits)."""
        phases, calls = self._phases(stage, layer, batch, workload)
        compute = [p.flops / self.device.peak_flops_per_us(p.dtype) for p in phases]
        memory = [p.nbytes / self.device.mem_bytes_per_us for p in phases]
        return Regressors(calls=calls, compute_us=sum(compute), memory_us=sum(memory),
                          roofline_us=sum(max(c, m) for c, m in zip(compute, memory)),
                          rows=sum(p.n for p in phases))

    def has_measured(self, workload: WorkloadModel | None = None) -> bool:
        """Whether ``[[measured]]`` times of ``workload`` (this model's by default) price its
        stages: entries of the same workload model, with ``use_measured`` on."""
        wkey = workload_key(workload or self.workload)
        return self.options.use_measured and any(k[0] == wkey for k in self._measured)

    def _method_key(self, stage: str, method: str) -> str:
        return method if stage in (S.INVERSE, S.PRECONDITION) else ""

    def _phases(self, stage: str, layer: LayerModel | None, batch: int,
                workload: WorkloadModel | None) -> tuple[list[Phase], int]:
        if stage not in STAGE_KINDS:
            raise ValueError(f"{stage!r} is not a compute stage; compute stages: {STAGE_KINDS}")
        if layer is None and stage not in WHOLE_MODEL_STAGES:
            raise ValueError(f"stage {stage!r} is per layer: pass a LayerModel")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        o = self.options
        return stage_phases(stage, layer, batch=batch, workload=workload or self.workload,
                            act_dtype=o.dtype, kfac_dtype=o.kfac_dtype,
                            inverse_method=o.inverse_method, conv_factors=o.conv_factors,
                            bn_blocks=o.bn_blocks)

    def _model_us(self, stage: str, layer: LayerModel | None, batch: int,
                  w: WorkloadModel) -> float:
        phases, calls = self._phases(stage, layer, batch, w)
        eff = self.device.stage(stage, self.options.inverse_method)
        peak_c = [p.flops / (self.device.peak_flops_per_us(p.dtype) * eff.efficiency)
                  for p in phases]
        peak_m = [p.nbytes / (self.device.mem_bytes_per_us * eff.mem_efficiency) for p in phases]
        if self.device.mode == "roofline":
            body = sum(max(c, m) for c, m in zip(peak_c, peak_m))
        else:
            body = sum(peak_c) + sum(peak_m)
        return eff.overhead_us * calls + eff.row_us * sum(p.n for p in phases) + body

    def _measured_ratio(self, stage: str, layer: LayerModel | None, batch: int,
                        w: WorkloadModel) -> float:
        """measured / roofline at the nearest measured batch, or 1 without a measurement."""
        method = self._method_key(stage, self.options.inverse_method)
        name = layer.name if layer is not None else ""
        wkey = workload_key(w)
        entries = self._measured.get((wkey, stage, name, method))
        target_layer = layer
        if entries is None and layer is not None and stage in WHOLE_MODEL_STAGES:
            entries = self._measured.get((wkey, stage, "", method))  # whole-model share
            target_layer = None
        if not entries:
            return 1.0
        b_m, t_m = min(entries, key=lambda e: (abs(math.log(e[0] / batch)), -e[0]))
        same = [t for b, t in entries if b == b_m]
        t_m = sum(same) / len(same)
        model = self._model_us(stage, target_layer, b_m, w)
        return t_m / model if model > 0 else 1.0
