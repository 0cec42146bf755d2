"""Timings of the K-FAC factor computation of network layers: the optimizer's own
:meth:`~kfacperf.kfac.layers.KFACLayer.compute_batch_factors` (the batch statistics
``A = a^T a / R`` and ``G``), with the activation and output-gradient shapes each layer sees
in the network, at several batch sizes and in each precision of
:mod:`kfacperf.runtime.precision`."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kfacperf import vocab as S
from kfacperf.bench.kernels.plan import FULL_PLAN, Budget, KernelPlan
from kfacperf.bench.kernels.records import FactorTiming, Skipped, note_skipped
from kfacperf.bench.kernels.timing import CallTimer, measure


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

    The precision sets what :mod:`kfacperf.runtime.precision` sets in a profiled run:
    ``fp32`` and ``tf32`` activations are float32 (TF32 off / on), ``bf16`` activations are
    bfloat16 (as autocast leaves them; the layer computes its factors in float32 after a
    cast).
    """
    import torch

    budget = budget or Budget()
    batches, precisions = tuple(batches), tuple(precisions)
    out: list[FactorTiming] = []
    gen = torch.Generator(device=device).manual_seed(seed)
    for shape in shapes:
        shape.module.to(device)  # in place: the network's own module
        layer = kfac_layer(shape)
        for batch in batches:
            for prec in precisions:
                if budget.left() <= 0:
                    note_skipped(skipped, "factors", f"{shape.name} batch {batch} {prec}",
                                 "time budget spent")
                    continue
                out.append(_time_layer(shape, layer, batch=batch, precision=prec,
                                       device=device, timer=timer, plan=plan, gen=gen))
        layer.a_batch = layer.g_batch = None
        shape.module.to("cpu")
    return out


def _time_layer(shape: LayerShape, layer: Any, *, batch: int, precision: str, device: Any,
                timer: CallTimer, plan: KernelPlan, gen: Any) -> FactorTiming:
    """One record of :func:`time_factors`: Gaussian activations and output gradients of the
    layer's shapes at ``batch``, in the activation dtype of ``precision``."""
    import torch

    from kfacperf.runtime import precision as P

    act = torch.bfloat16 if precision == S.BF16 else torch.float32
    x = torch.randn((batch, *shape.input_shape[1:]), generator=gen, device=device,
                    dtype=torch.float32).to(act)
    g = torch.randn((batch, *shape.output_shape[1:]), generator=gen, device=device,
                    dtype=torch.float32).div_(batch).to(act)

    def call() -> None:
        layer.compute_batch_factors(x, g)

    with P.float32_math(precision):
        t = measure(call, timer=timer, warmup=plan.warmup, repeats=plan.repeats,
                    min_repeats=plan.min_repeats, target_s=plan.target_s)
    m = shape.module
    return FactorTiming(
        layer=shape.name, kind=layer.kind, kernel_size=tuple(getattr(m, "kernel_size", ())),
        stride=tuple(getattr(m, "stride", ())), batch=batch, precision=precision,
        activation_dtype=str(act).removeprefix("torch."),
        input_shape=tuple(x.shape), output_shape=tuple(g.shape),
        dim_a=layer.dim_a, dim_g=layer.dim_g, rows=layer.rows,
        flops=float(layer.factor_flops(x, g)), timing=t)
