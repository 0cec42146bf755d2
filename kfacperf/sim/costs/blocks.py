"""A layer's Fisher block as the simulator counts it: the symmetric matrices it keeps.

The sizes are the real optimizer's (``kfacperf.kfac.layers`` and ``kfacperf.kfac.batchnorm``):

* a Kronecker-factored layer (Linear, Conv2d) keeps A (``dim_a x dim_a``) and G
  (``dim_g x dim_g``); its inverse state is their eigenvectors and eigenvalues (``eigen``)
  or their two damped inverses (``cholesky``);
* a BatchNorm layer of C channels (``dim_g = C``, ``dim_a = 2``) keeps, unit-wise, C
  matrices 2 x 2 whose inverse state is always their C damped inverses, or, full, one
  2C x 2C matrix inverted like a factor.

Statistics travel as upper triangles when packed (``symmetric``), damped inverses too,
eigenvectors never.  A layer's placement cost is the sum of ``count * n**3`` over its
matrices (:func:`kfacperf.sim.graphs.placement.blocks_cost` of :func:`stacks`).
"""
from __future__ import annotations

from kfacperf import vocab

KRONECKER = "kronecker"
FORMS: tuple[str, ...] = (KRONECKER, vocab.BN_UNIT, vocab.BN_FULL)

Stacks = tuple[tuple[int, int], ...]
"""``(n, count)``: ``count`` symmetric matrices of side ``n``."""


def triangle(n: int, symmetric: bool) -> int:
    """Elements of one ``n x n`` symmetric matrix as sent: ``n(n+1)/2`` when packed."""
    return n * (n + 1) // 2 if symmetric else n * n


def block_form(kind: str, bn_blocks: str) -> str:
    """The form of a layer of ``kind`` under ``bn_blocks``."""
    if kind != "batchnorm":
        return KRONECKER
    if bn_blocks not in (vocab.BN_UNIT, vocab.BN_FULL):
        raise ValueError(f"a batchnorm layer is a Fisher block only with bn_blocks 'unit' or "
                         f"'full', got {bn_blocks!r}")
    return bn_blocks


def stacks(form: str, dim_a: int, dim_g: int) -> Stacks:
    """The matrices of a layer's statistics (a BatchNorm layer: ``dim_g`` = C)."""
    if form == KRONECKER:
        return ((dim_a, 1), (dim_g, 1))
    if form == vocab.BN_UNIT:
        return ((2, dim_g),)
    if form == vocab.BN_FULL:
        return ((2 * dim_g, 1),)
    raise ValueError(f"unknown block form {form!r}; known: {', '.join(FORMS)}")


def statistic_elements(form: str, dim_a: int, dim_g: int, symmetric: bool) -> int:
    """Elements of a layer's statistics as sent (A and G, or its BatchNorm block)."""
    return sum(count * triangle(n, symmetric) for n, count in stacks(form, dim_a, dim_g))


def stored_elements(form: str, dim_a: int, dim_g: int) -> int:
    """Elements of a layer's running-average statistics as kept (full matrices)."""
    return sum(count * n * n for n, count in stacks(form, dim_a, dim_g))


def inverse_elements(form: str, dim_a: int, dim_g: int, method: str, symmetric: bool) -> int:
    """Elements of a layer's inverse state as sent (see the module docstring)."""
    total = 0
    for n, count in stacks(form, dim_a, dim_g):
        if method == "eigen" and form != vocab.BN_UNIT:
            total += count * (n * n + n)  # eigenvectors (never packed) and eigenvalues
        else:
            total += count * triangle(n, symmetric)
    return total
