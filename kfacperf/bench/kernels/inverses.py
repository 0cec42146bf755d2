"""Timings of the inverse kernels against matrix size: ``torch.linalg.eigh`` (the ``eigen``
method, one per Kronecker factor) and the ``cholesky`` method's per-factor work, on random
SPD inputs ``X X^T / n + I`` (well conditioned, eigenvalues in about [1, 5], like damped
factors).  Every size's result is checked (a residual in each record); a size predicted too
slow, or past the budget, is skipped and listed (:func:`~kfacperf.bench.kernels.plan.skip_reason`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from kfacperf.bench.kernels.plan import FULL_PLAN, Budget, KernelPlan, skip_reason
from kfacperf.bench.kernels.records import InverseTiming, Skipped, note_skipped
from kfacperf.bench.kernels.timing import CallTimer, measure

_DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16"}


def torch_dtype(name: str) -> Any:
    """``fp32``/``fp64``/``bf16`` as a torch dtype."""
    import torch

    try:
        return getattr(torch, _DTYPES[name])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}") from None


def random_spd(n: int, *, dtype: Any, device: Any, seed: int = 0) -> Any:
    """``X X^T / n + I`` for a Gaussian ``n x n`` ``X``, exactly symmetric (see the module
    docstring); computed with TF32 off."""
    import torch

    from kfacperf.runtime import precision

    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + n)
    with precision.float32_math("fp32"):
        x = torch.randn(n, n, generator=gen, dtype=dtype, device=device)
        a = (x @ x.T).div_(n)
    a = (a + a.T).mul_(0.5)
    a.diagonal().add_(1.0)
    return a


def _rel(num: Any, den: Any) -> float:
    import torch

    return float(torch.linalg.matrix_norm(num) / torch.linalg.matrix_norm(den))


def eigh_residual(a: Any, w: Any, q: Any) -> float:
    """``|A Q - Q diag(w)|_F / |A|_F`` (in float64)."""
    a, w, q = (t.double() for t in (a, w, q))
    return _rel(a @ q - q * w, a)


def inverse_residual(m: Any, m_inv: Any) -> float:
    """``|M M^-1 - I|_F / sqrt(n)`` (in float64)."""
    import torch

    m, m_inv = m.double(), m_inv.double()
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return float(torch.linalg.matrix_norm(m @ m_inv - eye)) / math.sqrt(m.shape[0])


def time_eigh(sizes: Iterable[int], *, dtype: str, device: Any, timer: CallTimer,
              plan: KernelPlan = FULL_PLAN, budget: Budget | None = None,
              skipped: list[Skipped] | None = None) -> list[InverseTiming]:
    """``torch.linalg.eigh`` of random SPD matrices, smallest size first (see the module
    docstring for skipping); the result of every size's last call is checked."""
    import torch

    budget = budget or Budget()
    out: list[InverseTiming] = []
    done: list[tuple[int, float]] = []
    for n in sizes:
        why = skip_reason(done, n, plan, budget)
        if why:
            note_skipped(skipped, "eigh", f"n={n} {dtype}", why)
            continue
        a = random_spd(n, dtype=torch_dtype(dtype), device=device)
        result: list[Any] = []

        def call(a: Any = a, result: list[Any] = result) -> None:
            result[:] = torch.linalg.eigh(a)

        t = measure(call, timer=timer, warmup=plan.warmup, repeats=plan.repeats,
                    min_repeats=plan.min_repeats, target_s=plan.target_s)
        w, q = result
        out.append(InverseTiming(op="eigh", n=n, dtype=dtype, timing=t,
                                 nominal_flops=9.0 * n**3, residual=eigh_residual(a, w, q)))
        done.append((n, t.median_us))
        del a, result, w, q
    return out


def time_cholesky(sizes: Iterable[int], *, dtype: str, device: Any, timer: CallTimer,
                  plan: KernelPlan = FULL_PLAN, budget: Budget | None = None,
                  skipped: list[Skipped] | None = None,
                  damping: float = 1e-3) -> list[InverseTiming]:
    """The cholesky method's per-factor work (``spd_inverse``) and its two kernels alone
    (``cholesky_ex``, ``cholesky_inverse``), per size; ``damping`` goes on the diagonal."""
    import torch

    from kfacperf.kfac.inverse import _spd_inverse

    budget = budget or Budget()
    out: list[InverseTiming] = []
    done: list[tuple[int, float]] = []
    for n in sizes:
        why = skip_reason(done, n, plan, budget, calls_per_size=3)
        if why:
            note_skipped(skipped, "cholesky", f"n={n} {dtype}", why)
            continue
        a = random_spd(n, dtype=torch_dtype(dtype), device=device)
        damp = torch.tensor(damping, dtype=a.dtype, device=a.device)
        m = a.clone()
        m.diagonal().add_(damp)
        chol, _ = torch.linalg.cholesky_ex(m)
        held: dict[str, Any] = {}

        def whole(a: Any = a, damp: Any = damp, held: dict[str, Any] = held) -> None:
            held["inv"] = _spd_inverse(a, damp)

        def factorise(m: Any = m, held: dict[str, Any] = held) -> None:
            held["chol"] = torch.linalg.cholesky_ex(m)[0]

        def invert(chol: Any = chol, held: dict[str, Any] = held) -> None:
            held["inv_only"] = torch.cholesky_inverse(chol)

        kw: dict[str, Any] = dict(timer=timer, warmup=plan.warmup, repeats=plan.repeats,
                                  min_repeats=plan.min_repeats, target_s=plan.target_s)
        t_whole, t_chol, t_inv = (measure(f, **kw) for f in (whole, factorise, invert))
        lower, md = held["chol"].double(), m.double()
        out += [
            InverseTiming(op="spd_inverse", n=n, dtype=dtype, timing=t_whole,
                          nominal_flops=float(n**3), residual=inverse_residual(m, held["inv"])),
            InverseTiming(op="cholesky_ex", n=n, dtype=dtype, timing=t_chol,
                          nominal_flops=n**3 / 3.0, residual=_rel(lower @ lower.T - md, md)),
            InverseTiming(op="cholesky_inverse", n=n, dtype=dtype, timing=t_inv,
                          nominal_flops=2.0 * n**3 / 3.0,
                          residual=inverse_residual(m, held["inv_only"])),
        ]
        done.append((n, t_whole.median_us))
        del a, m, chol, held, lower, md
    return out

