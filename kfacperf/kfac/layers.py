"""Per-layer K-FAC state and the batch statistics (Kronecker factors) of Linear and Conv2d.

Conventions (N = examples in the local batch, the size of the input's first dimension, 1 for
an unbatched input; the loss is assumed to be a mean over those N examples):

* A layer's gradient is handled as a ``dim_g x dim_a`` matrix ``[dW | db]``: the weight
  reshaped to ``(out, -1)`` (for Conv2d the columns are ordered ``(c_in, kh, kw)``, the order
  of :func:`torch.nn.functional.unfold`) and, when the layer has a trainable bias, the bias as
  the last column (a frozen bias is not part of the block: the layer is treated as bias-free).
  Vectors are vectorised row-major (``tensor.reshape(-1)``), so the Kronecker-factored Fisher
  block of a layer is ``G ⊗ A`` (G first).
* Every layer turns its input into R *rows* ``a_r`` (with a trailing 1 when there is a bias)
  and its output gradient into R rows ``g_r`` (what autograd gives for a mean loss, i.e.
  ``1/N`` of the per-example gradient ``δ_r = N g_r``).  The gradient is ``Σ_r g_r a_rᵀ``.

  - ``nn.Linear``: rows are all leading positions, R = N (input ``[N, F]``) or R = N·T
    (input ``[N, T, F]``, any number of leading dims).
  - ``nn.Conv2d``: rows are spatial output positions of every example, R = N·L with
    L = H_out·W_out; ``a_r`` is the receptive-field patch (unfolded with the module's stride,
    padding, padding mode and dilation).

* Factors (for R = N these are exactly ``A = (1/N) Σ aᵢaᵢᵀ``, ``G = (1/N) Σ δᵢδᵢᵀ``)::

      A = (1/R) Σ_r a_r a_rᵀ          (mean over all rows: per-position second moment)
      G = (1/N) Σ_r δ_r δ_rᵀ = N Σ_r g_r g_rᵀ   (sum over positions, mean over examples)

  So with L positions per example, ``G ⊗ A = L · E[δδᵀ] ⊗ E[aaᵀ]``: the KFC approximation
  (Grosse & Martens, 2016) of the Fisher ``E_i[vec∇ᵢ vec∇ᵢᵀ]`` under spatially uncorrelated
  derivatives.  The factor L sits in G so that A's bias entry is exactly 1 and A does not
  grow with image size.  For a single example of a Linear layer (N = R = 1), ``G ⊗ A`` is
  exactly ``vec(∇W) vec(∇W)ᵀ``.

Factors are computed in the activations' dtype (float32 for half-precision activations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from kfacperf import vocab as S
from kfacperf.kfac import conv_factors

# Tensors that make up a layer's inverse state, per method (see kfacperf.kfac.inverse).
_INVERSE_STATE = {
    "eigen": ("qa", "qg", "da", "dg"),
    "cholesky": ("a_inv", "g_inv"),
}


NO_GRADIENT = float("-inf")
"""The KL slot of a packed preconditioned gradient (:meth:`KFACLayer.pack_preconditioned`)
of a layer that no rank had a gradient of this step.  A real KL term ``⟨∇̃, ∇⟩`` is a sum
over a positive definite form: ≥ 0 up to rounding, +inf or NaN on overflow, never -inf."""


@dataclass(frozen=True)
class Factor:
    """One symmetric batch statistic of a layer, as the strategies move it between ranks.

    ``name`` gives the attributes ``<name>_batch`` (this step's statistic) and
    ``<name>_factor`` (its running average); each is a ``count x n x n`` stack of symmetric
    matrices, or a plain ``n x n`` matrix when ``count`` is 1.
    """

    name: str
    n: int
    count: int = 1

    @property
    def batch_attr(self) -> str:
        return f"{self.name}_batch"

    @property
    def factor_attr(self) -> str:
        return f"{self.name}_factor"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, self.n) if self.count == 1 else (self.count, self.n, self.n)

    @property
    def numel(self) -> int:
        return self.count * self.n * self.n


class KFACLayer:
    """The K-FAC state of one registered module.

    Attributes (``None`` until first set):
        name, module, kind (``"linear"``/``"conv2d"``), has_bias (a bias that requires a
        gradient), dim_a (incl. the bias column), dim_g, inverse_method.
        a_batch, g_batch: this step's batch statistics (local, then global after the
            strategy's ``finish_factors``); released once the running averages have taken
            them, so they exist only from a factor step's backward to its ``step()``.
        a_factor, g_factor: running averages (``dim_a²``, ``dim_g²``).
        qa, qg, da, dg: eigen method inverse state (eigenvectors, eigenvalues ≥ 0).
        a_inv, g_inv: Cholesky method inverse state (π-damped inverses).
        grad: the ``dim_g x dim_a`` gradient matrix loaded by :meth:`load_grad`.
        precond_grad: the preconditioned gradient matrix; kl_term: 0-dim tensor
            ``⟨precond_grad, grad⟩`` used by KL-clipping.
    """

    kind = ""
    kronecker = True
    """Is the Fisher block ``G ⊗ A``?  (A BatchNorm block is not.)"""

    def __init__(self, *, name: str, module: nn.Module, inverse_method: str) -> None:
        S.check_choice("inverse_method", inverse_method, S.INVERSE_METHODS)
        self.name = name
        self.module = module
        self.inverse_method = inverse_method
        # A frozen bias (requires_grad=False) is no parameter of the Fisher block: the layer
        # is then preconditioned as one without a bias (no homogeneous 1 in A), and its
        # ``.grad`` is never written (an optimizer would otherwise move the frozen bias).
        bias = getattr(module, "bias", None)
        self.has_bias = isinstance(bias, Tensor) and bias.requires_grad
        weight = self.weight
        self.dim_g = int(weight.shape[0])
        self.dim_a = int(weight[0].numel()) + int(self.has_bias)
        self.a_batch: Tensor | None = None
        self.g_batch: Tensor | None = None
        self.a_factor: Tensor | None = None
        self.g_factor: Tensor | None = None
        self.qa: Tensor | None = None
        self.qg: Tensor | None = None
        self.da: Tensor | None = None
        self.dg: Tensor | None = None
        self.a_inv: Tensor | None = None
        self.g_inv: Tensor | None = None
        self.grad: Tensor | None = None
        self.precond_grad: Tensor | None = None
        self.kl_term: Tensor | None = None
        self.rows = 0  # rows R of the last batch statistics

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim_a={self.dim_a}, "
            f"dim_g={self.dim_g}, bias={self.has_bias})"
        )

    @property
    def weight(self) -> Tensor:
        """The module's weight (looked up on every use, as the module holds it now)."""
        return cast(Tensor, self.module.weight)

    @property
    def bias(self) -> Tensor | None:
        """The module's bias, or None when it has none."""
        return cast("Tensor | None", getattr(self.module, "bias", None))

    # ----------------------------------------------------------------- batch statistics
    def factors(self) -> tuple[Factor, ...]:
        """This layer's symmetric statistics: A then G (a Fisher block of another form
        has its own, e.g. :class:`kfacperf.kfac.batchnorm.BatchNormLayer`)."""
        return (Factor("a", self.dim_a), Factor("g", self.dim_g))

    @property
    def has_batch_stats(self) -> bool:
        """Were this step's statistics computed (every factor's ``_batch`` is set)?"""
        return all(getattr(self, f.batch_attr) is not None for f in self.factors())

    @property
    def has_factors(self) -> bool:
        """Do running-average factors exist (the layer can be inverted)?"""
        return all(getattr(self, f.factor_attr) is not None for f in self.factors())

    def compute_batch_factors(self, x: Tensor, grad_output: Tensor) -> None:
        """Set ``a_batch``/``g_batch`` from the layer's input and its output gradient."""
        x = x.detach()
        dtype = factor_dtype(x.dtype)
        n = self._examples(x)
        gram, total, rows = self._input_moments(x.to(dtype))
        g_rows = self._g_rows(grad_output.detach().to(dtype))  # (dim_g, R)
        self.rows = rows
        self.a_batch = _assemble_a(gram, total if self.has_bias else None, rows)
        self.g_batch = (g_rows @ g_rows.t()).mul_(float(n))

    def _examples(self, x: Tensor) -> int:
        """N, the number of examples in the input (the leading dim; 1 if unbatched)."""
        return int(x.shape[0]) if x.dim() > 1 else 1

    def _input_moments(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(Σ_r a_r a_rᵀ, Σ_r a_r, R)`` over the input rows (without the bias 1)."""
        raise NotImplementedError

    def _g_rows(self, g: Tensor) -> Tensor:
        """Output gradient as a ``(dim_g, R)`` matrix, rows in the input rows' order."""
        raise NotImplementedError

    def release_batch_stats(self) -> None:
        """Drop this step's statistics (every factor's ``_batch``): the running averages
        hold what is kept, and a layer the next factor step's forward skips must not be
        averaged in again with stale numbers."""
        for f in self.factors():
            setattr(self, f.batch_attr, None)

    def update_factors(self, decay: float) -> None:
        """Running average: the first update sets the factor, later F ← d·F + (1-d)·F_batch."""
        if not self.has_batch_stats:
            return
        first = not self.has_factors
        for f in self.factors():
            batch: Tensor = getattr(self, f.batch_attr)
            if first:
                setattr(self, f.factor_attr, batch.clone())
            else:
                getattr(self, f.factor_attr).mul_(decay).add_(batch, alpha=1.0 - decay)

    # ---------------------------------------------------------------------- gradients
    def load_grad(self) -> None:
        """``grad`` ← the ``dim_g x dim_a`` matrix of the module's ``.grad`` (a new tensor)."""
        w = self.weight
        if w.grad is None:
            self.grad = None
            return
        g = w.grad.reshape(self.dim_g, -1)
        if self.has_bias:
            b = cast(Tensor, self.bias).grad
            bias = b if b is not None else torch.zeros_like(g[:, 0])
            self.grad = torch.cat([g, bias.reshape(-1, 1)], dim=1)
        else:
            self.grad = g.clone()

    def write_grad(self, matrix: Tensor, scale: Tensor | None = None) -> None:
        """Write ``scale * matrix`` into the module's ``.grad`` (weight and bias)."""
        w = self.weight
        m = matrix if scale is None else matrix * scale
        weight_part = m[:, : self.dim_a - int(self.has_bias)].reshape(w.shape)
        if w.grad is None:
            w.grad = weight_part.to(w.dtype).clone()
        else:
            w.grad.copy_(weight_part)
        if self.has_bias:
            b = cast(Tensor, self.bias)
            bias_part = m[:, -1].reshape(b.shape)
            if b.grad is None:
                b.grad = bias_part.to(b.dtype).clone()
            else:
                b.grad.copy_(bias_part)

    def pack_preconditioned(self) -> Tensor:
        """``precond_grad`` flattened with ``kl_term`` appended (``preconditioned_numel``);
        a layer without one this step (no gradient) packs zeros and :data:`NO_GRADIENT`."""
        if self.precond_grad is None or self.kl_term is None:
            w = self.weight
            out = torch.zeros(self.preconditioned_numel, dtype=w.dtype, device=w.device)
            out[-1] = NO_GRADIENT
            return out
        kl = self.kl_term.reshape(1).to(self.precond_grad.dtype)
        return torch.cat([self.precond_grad.reshape(-1), kl])

    def unpack_preconditioned(self, flat: Tensor) -> None:
        """Inverse of :meth:`pack_preconditioned` (views into ``flat``)."""
        numel = self.dim_g * self.dim_a
        if flat.numel() != numel + 1:
            raise ValueError(
                f"layer {self.name!r}: packed preconditioned gradient has {flat.numel()} "
                f"elements, expected {numel + 1}"
            )
        self.precond_grad = flat[:numel].view(self.dim_g, self.dim_a)
        self.kl_term = flat[numel]

    @property
    def preconditioned_numel(self) -> int:
        return self.dim_g * self.dim_a + 1

    # ------------------------------------------------------------------ inverse state
    def inverse_names(self) -> tuple[str, ...]:
        """Attribute names of this layer's inverse state for its inverse method."""
        return _INVERSE_STATE[self.inverse_method]

    def inverse_shapes(self) -> tuple[tuple[int, ...], ...]:
        a, g = self.dim_a, self.dim_g
        shapes = {"qa": (a, a), "qg": (g, g), "da": (a,), "dg": (g,), "a_inv": (a, a),
                  "g_inv": (g, g)}
        return tuple(shapes[n] for n in self.inverse_names())

    @property
    def has_inverse(self) -> bool:
        return all(getattr(self, n) is not None for n in self.inverse_names())

    def inverse_buffers(
        self, *, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> list[Tensor]:
        """The inverse-state tensors, allocated (uninitialised) where missing.

        A rank that receives a layer's inverse by broadcast calls this and broadcasts into
        the returned tensors in place.  Missing tensors take ``dtype``/``device`` (default:
        the weight's device and the factor dtype).
        """
        w = self.weight
        dtype = dtype or factor_dtype(w.dtype)
        device = device or w.device
        out = []
        for attr, shape in zip(self.inverse_names(), self.inverse_shapes()):
            t = getattr(self, attr)
            if t is None:
                t = torch.empty(shape, dtype=dtype, device=device)
                setattr(self, attr, t)
            out.append(t)
        return out

    # --------------------------------------------------------------- sizes and FLOPs
    def factor_numel(self) -> int:
        return sum(f.numel for f in self.factors())

    def factor_flops(self, x: Tensor, grad_output: Tensor) -> float:
        """FLOPs of :meth:`compute_batch_factors` for this input and output gradient."""
        rows = grad_output.numel() // self.dim_g
        return self._input_moments_flops(x, rows) + 2.0 * rows * self.dim_g**2

    def _input_moments_flops(self, x: Tensor, rows: int) -> float:
        d = self.dim_a - int(self.has_bias)
        return 2.0 * rows * d * d

    def inverse_flops(self) -> float:
        """Nominal FLOPs of one inverse: ~9n³ per symmetric eigendecomposition with
        eigenvectors, ~n³ per Cholesky factorisation plus inverse."""
        a, g = self.dim_a, self.dim_g
        coeff = 9.0 if self.inverse_method == "eigen" else 1.0
        return coeff * (a**3 + g**3)

    def precondition_flops(self) -> float:
        a, g = self.dim_a, self.dim_g
        gemms = 4.0 if self.inverse_method == "eigen" else 2.0
        return gemms * a * g * (a + g)


class LinearLayer(KFACLayer):
    """``nn.Linear``: every leading position of the input is a row.

    The examples (N, which scales G) are counted along the input's first dimension, or,
    with ``batch_first=False``, along its second for an input of three or more dimensions:
    ``[T, N, F]``, as ``nn.Transformer`` and ``nn.MultiheadAttention`` take it by default.
    Counted along T, G would come out T/N times too large, and the damping that much weaker.
    """

    kind = "linear"

    def __init__(self, *, name: str, module: nn.Module, inverse_method: str,
                 batch_first: bool = True) -> None:
        super().__init__(name=name, module=module, inverse_method=inverse_method)
        self.batch_first = bool(batch_first)

    def _examples(self, x: Tensor) -> int:
        if not self.batch_first and x.dim() > 2:
            return int(x.shape[1])
        return super()._examples(x)

    def _input_moments(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        rows = x.reshape(-1, x.shape[-1])
        return rows.t() @ rows, rows.sum(dim=0), int(rows.shape[0])

    def _g_rows(self, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1]).t()


class Conv2dLayer(KFACLayer):
    """``nn.Conv2d`` (groups=1): every spatial output position of every example is a row."""

    kind = "conv2d"

    def __init__(self, *, name: str, module: nn.Module, inverse_method: str) -> None:
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            raise ValueError(f"layer {name!r}: only nn.Conv2d with groups=1 is supported")
        super().__init__(name=name, module=module, inverse_method=inverse_method)

    def _examples(self, x: Tensor) -> int:
        return 1 if x.dim() == 3 else int(x.shape[0])  # unbatched input: [C, H, W]

    def _input_moments(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        m = cast(nn.Conv2d, self.module)
        if m.kernel_size[0] * m.kernel_size[1] > 1:
            return conv_factors.patch_moments(x, m)
        xp = conv_factors.padded_input(x, m)  # 1x1 kernel: patches are (strided) pixels
        xp = xp[:, :, :: m.stride[0], :: m.stride[1]]
        rows = xp.transpose(0, 1).reshape(xp.shape[1], -1)
        return rows @ rows.t(), rows.sum(dim=1), int(rows.shape[1])

    def _input_moments_flops(self, x: Tensor, rows: int) -> float:
        m = cast(nn.Conv2d, self.module)
        if m.kernel_size[0] * m.kernel_size[1] > 1:
            return conv_factors.patch_moments_flops(tuple(x.shape), m)
        return super()._input_moments_flops(x, rows)

    def _g_rows(self, g: Tensor) -> Tensor:
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.transpose(0, 1).reshape(g.shape[1], -1)


def _assemble_a(gram: Tensor, total: Tensor | None, rows: int) -> Tensor:
    """``(1/R) [Σ aaᵀ, Σ a; Σ aᵀ, R]`` (the bias block only when ``total`` is given)."""
    if total is None:
        return gram / rows
    d = gram.shape[0]
    out = gram.new_empty(d + 1, d + 1)
    out[:d, :d] = gram
    out[:d, d] = total
    out[d, :d] = total
    out[d, d] = float(rows)
    return out.div_(rows)


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def is_kfac_layer(module: nn.Module) -> bool:
    """Does K-FAC precondition ``module`` as a Kronecker-factored layer: an ``nn.Linear``, or
    an ``nn.Conv2d`` with ``groups=1``?

    ``nn.MultiheadAttention``'s ``out_proj`` (a ``NonDynamicallyQuantizableLinear``) is not
    one: the attention multiplies by its weight directly and never calls it, so no hook would
    fire; it is left to the first-order step like any other parameter.  (Whether the weight
    trains is the caller's question.)
    """
    if isinstance(module, nn.Linear):
        return type(module).__name__ != "NonDynamicallyQuantizableLinear"
    return isinstance(module, nn.Conv2d) and module.groups == 1
