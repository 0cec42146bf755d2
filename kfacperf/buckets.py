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
    """Split ``(key, bytes)`` items, in order, into buckets of at least ``cap_bytes``.

    A bucket is closed by the item that makes it reach the cap (as DDP closes its gradient
    buckets), so every bucket but the last holds at least ``cap_bytes`` and ``cap_bytes=0``
    gives one bucket per item.  Fewer, larger buckets matter at scale, where each collective
    pays a latency that grows with the ranks (closing a bucket before an item would overflow
    it made SP-NGD's predicted ResNet-50 step at 4,096 H100s 21 % longer).  Every key lands
    in exactly one bucket, in the order given.
    """
    if cap_bytes < 0:
        raise ValueError(f"cap_bytes must be >= 0, got {cap_bytes}")
    buckets: list[list[K]] = []
    current: list[K] = []
    size = 0
    for key, nbytes in items:
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
