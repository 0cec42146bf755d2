"""Per-layer stage times for the step graphs, asked once from a cost model.

The step graphs need each layer's share of forward and backward (backward is interleaved
with communication layer by layer) and each layer's factor, inverse and precondition time.
A cost model (:class:`kfacperf.sim.costs.interface.StepCosts`) answers
``compute_us(stage, layer | None, batch=..., workload=...)``; the whole-model forward and
backward (``layer=None``) include work outside the K-FAC layers, so the per-layer shares are
rescaled to add up to exactly the whole-model time.

The layers are the workload's Fisher blocks under the cost model's ``bn_blocks``
(:meth:`~kfacperf.sim.models.workload.WorkloadModel.fisher_layers`: with "unit" or "full" the
BatchNorm layers too, in forward order, and their parameters are no longer "other"
parameters); the cost model's ``fisher`` says whether factor steps run the Monte-Carlo
backward.
"""
from __future__ import annotations

from collections.abc import Sequence

from kfacperf import vocab as S
from kfacperf.sim.costs.blocks import block_form
from kfacperf.sim.costs.interface import StepCosts
from kfacperf.sim.graphs.strategies.common import LayerCosts
from kfacperf.sim.models.workload import LayerModel, WorkloadModel


def _shares(parts: Sequence[float], whole: float) -> list[float]:
    total = sum(parts)
    if total > 0:
        return [whole * p / total for p in parts]
    return [whole / len(parts)] * len(parts)


def _check(stage: str, value: float) -> float:
    if not value >= 0 or value != value or value == float("inf"):
        raise ValueError(f"cost model gave {value!r} us for stage {stage!r}")
    return float(value)


def layer_costs(cost: StepCosts, workload: WorkloadModel, *, batch: int) -> LayerCosts:
    """Stage times (us) and shapes of ``workload``'s K-FAC layers at ``batch`` per GPU."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch per GPU must be a positive integer, got {batch!r}")
    bn_blocks = cost.bn_blocks
    if bn_blocks == S.BN_NONE:
        layers, other_params = workload.layers, workload.other_params
    else:
        layers = workload.fisher_layers(bn_blocks)
        other_params = workload.other_params_with(bn_blocks)

    def per_layer(stage: str) -> list[float]:
        return [_check(stage, cost.compute_us(stage, l, batch=batch, workload=workload))
                for l in layers]

    def whole(stage: str) -> float:
        return _check(stage, cost.compute_us(stage, None, batch=batch, workload=workload))

    def flops_of(stage: str, layer: LayerModel | None) -> float:
        return float(cost.flops(stage, layer, batch=batch, workload=workload))

    fwd_capture = _check("forward capture", cost.capture_scale(S.FORWARD))
    bwd_capture = _check("backward capture", cost.capture_scale(S.BACKWARD))
    grad_load = _check("load_grad", len(layers) * cost.layer_host_us("load_grad"))
    grad_write = _check("write_grad", len(layers) * cost.layer_host_us("write_grad"))
    fwd = _shares(per_layer(S.FORWARD), whole(S.FORWARD))
    bwd = _shares(per_layer(S.BACKWARD), whole(S.BACKWARD))
    fwd_flops = _shares([flops_of(S.FORWARD, l) for l in layers], flops_of(S.FORWARD, None))
    bwd_flops = _shares([flops_of(S.BACKWARD, l) for l in layers], flops_of(S.BACKWARD, None))
    return LayerCosts(
        names=tuple(l.name for l in layers),
        fwd=tuple(fwd), bwd=tuple(bwd),
        factor=tuple(per_layer(S.FACTOR_COMPUTE)),
        inverse=tuple(per_layer(S.INVERSE)),
        precond=tuple(per_layer(S.PRECONDITION)),
        update=whole(S.UPDATE),
        fwd_flops=tuple(fwd_flops), bwd_flops=tuple(bwd_flops),
        factor_flops=tuple(flops_of(S.FACTOR_COMPUTE, l) for l in layers),
        inverse_flops=tuple(flops_of(S.INVERSE, l) for l in layers),
        precond_flops=tuple(flops_of(S.PRECONDITION, l) for l in layers),
        dim_a=tuple(l.dim_a for l in layers), dim_g=tuple(l.dim_g for l in layers),
        other_params=int(other_params),
        fwd_capture=fwd_capture, bwd_capture=bwd_capture,
        grad_load=grad_load, grad_write=grad_write,
        forms=tuple(block_form(l.kind, bn_blocks) for l in layers)
        if bn_blocks != S.BN_NONE else (),
        mc_fisher=cost.fisher == S.FISHER_MC,
    )
