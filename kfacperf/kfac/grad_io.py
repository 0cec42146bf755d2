"""Every layer's gradient matrix formed, and every preconditioned one written back, at once.

:meth:`KFACLayer.load_grad` and :meth:`KFACLayer.write_grad` do one layer each: a copy
kernel (and, writing, a multiplication by the KL-clipping scale) per layer.  The
preconditioner runs them for every layer of every step, outside any stage, so on a GPU
their cost is the host's, one launch at a time: for ResNet-50's 54 layers some 160 small
kernels, milliseconds beside a step of tens of milliseconds.  :func:`load_grads` and
:func:`write_grads` give the same tensors, bit for bit, with a fixed number of kernels: one
concatenation for the copies (on a GPU), and the ``torch._foreach_*`` multi-tensor kernels
for the write-back and, in place, its scaling (the same product where the gradient and its
preconditioned matrix share a dtype).  A layer whose ``.grad`` does not exist yet, whose
dtypes differ, or that has a bias to append when loading takes the one-layer path.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor

from kfacperf.kfac.layers import KFACLayer


def load_grads(layers: Iterable[KFACLayer], *, batched: bool | None = None) -> None:
    """``layer.grad`` of every layer as :meth:`KFACLayer.load_grad` sets it: the
    ``dim_g x dim_a`` matrix of the module's ``.grad``, in storage of its own.

    ``batched`` (default: for gradients on a GPU) copies them with one concatenation into
    one buffer.  On a CPU the copies cost their bytes, not their launches, and a buffer the
    size of the model's gradients, allocated afresh each step, would cost page faults (glibc
    hands blocks that large back to the system): there each layer copies its own.
    """
    copies: dict[tuple[torch.device, torch.dtype], list[tuple[KFACLayer, Tensor]]] = (
        defaultdict(list))
    for layer in layers:
        g = layer.weight.grad
        if g is None or layer.has_bias or not (g.is_cuda if batched is None else batched):
            layer.load_grad()  # None, a concatenation that already copies, or one copy
            continue
        copies[(g.device, g.dtype)].append((layer, g))
    for group in copies.values():
        flat = torch.cat([g.reshape(-1) for _, g in group])
        pieces = flat.split([g.numel() for _, g in group])
        for (layer, _), piece in zip(group, pieces):
            layer.grad = piece.view(layer.dim_g, -1)


def write_grads(layers: Iterable[KFACLayer], scale: Tensor | None = None) -> None:
    """:meth:`KFACLayer.write_grad` of every layer with a ``precond_grad``: ``scale *
    precond_grad`` into the module's ``.grad`` (weight and bias)."""
    dsts: list[Tensor] = []
    srcs: list[Tensor] = []
    for layer in layers:
        m = layer.precond_grad
        if m is None:
            continue
        w = layer.weight
        params = [w] + ([cast(Tensor, layer.bias)] if layer.has_bias else [])
        grads = [p.grad for p in params]
        if any(g is None or g.dtype != m.dtype for g in grads):
            layer.write_grad(m, scale)  # allocates the gradient, or scales before the cast
            continue
        dsts += [cast(Tensor, g) for g in grads]
        srcs.append(m[:, : layer.dim_a - int(layer.has_bias)].reshape(w.shape))
        if layer.has_bias:
            srcs.append(m[:, -1].reshape(params[1].shape))
    if not dsts:
        return
    torch._foreach_copy_(dsts, srcs)
    if scale is not None:  # in place: no second copy of every gradient
        torch._foreach_mul_(dsts, scale)
