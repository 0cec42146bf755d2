"""Inverses of a layer's Kronecker factors and the preconditioned gradient.

Two methods (``KFACLayer.inverse_method``), both in terms of the layer's ``dim_g x dim_a``
gradient matrix ``∇`` (row-major vec, so the curvature block is ``G ⊗ A``):

``eigen``
    ``A = QA·diag(dA)·QAᵀ``, ``G = QG·diag(dG)·QGᵀ`` (eigenvalues clamped at 0), and the
    preconditioned gradient is exactly ``(G ⊗ A + λI)⁻¹ vec(∇)``::

        QG · [(QGᵀ ∇ QA) / (dG dAᵀ + λ)] · QAᵀ

    The state is ``qa, qg, da, dg``; λ is applied when preconditioning.

``cholesky``
    Factored Tikhonov damping with π-balancing (Martens & Grosse, 2015, §6.3)::

        (G + (√λ/π) I)⁻¹ ∇ (A + π√λ I)⁻¹,   π² = (tr A / dim A) / (tr G / dim G)

    so the damping added to each factor scales with that factor (rescaling A by c and G by
    1/c leaves the result unchanged).  The state is ``a_inv, g_inv`` (λ is baked in).

A BatchNorm Fisher block (:mod:`kfacperf.kfac.batchnorm`) is not Kronecker-factored: its
preconditioned gradient is exactly ``(F + λI)⁻¹ ∇`` for either method.  Unit-wise blocks are
inverted in closed form, all channels at once (``[[d, -b], [-b, a]] / (ad - b²)`` of the damped
2x2 block); a full ``2C x 2C`` block by its eigendecomposition (``eigen``; λ applied when
preconditioning) or by a Cholesky inverse of ``F + λI`` (``cholesky``).

Decompositions run in ``dtype`` (float64 by default: cheap next to the batch statistics at
the usual inverse intervals, and robust on ill-conditioned factors) and are stored in the
factors' dtype.  Zero or rank-deficient factors (dead ReLUs, constant inputs) give finite
results: eigenvalues are clamped at 0 and λ > 0, and each Cholesky damping term is kept above
a tiny multiple of its factor's trace.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kfacperf import vocab
from kfacperf.kfac.batchnorm import BatchNormLayer
from kfacperf.kfac.layers import KFACLayer

_TINY = 1e-30  # floor for factor scales (trace / dim) in the π ratio
_REL_FLOOR = 1e-12  # each Cholesky damping term ≥ this x its factor's trace


def compute_inverse(layer: KFACLayer, *, damping: float,
                    dtype: torch.dtype = torch.float64) -> None:
    """Set the layer's inverse state from its running-average factors."""
    if not layer.has_factors:
        raise RuntimeError(f"layer {layer.name!r}: no factors to invert yet")
    if isinstance(layer, BatchNormLayer):
        _batchnorm_inverse(layer, damping=damping, dtype=dtype)
        return
    assert layer.a_factor is not None and layer.g_factor is not None
    store = layer.a_factor.dtype
    a = _symmetric(layer.a_factor, dtype)
    g = _symmetric(layer.g_factor, dtype)
    if layer.inverse_method == "eigen":
        da, qa = torch.linalg.eigh(a)
        dg, qg = torch.linalg.eigh(g)
        layer.qa, layer.da = qa.to(store), da.clamp_(min=0).to(store)
        layer.qg, layer.dg = qg.to(store), dg.clamp_(min=0).to(store)
    else:
        a_inv, g_inv = _pi_damped_inverses(a, g, damping)
        layer.a_inv, layer.g_inv = a_inv.to(store), g_inv.to(store)


def precondition(layer: KFACLayer, *, damping: float) -> None:
    """Set ``precond_grad`` (and ``kl_term`` = ⟨precond_grad, grad⟩) from ``grad``.

    A layer with no inverse state yet (it never saw a factor update) passes its gradient
    through unchanged.
    """
    grad = layer.grad
    if grad is None:
        layer.precond_grad = None
        layer.kl_term = None
        return
    if not layer.has_inverse:
        out = grad
    elif isinstance(layer, BatchNormLayer):
        out = _batchnorm_precondition(layer, grad, damping)
    elif layer.inverse_method == "eigen":
        qa, qg, da, dg = (_as(t, grad) for t in (layer.qa, layer.qg, layer.da, layer.dg))
        v = qg.t() @ grad @ qa
        v.div_(torch.outer(dg, da).add_(damping))
        out = qg @ v @ qa.t()
    else:
        out = _as(layer.g_inv, grad) @ grad @ _as(layer.a_inv, grad)
    layer.precond_grad = out
    layer.kl_term = torch.sum(out * grad)


def kl_clip_scale(terms: list[Tensor], *, lr: float, kl_clip: float) -> Tensor:
    """ν = min(1, √(kl_clip / |lr² Σ ⟨∇̃, ∇⟩|)) as a 0-dim tensor (no host sync).

    The step ``-lr·ν·∇̃`` then has a predicted KL change (under the K-FAC quadratic model)
    of at most ``kl_clip``.  With no terms, or all-zero gradients, ν = 1.
    """
    if not terms:
        return torch.ones(())
    if len({t.dtype for t in terms}) == 1:  # one stack and one cast, not one per layer
        stacked = torch.stack(terms).to(torch.float64)
    else:
        stacked = torch.stack([t.to(torch.float64) for t in terms])
    total = stacked.sum().mul_(lr * lr).abs_()
    nu = torch.sqrt(kl_clip / total.clamp_min(_TINY)).clamp_(max=1.0)
    return nu.to(terms[0].dtype)


def _batchnorm_inverse(layer: BatchNormLayer, *, damping: float, dtype: torch.dtype) -> None:
    assert layer.f_factor is not None
    store = layer.f_factor.dtype
    f = layer.f_factor.to(dtype)
    if layer.mode == vocab.BN_UNIT:  # [C, 2, 2]: closed-form inverses of F_c + λI
        a = f[:, 0, 0] + damping
        d = f[:, 1, 1] + damping
        b = 0.5 * (f[:, 0, 1] + f[:, 1, 0])
        det = (a * d - b * b).clamp_min(_TINY)
        inv = torch.stack([torch.stack([d, -b], dim=1), torch.stack([-b, a], dim=1)], dim=1)
        layer.f_inv = inv.div_(det.view(-1, 1, 1)).to(store)
    elif layer.inverse_method == "eigen":
        df, qf = torch.linalg.eigh(_symmetric(f, dtype))
        layer.qf, layer.df = qf.to(store), df.clamp_(min=0).to(store)
    else:
        layer.f_inv = _spd_inverse(_symmetric(f, dtype), torch.tensor(damping, dtype=dtype)
                                   ).to(store)


def _batchnorm_precondition(layer: BatchNormLayer, grad: Tensor, damping: float) -> Tensor:
    """``(F + λI)⁻¹`` applied to the ``C x 2`` gradient ``[∇γ | ∇β]``."""
    if layer.mode == vocab.BN_UNIT:
        return torch.einsum("cij,cj->ci", _as(layer.f_inv, grad), grad)
    v = grad.t().reshape(-1)  # the concatenation (∇γ, ∇β)
    if layer.inverse_method == "eigen":
        qf, df = _as(layer.qf, grad), _as(layer.df, grad)
        out = qf @ ((qf.t() @ v) / (df + damping))
    else:
        out = _as(layer.f_inv, grad) @ v
    return out.view(2, -1).t()


def _pi_damped_inverses(a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    tr_a = torch.trace(a).clamp_min(0)
    tr_g = torch.trace(g).clamp_min(0)
    scale_a = (tr_a / a.shape[0]).clamp_min(_TINY)
    scale_g = (tr_g / g.shape[0]).clamp_min(_TINY)
    pi = torch.sqrt(scale_a / scale_g)
    root = math.sqrt(damping)
    damp_a = torch.maximum(pi * root, _REL_FLOOR * tr_a).clamp_min(_TINY)
    damp_g = torch.maximum(root / pi, _REL_FLOOR * tr_g).clamp_min(_TINY)
    return _spd_inverse(a, damp_a), _spd_inverse(g, damp_g)


def _spd_inverse(m: Tensor, damp: Tensor) -> Tensor:
    shifted = m.clone()
    shifted.diagonal().add_(damp)
    chol, _ = torch.linalg.cholesky_ex(shifted)
    return torch.cholesky_inverse(chol)


def _symmetric(m: Tensor, dtype: torch.dtype) -> Tensor:
    m = m.to(dtype)
    return (m + m.t()).mul_(0.5)


def _as(t: Tensor | None, like: Tensor) -> Tensor:
    assert t is not None
    return t if t.dtype == like.dtype else t.to(like.dtype)
