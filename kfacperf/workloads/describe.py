"""Per-layer shapes and FLOPs of a model's K-FAC layers, from one forward pass on the meta device.

This is what the simulator's workload model (``models/workloads/<name>.toml``) is built from.
A *K-FAC layer* is every ``nn.Linear`` and every ``nn.Conv2d`` with ``groups == 1``, the
layers the optimizer preconditions; everything else (BatchNorm, LayerNorm, embeddings,
grouped convolutions) counts as ``other_params``.

The forward pass runs on the **meta device**: parameters, buffers and the example are
replaced by meta tensors (shapes and dtypes, no storage) through
:func:`torch.func.functional_call`, and tensors the forward creates go there too.  A model
that does not fit in this machine's memory is therefore described without allocating it
(build it under ``with torch.device("meta")``, as :func:`describe_workload` does).  A
forward that cannot run on meta tensors (one that reads a value, e.g. ``.item()``) is run
for real instead, when the model has real parameters.

Per layer (``name`` is the module path, or :data:`~kfacperf.kfac.preconditioner.ROOT_LAYER`
for a model that is itself one layer, as the preconditioner and the trace name it; layers
listed in the order the forward pass calls them).  What K-FAC cannot train is an error
(:class:`DescribeError`), as the optimizer would refuse it: a module called more than once
(its factors would come from one call, its gradient from every call), a K-FAC layer the
forward pass never calls, two K-FAC layers sharing a parameter (tied weights), no K-FAC
layer at all.  ``strict=False`` (the model of a first-order run) lists those reasons in
:attr:`ModelWalk.kfac_problems` instead and describes what a first-order step computes: a
layer's first call only (later calls' FLOPs count with the rest), no unused or tied layer
(their parameters count in ``other_params``).  A forward that fails (the example is not what
the model takes) is a :class:`ForwardError`.  Every parameter tensor counts once in
``total_params``; ``other_params`` are the trainable ones no listed layer owns (what the
simulator all-reduces and updates besides the layers), and a frozen parameter
(``requires_grad=False``: no gradient, so neither all-reduced nor updated) counts in
``frozen_params`` instead:

* ``dim_a`` - side of the A factor: ``in_features`` (Linear) or ``c_in * kh * kw`` (Conv2d),
  plus one when the layer has a trainable bias (folded into A as a column of ones; a frozen
  bias is no part of the block, as in :class:`kfacperf.kfac.layers.KFACLayer`).
* ``dim_g`` - side of the G factor: ``out_features`` / ``c_out``.
* ``rows_per_example`` - rows one example contributes to A and G: the output's spatial
  positions ``H_out * W_out`` (Conv2d), the input's elements per example over its last
  dimension (Linear on ``[B, T, F]`` or sequence-first ``[T, B, F]``: ``T``), or 1 (Linear
  on ``[B, F]``).
* ``fwd_flops_per_example`` - ``2 * MACs`` of the weight multiply
  (``2 * (dim_a - bias) * dim_g * rows_per_example``); bias adds are not counted.
* ``in_elems_per_example`` / ``out_elems_per_example`` - elements of the layer's input/output
  tensors per example.

BatchNorm layers with trainable affine parameters (Fisher blocks when the optimizer runs with
``bn_blocks``, :mod:`kfacperf.kfac.batchnorm`) are listed apart, under ``batchnorm``, each
with ``channels``, ``params`` (2C), ``rows_per_example`` (the spatial positions of one
example, H x W; 1 for BatchNorm1d on ``[B, C]``), the elements per example, and ``follows``:
the K-FAC layer the forward pass called last before it ("" for none).  Their parameters
still count in ``other_params``.

:func:`walk_model` also counts the whole forward's FLOPs (torch's FLOP counter, which works
on meta tensors) and records each Conv2d's geometry, for :mod:`.workload_model`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from kfacperf.kfac.batchnorm import is_batchnorm
from kfacperf.kfac.layers import is_kfac_layer

from .registry import get_workload

__all__ = ["DescribeError", "ForwardError", "ModelWalk", "describe_model", "describe_workload",
           "is_kfac_layer", "walk_model", "walk_workload"]

MAKE_BATCH_INPUTS = "make_batch(1, generator)'s inputs"
"""What :func:`walk_workload` feeds the model, as its :class:`ForwardError` names it."""


class DescribeError(ValueError):
    """The model cannot be described (a shared or unused K-FAC layer, a batch other than 1)."""


class NoLayerError(DescribeError):
    """The model has no K-FAC layer (nn.Linear, nn.Conv2d with groups=1), of which a workload
    model is made: none can describe it."""


class MetaWalkError(DescribeError):
    """The forward of a model built on the meta device needs real values."""


class ForwardError(DescribeError):
    """The model's forward fails on the example, run for real (not only on the meta device):
    the example is not what the model takes, or the forward is broken."""


@dataclass
class ModelWalk:
    """What one forward pass of a batch of 1 showed."""

    layers: list[dict[str, Any]]  # per K-FAC layer in call order (see the module docstring)
    batchnorm: list[dict[str, Any]]  # per BatchNorm layer in call order
    conv: dict[str, dict[str, Any]]  # per Conv2d path: its geometry
    total_flops: float  # the whole forward, torch's FLOP counter
    total_params: int  # each parameter tensor once
    on_meta: bool = field(default=True)  # False: the meta pass failed and it ran for real
    frozen_params: int = 0  # of total_params, those that get no gradient
    kfac_problems: list[str] = field(default_factory=list)  # why K-FAC cannot train it as is

    @property
    def other_params(self) -> int:
        """Trainable parameters no listed K-FAC layer owns (each listed layer owns its own;
        a listed layer's frozen bias is among ``frozen_params``)."""
        return (self.total_params - self.frozen_params
                - sum(int(layer["params"]) for layer in self.layers))


def walk_model(model: nn.Module, example: torch.Tensor, *, strict: bool = True,
               inputs: str = "its example") -> ModelWalk:
    """One forward pass of ``model(example)`` (a batch of 1), on the meta device if it can.

    The model is put in eval mode (a single example cannot go through training-mode
    BatchNorm at 1x1 resolution) and run under ``torch.no_grad``; its mode is restored.
    ``strict``: what K-FAC cannot train raises :class:`DescribeError` (see the module
    docstring); else it is listed in ``kfac_problems``.  A forward that fails for real too
    raises :class:`ForwardError` ("the model's forward on ``inputs`` failed: ...").
    """
    if example.shape[0] != 1:
        raise DescribeError(f"describe_model needs a batch of 1, got batch {example.shape[0]}")
    try:
        walk = _walk(model, example, meta=True)
    except DescribeError:
        raise
    except Exception as exc:
        if _is_meta(model):
            raise MetaWalkError(
                f"the forward pass of {type(model).__name__} fails on the meta device "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''})"
                "; describing a model without building it needs a forward that only uses "
                "shapes") from exc
    else:
        return _checked(walk, strict)
    try:
        walk = _walk(model, example, meta=False)
    except DescribeError:
        raise
    except Exception as exc:  # the model's own forward, on inputs it does not take
        from kfacperf.runtime.recording import exception_summary

        raise ForwardError(f"the model's forward on {inputs} failed: "
                           f"{exception_summary(exc)}") from exc
    return _checked(walk, strict)


def _checked(walk: ModelWalk, strict: bool) -> ModelWalk:
    if strict and walk.kfac_problems:
        raise DescribeError(walk.kfac_problems[0])
    return walk


def describe_model(
    model: nn.Module, example: torch.Tensor, *, name: str = ""
) -> dict[str, Any]:
    """Describe ``model``'s K-FAC layers from ``model(example)`` (a batch of 1)."""
    return _description(walk_model(model, example), example, name)


def describe_workload(name: str, **options: Any) -> dict[str, Any]:
    """:func:`describe_model` of workload ``name`` built with ``options``, on the meta device.

    ``options`` are the workload's own (see :func:`~kfacperf.workloads.workload_options`),
    e.g. ``describe_workload("resnet50", image_size=64)``; defaults otherwise.
    """
    workload = get_workload(name, **options)
    out = _description(*walk_workload(workload), name)
    # Lists, not tuples, so the record serialises to JSON/TOML unchanged.
    out["options"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in workload.options.items()
    }
    return out


def _description(walk: ModelWalk, example: torch.Tensor, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "input_shape": list(example.shape[1:]),
        "num_kfac_layers": len(walk.layers),
        "total_params": walk.total_params,
        "other_params": walk.other_params,
        "frozen_params": walk.frozen_params,
        "layers": walk.layers,
        "batchnorm": walk.batchnorm,
    }


def walk_workload(workload: Any, *, strict: bool = True) -> tuple[ModelWalk, torch.Tensor]:
    """:func:`walk_model` of ``workload``'s model built on the meta device (no memory), or,
    if its forward needs real values, built for real; and the example it was fed.

    A forward that fails on ``make_batch(1)``'s inputs, for real too, is a
    :class:`ForwardError` of one line saying so (what ``kfacperf profile``, ``calibrate
    --workload`` and ``demo`` print)."""
    example, _ = workload.make_batch(1)
    with torch.device("meta"):
        model = workload.build_model(seed=0)
    try:
        try:
            return walk_model(model, example, strict=strict, inputs=MAKE_BATCH_INPUTS), example
        except MetaWalkError:
            real = workload.build_model(seed=0)
        return walk_model(real, example, strict=strict, inputs=MAKE_BATCH_INPUTS), example
    except ForwardError as exc:
        raise ForwardError(f"{exc}; make_batch must return inputs the model takes"
                           ) from exc.__cause__


# ------------------------------------------------------------------------------ the walk

def _is_meta(model: nn.Module) -> bool:
    tensors = itertools.chain(model.parameters(), model.buffers())
    return all(t.is_meta for t in tensors)


def _walk(model: nn.Module, example: torch.Tensor, *, meta: bool) -> ModelWalk:
    from torch.utils.flop_counter import FlopCounterMode

    from kfacperf.kfac.conv_factors import padded_input
    from kfacperf.kfac.preconditioner import ROOT_LAYER, tied_layers_message

    # module -> its name: the path, or ROOT_LAYER for the model itself (the preconditioner's)
    # (a module whose weight is frozen is none: the optimizer skips it; its work is the rest's)
    paths = {m: p or ROOT_LAYER for p, m in model.named_modules()
             if (is_kfac_layer(m) or is_batchnorm(m)) and _trains(getattr(m, "weight", None))}
    # a frozen bias is no column of A (as in kfacperf.kfac.layers), read before the swap
    with_bias = {m: _trains(getattr(m, "bias", None)) for m in paths}
    # each K-FAC layer's own parameters, of the model as given (the meta pass swaps them)
    owns = {m: [id(p) for p in m.parameters(recurse=False)] for m in paths if is_kfac_layer(m)}
    owner: dict[int, str] = {}  # a listed layer's parameter -> that layer
    problems: list[str] = []
    layers: list[dict[str, Any]] = []
    norms: list[dict[str, Any]] = []
    conv: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        path = paths[module]
        if path in seen:
            problems.append(f"layer {path!r} is called more than once per forward; shared "
                            "K-FAC layers are not supported")
            return
        seen.add(path)
        tied = [owner[i] for i in owns.get(module, []) if i in owner]
        if tied:
            problems.append(tied_layers_message(tied[0], path))
            return
        owner.update((i, path) for i in owns.get(module, []))
        if is_batchnorm(module):
            follows = layers[-1]["name"] if layers else ""
            norms.append(_batchnorm_record(
                path, cast(nn.modules.batchnorm._BatchNorm, module), inputs[0], follows))
            return
        # paths holds only K-FAC layers (Linear, Conv2d) besides the BatchNorms
        layers.append(_layer_record(path, cast("nn.Linear | nn.Conv2d", module), inputs[0],
                                    output, bias=with_bias[module]))
        if isinstance(module, nn.Conv2d):
            hp, wp = padded_input(inputs[0], module).shape[-2:]
            conv[path] = {
                "in_channels": module.in_channels, "kernel": tuple(module.kernel_size),
                "stride": tuple(module.stride), "dilation": tuple(module.dilation),
                "padded": (int(hp), int(wp)), "output": tuple(output.shape[-2:]),
            }

    handles = [m.register_forward_hook(hook) for m in paths]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False,
                                              custom_mapping=_extra_flop_formulas()) as counter:
            if meta:
                with torch.device("meta"):
                    torch.func.functional_call(model, _meta_state(model),
                                               (example.to("meta"),), strict=False)
            else:
                model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    problems += _missing_layers(model, paths, seen, has_kfac_layer=bool(owns))
    return ModelWalk(layers=layers, batchnorm=norms, conv=conv,
                     total_flops=float(counter.get_total_flops()),
                     total_params=sum(p.numel() for p in model.parameters()), on_meta=meta,
                     frozen_params=sum(p.numel() for p in model.parameters()
                                       if not p.requires_grad),
                     kfac_problems=problems)


def _missing_layers(model: nn.Module, paths: dict[nn.Module, str], seen: set[str], *,
                    has_kfac_layer: bool) -> list[str]:
    """What K-FAC lacks after the forward: layers it never called, or no layer at all."""
    problems = []
    unused = sorted(p for m, p in paths.items() if p not in seen and not is_batchnorm(m))
    if unused:
        problems.append(f"K-FAC layer(s) not used by the forward pass: {', '.join(unused)}")
    if not has_kfac_layer:
        problems.append(f"the model ({type(model).__name__}) has no layer K-FAC can "
                        "precondition (nn.Linear, or nn.Conv2d with groups=1)")
    return problems


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (tied ones under each of their names) as a meta tensor."""
    named = itertools.chain(model.named_parameters(remove_duplicate=False),
                            model.named_buffers(remove_duplicate=False))
    made: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in named:
        if id(t) not in made:
            made[id(t)] = t if t.is_meta else torch.empty_like(t, device="meta")
        out[name] = made[id(t)]
    return out


def _extra_flop_formulas() -> dict[Any, Any]:
    """FLOP formulas torch's counter lacks: the CPU flash-attention kernel (QK^T and AV)."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    count = getattr(flop_counter, "sdpa_flop_count", None)
    if op is None or count is None:
        return {}

    def sdpa(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(count(q, k, v))

    return {op: sdpa}


def _trains(t: object) -> bool:
    """Is ``t`` a parameter that gets a gradient (one the K-FAC optimizer preconditions)?"""
    return isinstance(t, torch.Tensor) and t.requires_grad


def _layer_record(
    path: str, module: nn.Linear | nn.Conv2d, x: torch.Tensor, y: torch.Tensor, *, bias: bool
) -> dict[str, Any]:
    """``bias``: the layer has a trainable bias (a frozen one counts in frozen_params).

    The walk feeds one example, so every element of ``x`` and ``y`` is that example's,
    wherever the model keeps its batch dimension (a sequence-first ``[T, B, F]`` too)."""
    params = module.weight.numel() + (cast(torch.Tensor, module.bias).numel() if bias else 0)
    if isinstance(module, nn.Linear):
        kind = "linear"
        fan_in, dim_g = module.in_features, module.out_features
        rows = x.numel() // x.shape[-1]
    else:
        kind = "conv2d"
        kh, kw = module.kernel_size
        fan_in, dim_g = module.in_channels * kh * kw, module.out_channels
        rows = y.shape[-2] * y.shape[-1]
    return {
        "name": path,
        "kind": kind,
        "dim_a": fan_in + int(bias),
        "dim_g": dim_g,
        "params": params,
        "rows_per_example": rows,
        "fwd_flops_per_example": 2 * fan_in * dim_g * rows,
        "in_elems_per_example": x.numel(),
        "out_elems_per_example": y.numel(),
    }


def _batchnorm_record(path: str, module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor,
                      follows: str) -> dict[str, Any]:
    channels = int(module.weight.shape[0])
    per_example = x.numel()  # one example (see _layer_record)
    return {
        "name": path,
        "kind": "batchnorm",
        "channels": channels,
        "params": 2 * channels,
        "rows_per_example": per_example // channels,
        "in_elems_per_example": per_example,
        "out_elems_per_example": per_example,
        "follows": follows,
    }
