"""Distributed K-FAC strategies and :func:`make_strategy`, the one way to build them by name.

>>> make_strategy("kaisa", grad_worker_fraction=0.5, comm_dtype="bf16", symmetric=True)
>>> make_strategy("spngd", fused=True)
"""
from __future__ import annotations

from typing import Any

from kfacperf.kfac.comm import CommOptions
from kfacperf.kfac.strategies.base import DistributedStrategy, ModelMismatchError
from kfacperf.kfac.strategies.kaisa import KAISAStrategy
from kfacperf.kfac.strategies.spngd import SPNGDStrategy
from kfacperf.kfac.strategy import LocalStrategy, Strategy
from kfacperf.vocab import KAISA, LOCAL, OPTIMIZER_KFAC_STRATEGIES, SGD, SPNGD

STRATEGY_NAMES: tuple[str, ...] = OPTIMIZER_KFAC_STRATEGIES
"""K-FAC strategy names (``sgd`` is an optimizer, not a K-FAC strategy)."""

_COMM_KEYS = ("comm_dtype", "symmetric", "bucket_cap_mb")
_OPTIONS: dict[str, tuple[str, ...]] = {
    LOCAL: (),
    SPNGD: _COMM_KEYS + ("fused", "check_model"),
    KAISA: _COMM_KEYS + ("grad_worker_fraction", "average_gradients", "check_model"),
}


def make_strategy(name: str, **options: Any) -> Strategy:
    """The strategy called ``name`` with ``options``; unknown names/options are errors.

    Options: ``comm_dtype`` ("fp32"/"fp16"/"bf16", factors only), ``symmetric`` (upper-
    triangle packing), ``bucket_cap_mb`` (10**6 bytes; 0 = no bucketing); spngd: ``fused``;
    kaisa: ``grad_worker_fraction``, ``average_gradients``; both: ``check_model``.
    """
    if name == SGD:
        raise ValueError(
            "'sgd' is the first-order baseline (optimizer 'sgd' with DDP), not a K-FAC "
            f"strategy; K-FAC strategies: {', '.join(STRATEGY_NAMES)}"
        )
    if name not in _OPTIONS:
        raise ValueError(
            f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGY_NAMES)}"
        )
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(_OPTIONS[name]) or '(none)'}"
        )
    if name == LOCAL:
        return LocalStrategy()
    comm = CommOptions(
        dtype=options.pop("comm_dtype", "fp32"),
        symmetric=options.pop("symmetric", False),
        bucket_cap_mb=options.pop("bucket_cap_mb", 25.0),
    )
    if name == SPNGD:
        return SPNGDStrategy(comm_options=comm, **options)
    return KAISAStrategy(comm_options=comm, **options)


__all__ = [
    "STRATEGY_NAMES", "DistributedStrategy", "KAISAStrategy", "ModelMismatchError",
    "SPNGDStrategy", "make_strategy",
]
