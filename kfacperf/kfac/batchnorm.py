"""BatchNorm layers as Fisher blocks: unit-wise (2x2 per channel) or full (2C x 2C).

SP-NGD (Osawa et al., 2020) preconditions the affine parameters ``(γ, β)`` of every BatchNorm
layer too: ResNet-50 then has 107 Fisher blocks (53 convolutions and 1 fully connected layer,
Kronecker-factored, plus 53 BatchNorm layers).  A BatchNorm block is not Kronecker-factored:
its one "factor" is the Fisher block itself, ``F = (1/N) Σ_n v_n v_nᵀ`` over the per-example
gradients ``v_n``, and its preconditioned gradient is ``(F + λI)⁻¹ ∇`` (see
:mod:`kfacperf.kfac.inverse`).

Per example n and channel c, with ``x̂`` the normalised input (the statistics the module
itself uses: the batch's in training, the running ones in eval mode) and ``δ = N·∂L/∂y`` the
per-example output gradient (autograd gives ``∂L/∂y`` of the batch-mean loss)::

    g_γ[n, c] = Σ_{h,w} δ[n, c, h, w] · x̂[n, c, h, w]        g_β[n, c] = Σ_{h,w} δ[n, c, h, w]

``unit``: one 2x2 block per channel over ``(γ_c, β_c)``, stored as a ``[C, 2, 2]`` stack;
``full``: one ``2C x 2C`` block over the concatenation ``v_n = (g_γ[n, :], g_β[n, :])``.
Like every K-FAC statistic these are local means over this rank's examples, so the global
block is the average over ranks.  (As with the Kronecker factors, the dependence of the batch
statistics on each example is ignored: ``δ`` is what the backward pass delivers.)

The gradient matrix of a BatchNorm layer is ``C x 2`` (``dim_g = C`` rows, ``dim_a = 2``
columns ``[∇γ | ∇β]``), exactly what :class:`~kfacperf.kfac.layers.KFACLayer` builds from a
module whose weight is ``[C]`` with a bias, so loading, writing and sending gradients need
nothing new.
"""
from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from kfacperf import vocab
from kfacperf.kfac.layers import Factor, KFACLayer, factor_dtype

BN_MODES = (vocab.BN_UNIT, vocab.BN_FULL)

# Inverse state per (mode, method): unit-wise blocks always store (F + λI)⁻¹ (closed form);
# a full block stores its eigendecomposition (eigen) or its damped inverse (cholesky).
_INVERSE_STATE = {
    (vocab.BN_UNIT, "eigen"): ("f_inv",),
    (vocab.BN_UNIT, "cholesky"): ("f_inv",),
    (vocab.BN_FULL, "eigen"): ("qf", "df"),
    (vocab.BN_FULL, "cholesky"): ("f_inv",),
}


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm (1d/2d/3d, or synchronised) with trainable affine parameters."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    w, b = module.weight, module.bias
    return (isinstance(w, Tensor) and isinstance(b, Tensor) and w.requires_grad
            and b.requires_grad)


class BatchNormLayer(KFACLayer):
    """A BatchNorm layer's Fisher block; ``mode`` is ``"unit"`` or ``"full"``."""

    kind = "batchnorm"
    kronecker = False

    def __init__(self, *, name: str, module: nn.Module, inverse_method: str, mode: str) -> None:
        if not is_batchnorm(module):
            raise ValueError(f"layer {name!r}: a BatchNorm Fisher block needs a BatchNorm "
                             "module with trainable weight and bias (affine=True)")
        vocab.check_choice("bn_blocks", mode, BN_MODES)
        super().__init__(name=name, module=module, inverse_method=inverse_method)
        self.mode = mode
        self.channels = self.dim_g
        self.f_batch: Tensor | None = None
        self.f_factor: Tensor | None = None
        self.f_inv: Tensor | None = None
        self.qf: Tensor | None = None
        self.df: Tensor | None = None

    def __repr__(self) -> str:
        return f"BatchNormLayer(name={self.name!r}, channels={self.channels}, mode={self.mode!r})"

    # ----------------------------------------------------------------- statistics
    def factors(self) -> tuple[Factor, ...]:
        if self.mode == vocab.BN_UNIT:
            return (Factor("f", 2, self.channels),)
        return (Factor("f", 2 * self.channels),)

    def compute_batch_factors(self, x: Tensor, grad_output: Tensor) -> None:
        """Set ``f_batch`` from the layer's input and its output gradient."""
        dtype = factor_dtype(x.dtype)
        g_gamma, g_beta = self.per_example_grads(x.detach().to(dtype),
                                                 grad_output.detach().to(dtype))
        n = g_gamma.shape[0]
        if self.mode == vocab.BN_UNIT:
            v = torch.stack([g_gamma, g_beta], dim=2)  # [N, C, 2]
            self.f_batch = torch.einsum("nci,ncj->cij", v, v).div_(n)
        else:
            v = torch.cat([g_gamma, g_beta], dim=1)  # [N, 2C]
            self.f_batch = (v.t() @ v).div_(n)
        self.rows = n

    def per_example_grads(self, x: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        """``(g_γ, g_β)``, each ``[N, C]``: the per-example gradients of γ and β."""
        if x.dim() < 2:
            raise ValueError(f"layer {self.name!r}: BatchNorm statistics need a batched "
                             f"input, got shape {tuple(x.shape)}")
        n = x.shape[0]
        dims = tuple(range(2, x.dim()))
        xhat = self.normalized(x)
        delta = grad_output * n
        if not dims:
            return delta * xhat, delta
        return (delta * xhat).sum(dim=dims), delta.sum(dim=dims)

    def normalized(self, x: Tensor) -> Tensor:
        """``x̂``: ``x`` normalised with the statistics the module itself uses."""
        m = cast(nn.modules.batchnorm._BatchNorm, self.module)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        running_mean, running_var = m.running_mean, m.running_var
        if m.training or running_mean is None or running_var is None:
            dims = (0, *range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        else:
            mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
        return (x - mean.view(shape)) * torch.rsqrt(var + m.eps).view(shape)

    # ------------------------------------------------------------------ inverse state
    def inverse_names(self) -> tuple[str, ...]:
        return _INVERSE_STATE[(self.mode, self.inverse_method)]

    def inverse_shapes(self) -> tuple[tuple[int, ...], ...]:
        c = self.channels
        shapes = {"f_inv": (c, 2, 2) if self.mode == vocab.BN_UNIT else (2 * c, 2 * c),
                  "qf": (2 * c, 2 * c), "df": (2 * c,)}
        return tuple(shapes[n] for n in self.inverse_names())

    # --------------------------------------------------------------- sizes and FLOPs
    def factor_flops(self, x: Tensor, grad_output: Tensor) -> float:
        """Normalising (3 per element), the two reductions (3 per element), the outer
        products of the per-example gradients."""
        elems = float(x.numel())
        n = x.shape[0] if x.dim() > 1 else 1
        c = self.channels
        outer = 8.0 * n * c if self.mode == vocab.BN_UNIT else 2.0 * n * (2 * c) ** 2
        return 6.0 * elems + outer

    def inverse_flops(self) -> float:
        """Closed-form 2x2 inverses (about 10 FLOPs each), or one eigendecomposition (9 n³)
        or Cholesky inverse (n³) of the 2C x 2C block."""
        c = self.channels
        if self.mode == vocab.BN_UNIT:
            return 10.0 * c
        coeff = 9.0 if self.inverse_method == "eigen" else 1.0
        return coeff * (2 * c) ** 3

    def precondition_flops(self) -> float:
        c = self.channels
        if self.mode == vocab.BN_UNIT:
            return 8.0 * c
        products = 2.0 if self.inverse_method == "eigen" else 1.0
        return products * 2.0 * (2 * c) ** 2
