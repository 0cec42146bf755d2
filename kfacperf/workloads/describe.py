"""Per-layer shapes and FLOPs of a workload's K-FAC layers, measured from one forward pass.

This is what the simulator's workload model (``models/workloads/<name>.toml``) is built from.
A *K-FAC layer* is every ``nn.Linear`` and every ``nn.Conv2d`` with ``groups == 1``, the
layers the optimizer preconditions; everything else (BatchNorm, LayerNorm, embeddings,
grouped convolutions) counts as ``other_params``.

Per layer (``name`` is the module path, layers listed in the order the forward pass calls
them; a module called more than once is an error because its factors would mix two inputs):

* ``dim_a`` - side of the A factor: ``in_features`` (Linear) or ``c_in * kh * kw`` (Conv2d),
  plus one when the layer has a bias (the bias is folded into A as a column of ones).
* ``dim_g`` - side of the G factor: ``out_features`` / ``c_out``.
* ``rows_per_example`` - rows one example contributes to A and G: the output's spatial
  positions ``H_out * W_out`` (Conv2d), the product of the middle dimensions of the input
  (Linear on ``[B, T, F]``: ``T``), or 1 (Linear on ``[B, F]``).
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
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kfacperf.kfac.batchnorm import is_batchnorm

from .registry import get_workload


def is_kfac_layer(module: nn.Module) -> bool:
    """Whether the K-FAC optimizer preconditions ``module`` (Linear, or Conv2d with groups=1)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def describe_model(
    model: nn.Module, example: torch.Tensor, *, name: str = ""
) -> dict[str, Any]:
    """Describe ``model``'s K-FAC layers by running ``model(example)`` (a batch of 1).

    The model is put in eval mode (a single example cannot go through training-mode
    BatchNorm at 1x1 resolution) and run under ``torch.no_grad``.
    """
    if example.shape[0] != 1:
        raise ValueError(f"describe_model needs a batch of 1, got batch {example.shape[0]}")
    paths = {m: p for p, m in model.named_modules() if is_kfac_layer(m) or is_batchnorm(m)}
    layers: list[dict[str, Any]] = []
    norms: list[dict[str, Any]] = []
    seen: set[str] = set()

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        path = paths[module]
        if path in seen:
            raise ValueError(
                f"layer {path!r} is called more than once per forward; shared K-FAC layers "
                "are not supported"
            )
        seen.add(path)
        if is_batchnorm(module):
            follows = layers[-1]["name"] if layers else ""
            norms.append(_batchnorm_record(path, module, inputs[0], follows))
        else:
            layers.append(_layer_record(path, module, inputs[0], output))

    handles = [m.register_forward_hook(hook) for m in paths]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unused = sorted(p for m, p in paths.items() if p not in seen and not is_batchnorm(m))
    if unused:
        raise ValueError(f"K-FAC layer(s) not used by the forward pass: {', '.join(unused)}")
    total = sum(p.numel() for p in model.parameters())
    kfac = sum(layer["params"] for layer in layers)
    return {
        "name": name,
        "input_shape": list(example.shape[1:]),
        "num_kfac_layers": len(layers),
        "total_params": total,
        "other_params": total - kfac,
        "layers": layers,
        "batchnorm": norms,
    }


def describe_workload(name: str, **options: Any) -> dict[str, Any]:
    """:func:`describe_model` of workload ``name`` built with ``options``.

    ``options`` are the workload's own (see :func:`~kfacperf.workloads.workload_options`),
    e.g. ``describe_workload("resnet50", image_size=64)``; defaults otherwise.
    """
    workload = get_workload(name, **options)
    model = workload.build_model(seed=0)
    example, _ = workload.make_batch(1)
    out = describe_model(model, example, name=name)
    # Lists, not tuples, so the record serialises to JSON/TOML unchanged.
    out["options"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in workload.options.items()
    }
    return out


def _layer_record(
    path: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Any]:
    bias = module.bias is not None
    params = module.weight.numel() + (module.bias.numel() if bias else 0)
    if isinstance(module, nn.Linear):
        kind = "linear"
        fan_in, dim_g = module.in_features, module.out_features
        rows = x.numel() // (x.shape[0] * x.shape[-1])
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
        "in_elems_per_example": x.numel() // x.shape[0],
        "out_elems_per_example": y.numel() // y.shape[0],
    }


def _batchnorm_record(path: str, module: nn.Module, x: torch.Tensor, follows: str
                      ) -> dict[str, Any]:
    channels = int(module.weight.shape[0])
    per_example = x.numel() // x.shape[0]
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
