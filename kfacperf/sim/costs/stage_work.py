"""Analytic work of each compute stage: FLOPs and bytes, as a list of sequential phases.

A :class:`Phase` is a piece of work that runs on one roofline: ``flops`` at the peak of
``dtype`` and ``nbytes`` of memory traffic.  :func:`stage_phases` returns the phases of one
call of a stage on one layer, or of the whole model (``layer=None``; forward, backward and
update only), with the number of calls (kernel launches) it stands for.  The cost model turns
phases into time with a device's rates and efficiencies (:mod:`kfacperf.sim.costs.model`).

Batch ``N``, rows per example ``r``, factor sides ``dA``, ``dG``, forward FLOPs ``f`` per
example (with the layer's FLOP share of the work outside K-FAC layers):

=================  ===========================================  ===============================
stage              FLOPs                                        bytes
=================  ===========================================  ===============================
forward            N f                                          s (N (in + out) + params)
backward           2 N f (input and weight gradients)           2 s (N (in + out) + params)
factor_compute     2 N r (dA^2 + dG^2), or for a convolution    4 (N r (dA + dG) + 3 (dA^2+dG^2))
                   with geometry the phases of
                   ``kfacperf.kfac.conv_factors`` (below)
inverse            eigen 9 (dA^3 + dG^3); cholesky dA^3 + dG^3  12 (dA^2 + dG^2)
precondition       eigen 4 dA dG (dA + dG); cholesky half that  4 (dA^2 + dG^2 + 3 dA dG)
update             4 per parameter (momentum SGD)               20 per parameter
=================  ===========================================  ===============================

A BatchNorm Fisher block (``bn_blocks`` "unit" or "full", C channels, S = ``rows_per_example``
spatial positions, block side ``n`` = 2 per channel or 2C) has no forward or backward share
of its own (its elementwise work stays in the whole-model passes, as without blocks) and:

=================  ===========================================  ===============================
stage              FLOPs                                        bytes
=================  ===========================================  ===============================
factor_compute     6 N C S (normalise; reduce over H x W), then  4 (2 N C S + 2 N C), then
                   the outer products over N: unit 8 N C, full  4 (2 N C + numel F), then the
                   2 N (2C)^2, then the running average         running average
                   3 numel F (numel F: 4C unit, (2C)^2 full)
inverse            unit: 10 C in one batched call (latency-     unit: 4 (2 x 4C);
                   bound); full: like a factor of side 2C       full: 12 (2C)^2
precondition       unit 8 C; full: eigen 4 (2C)^2, cholesky     4 (numel F + 4C)
                   2 (2C)^2
=================  ===========================================  ===============================

Inverse phases carry the matrix side ``n`` and the number of matrices ``count`` they invert
(a unit-wise layer: C 2x2 matrices in one call; a Kronecker-factored layer: one phase for A,
one for G), so a size-dependent inverse cost can apply: GPU factorisations walk a matrix panel
by panel, a few dependent kernel launches per panel, so part of their time grows with ``n``
however fast the arithmetic (the device's ``row_us``, once per phase: a batched call walks its
matrices together).

``s`` is the activation dtype's size.  The constants 9 (symmetric eigendecomposition with
vectors, Golub & Van Loan) and 1 (Cholesky plus inverse) only set the eigen/cholesky ratio; a
fitted efficiency absorbs the rest.  The convolution's A factor (displacement Grams of the
padded input, no unfold) has phases: a positions-major copy of the padded input; per kernel-tap
displacement (di in [0, kh), dj in (-kw, kw), the mirrored half skipped) a batched product over
the padded positions (2 N C^2 FLOPs each); the window sums of the tap pairs of each
displacement ((kh - di)(kw - |dj|) windows of Ho x Wo x C^2 elements: memory traffic that does
not grow with the batch); then G = g g^T and the running averages.
"""
from __future__ import annotations

from dataclasses import dataclass

from kfacperf import vocab as S
from kfacperf.sim.models.workload import BATCHNORM, LayerModel, WorkloadModel

DTYPE_BYTES: dict[str, int] = S.DTYPE_BYTES
WHOLE_MODEL_STAGES = (S.FORWARD, S.BACKWARD, S.UPDATE)
INVERSE_FLOPS_PER_D3 = {"eigen": 9.0, "cholesky": 1.0}
PRECOND_FLOPS_FACTOR = {"eigen": 4.0, "cholesky": 2.0}
UPDATE_FLOPS_PER_PARAM = 4.0
UPDATE_BYTES_PER_PARAM = 20.0  # read param, grad, momentum; write param, momentum (fp32)
FP32 = 4


@dataclass(frozen=True)
class Phase:
    """Work that runs on one roofline: FLOPs at the peak of ``dtype``, bytes of traffic.

    An inverse phase may say what it inverts: ``count`` symmetric matrices of side ``n``
    (0: not stated).
    """

    flops: float
    nbytes: float
    dtype: str = "fp32"
    n: int = 0
    count: int = 1


def fwd_flops(l: LayerModel, w: WorkloadModel) -> float:
    """Forward FLOPs per example of ``l`` plus its FLOP share of the non-K-FAC work."""
    if not w.other_fwd_flops_per_example:
        return l.fwd_flops_per_example
    total = sum(x.fwd_flops_per_example for x in w.layers)
    share = l.fwd_flops_per_example / total if total > 0 else 1.0 / len(w.layers)
    return l.fwd_flops_per_example + share * w.other_fwd_flops_per_example


def factor_phases(l: LayerModel, batch: int, dtype: str = "fp32",
                  conv_factors: str = "displacement") -> list[Phase]:
    """Phases of one layer's factor statistics and running averages (see the module doc)."""
    S.check_choice("conv_factors", conv_factors, S.CONV_FACTORS)
    da, dg = l.dim_a, l.dim_g
    rows = batch * l.rows_per_example
    running = Phase(3.0 * (da * da + dg * dg), FP32 * 3.0 * (da * da + dg * dg), dtype)
    c = l.conv
    if c is not None and conv_factors == "im2col":
        size = DTYPE_BYTES[dtype]
        return [Phase(0.0, 2.0 * size * rows * da, dtype),
                Phase(2.0 * rows * (da * da + dg * dg),
                      size * rows * (da + dg) + FP32 * (da * da + dg * dg), dtype),
                running]
    if c is None:
        return [Phase(2.0 * rows * (da * da + dg * dg),
                      FP32 * (rows * (da + dg) + 3 * (da * da + dg * dg)), dtype)]
    ch, (kh, kw), (hp, wp), (ho, wo) = c.in_channels, c.kernel, c.padded, c.output
    pos = hp * wp
    shifts = [(di, dj) for di in range(kh) for dj in range(-(kw - 1), kw)
              if not (di == 0 and dj < 0)]
    windows = float(sum((kh - di) * (kw - abs(dj)) for di, dj in shifts) * ho * wo * ch * ch)
    return [
        Phase(0.0, FP32 * 2.0 * batch * ch * pos, dtype),
        Phase(2.0 * batch * ch * ch * pos * len(shifts),
              FP32 * len(shifts) * (2.0 * batch * ch * pos + pos * ch * ch), dtype),
        Phase(windows, FP32 * windows, dtype),
        Phase(2.0 * rows * dg * dg, FP32 * 2.0 * rows * dg, dtype),
        running,
    ]


def batchnorm_phases(stage: str, l: LayerModel, *, batch: int, bn_blocks: str,
                     kfac_dtype: str, inverse_method: str) -> list[Phase]:
    """Phases of one call of ``stage`` on a BatchNorm Fisher block (see the module doc)."""
    if bn_blocks not in (S.BN_UNIT, S.BN_FULL):
        raise ValueError(f"batchnorm layer {l.name!r} is a Fisher block only with bn_blocks "
                         f"'unit' or 'full', got {bn_blocks!r}")
    c, unit = l.channels, bn_blocks == S.BN_UNIT
    n = 2 if unit else 2 * c
    numel = 4.0 * c if unit else float(n * n)
    if stage in (S.FORWARD, S.BACKWARD):
        return []
    if stage == S.FACTOR_COMPUTE:
        elems = float(batch) * c * l.rows_per_example
        outer = 8.0 * batch * c if unit else 2.0 * batch * n * n
        return [Phase(6.0 * elems, FP32 * (2.0 * elems + 2.0 * batch * c), kfac_dtype),
                Phase(outer, FP32 * (2.0 * batch * c + numel), kfac_dtype),
                Phase(3.0 * numel, FP32 * 3.0 * numel, kfac_dtype)]
    if stage == S.INVERSE:
        if unit:
            return [Phase(10.0 * c, FP32 * 2.0 * numel, "fp32", n=2, count=c)]
        return [Phase(INVERSE_FLOPS_PER_D3[inverse_method] * n ** 3, FP32 * 3.0 * numel, "fp32",
                      n=n)]
    if stage == S.PRECONDITION:
        flops = 8.0 * c if unit else PRECOND_FLOPS_FACTOR[inverse_method] * n * n
        return [Phase(flops, FP32 * (numel + 4.0 * c), kfac_dtype)]
    if stage == S.UPDATE:
        return [Phase(UPDATE_FLOPS_PER_PARAM * l.params, UPDATE_BYTES_PER_PARAM * l.params)]
    raise ValueError(f"{stage!r} is not a compute stage")


def layer_phases(
    stage: str, l: LayerModel, *, batch: int, workload: WorkloadModel, act_dtype: str,
    kfac_dtype: str, inverse_method: str, conv_factors: str = "displacement",
    bn_blocks: str = S.BN_NONE,
) -> list[Phase]:
    """Phases of one call of ``stage`` on layer ``l`` (its share, for whole-model stages)."""
    if l.kind == BATCHNORM:
        return batchnorm_phases(stage, l, batch=batch, bn_blocks=bn_blocks,
                                kfac_dtype=kfac_dtype, inverse_method=inverse_method)
    da, dg = l.dim_a, l.dim_g
    if stage in (S.FORWARD, S.BACKWARD):
        k = 1 if stage == S.FORWARD else 2
        traffic = batch * (l.in_elems_per_example + l.out_elems_per_example) + l.params
        return [Phase(k * batch * fwd_flops(l, workload),
                      k * DTYPE_BYTES[act_dtype] * traffic, act_dtype)]
    if stage == S.FACTOR_COMPUTE:
        return factor_phases(l, batch, kfac_dtype, conv_factors)
    if stage == S.INVERSE:  # eigensolvers and Cholesky run in fp32
        per_d3 = INVERSE_FLOPS_PER_D3[inverse_method]
        return [Phase(per_d3 * d ** 3, FP32 * 3 * d * d, "fp32", n=d) for d in (da, dg)]
    if stage == S.PRECONDITION:
        return [Phase(PRECOND_FLOPS_FACTOR[inverse_method] * da * dg * (da + dg),
                      FP32 * (da * da + dg * dg + 3 * da * dg), kfac_dtype)]
    if stage == S.UPDATE:
        return [Phase(UPDATE_FLOPS_PER_PARAM * l.params, UPDATE_BYTES_PER_PARAM * l.params)]
    raise ValueError(f"{stage!r} is not a compute stage")


def stage_phases(
    stage: str, layer: LayerModel | None, *, batch: int, workload: WorkloadModel,
    act_dtype: str = "fp32", kfac_dtype: str = "fp32", inverse_method: str = "eigen",
    conv_factors: str = "displacement", bn_blocks: str = S.BN_NONE,
) -> tuple[list[Phase], int]:
    """``(phases, calls)`` of ``stage`` on ``layer``, or on the whole model (``None``).

    Whole-model forward and backward are the per-layer shares of the K-FAC layers, one call
    per layer (so they add up exactly; BatchNorm blocks have no share); the whole-model update
    is one fused call over every parameter.
    """
    def phases_of(l: LayerModel, bn: str = S.BN_NONE) -> list[Phase]:
        return layer_phases(stage, l, batch=batch, workload=workload, act_dtype=act_dtype,
                            kfac_dtype=kfac_dtype, inverse_method=inverse_method,
                            conv_factors=conv_factors, bn_blocks=bn)

    if layer is not None:
        own = phases_of(layer, bn_blocks)
        return own, 1 if own else 0
    if stage == S.UPDATE:
        params = workload.total_params
        return [Phase(UPDATE_FLOPS_PER_PARAM * params, UPDATE_BYTES_PER_PARAM * params)], 1
    phases: list[Phase] = []
    for l in workload.layers:
        phases.extend(phases_of(l))
    return phases, len(workload.layers)
