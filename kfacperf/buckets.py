"""How layers are grouped into communication buckets: one rule for the optimizer and the model.

Both the distributed K-FAC strategies (:mod:`kfacperf.kfac.factor_exchange`) and the
simulator (:mod:`kfacperf.sim.graphs.strategies.common`) use these functions, so a predicted
step sends the buckets the real one sends.  No torch here: the simulator must not need it.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def plan_buckets(items: Sequence[tuple[K, int]], cap_bytes: int) -> list[list[K]]:
    """Split ``(key, bytes)`` items, in order, into buckets of about ``cap_bytes``.

    An item that would take a non-empty bucket past the cap starts a new one; a bucket that
    reaches the cap is closed.  So an item larger than the cap travels alone, and
    ``cap_bytes=0`` gives one bucket per item.  Every key lands in exactly one bucket, in the
    order given.
    """
    if cap_bytes < 0:
        raise ValueError(f"cap_bytes must be >= 0, got {cap_bytes}")
    buckets: list[list[K]] = []
    current: list[K] = []
    size = 0
    for key, nbytes in items:
        if current and size + nbytes > cap_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
        if size >= cap_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def bucket_label(names: Sequence[str]) -> str:
    """The ``layer`` of a bucketed comm event: its layers joined by ``+``, each once."""
    return "+".join(dict.fromkeys(names))
