"""A factor step's batch statistics, exchanged in buckets every rank agrees on in advance.

The distributed strategies average each layer's batch statistics over the ranks.  Sending a
bucket as soon as the backward hooks have filled it overlaps that traffic with the rest of the
backward pass, but every rank must send the same buckets, with the same layers in the same
order, or the collectives pair up wrongly (a hang, or one layer's numbers averaged into
another's).  A bucket made of whatever layers happened to arrive does not guarantee that: a
layer that a rank's forward skipped (a branch its examples did not take, a dropped layer)
has no statistics there.

So the buckets are fixed at set-up (:func:`kfacperf.buckets.plan_buckets`, whole layers in
the order their hooks are expected to fire: last registered first), and :class:`BucketQueue`
sends them in that order, each once all of its layers are ready; the buckets still waiting
at the end of the backward pass go out with zeros for the layers this rank has no statistics
of.  Every layer's numbers are followed, at the end of its group, by one presence flag per
layer (1 where this rank had them), averaged with them: the mean over ranks of the flag is
the share k/P of ranks that had the layer, so dividing the averaged statistics by it gives
their mean over the k ranks that had any (a rank's statistic is already a mean over its
examples).  A flag of 0 means no rank had the layer: it gets no statistics this step, as in
one process, and its running averages are left alone.  Only a rank that lacks a layer reads
any flag on the host (as DDP reads its map of used parameters); the others scale on the
device.

The simulator replays the same buckets (:func:`kfacperf.kfac.comm.CommOptions` sizes, the
flag included), so a predicted factor step sends what the real one sends.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kfacperf.buckets import plan_buckets
from kfacperf.kfac import comm
from kfacperf.kfac.layers import factor_dtype

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.kfac.layers import KFACLayer


def layer_numel(layer: KFACLayer, opts: comm.CommOptions) -> int:
    """Elements a layer's statistics take in an exchange, without its flag."""
    return sum(opts.factor_numel(f.n, f.count) for f in layer.factors())


def layer_bytes(layer: KFACLayer, opts: comm.CommOptions) -> int:
    """Bytes a layer takes in an exchange: its statistics and its presence flag."""
    return (layer_numel(layer, opts) + 1) * comm.elem_size(opts.torch_dtype)


def batch_dtype(layer: KFACLayer) -> torch.dtype:
    """The dtype of a layer's batch statistics, also on a rank that computed none."""
    for f in layer.factors():
        for attr in (f.batch_attr, f.factor_attr):
            t: Tensor | None = getattr(layer, attr)
            if t is not None:
                return t.dtype
    return factor_dtype(layer.weight.dtype)


def encode(layers: Sequence[KFACLayer], present: Callable[[KFACLayer], bool],
           opts: comm.CommOptions) -> Tensor:
    """``layers``' statistics (zeros for those not ``present``), then one flag per layer."""
    dtype, device = opts.torch_dtype, layers[0].weight.device
    parts = []
    for layer in layers:
        if present(layer):
            parts += [comm.encode_factor(getattr(layer, f.batch_attr), opts)
                      for f in layer.factors()]
        else:
            parts.append(torch.zeros(layer_numel(layer, opts), dtype=dtype, device=device))
    # made on the device: a copy from host memory would make the host wait for the stream
    flags = torch.ones(len(layers), dtype=dtype, device=device)
    for i, layer in enumerate(layers):
        if not present(layer):
            flags[i] = 0.0
    parts.append(flags)
    return torch.cat(parts)


def decode(layers: Sequence[KFACLayer], flat: Tensor, opts: comm.CommOptions, *,
           keep: Callable[[KFACLayer], bool], absent_here: set[str]) -> set[str]:
    """Set the batch statistics of the ``layers`` this rank ``keep``s from ``flat`` (as
    :func:`encode` laid them out, averaged over the ranks): the mean over the ranks that
    had each.  A kept layer no rank had gets None.  Returns the names, among ``absent_here``
    (this rank had no statistics of them), of the layers no rank had."""
    n_stats = sum(layer_numel(l, opts) for l in layers)
    flags = flat[n_stats:].float()
    absent_everywhere: set[str] = set()
    asked = [i for i, l in enumerate(layers) if l.name in absent_here]
    if asked:  # a host read, only on a rank that lacks a layer
        shares = flags[asked].tolist()
        absent_everywhere = {layers[i].name for i, s in zip(asked, shares) if s <= 0.0}
    scale = torch.where(flags > 0, flags.reciprocal(), torch.zeros_like(flags))
    offset = 0
    for i, layer in enumerate(layers):
        kept = keep(layer)
        for f in layer.factors():
            size = opts.factor_numel(f.n, f.count)
            if kept:
                stat = None
                if layer.name not in absent_everywhere:
                    stat = comm.decode_factor(flat[offset:offset + size], f.n, opts,
                                              batch_dtype(layer), f.count)
                    stat = stat.mul(scale[i].to(stat.dtype))
                setattr(layer, f.batch_attr, stat)
            offset += size
    return absent_everywhere


class BucketQueue:
    """The buckets of one factor step, sent in plan order as their layers become ready.

    ``layers`` are in the order their hooks are expected to fire; ``send(bucket)`` launches
    one bucket's collective (it reads :meth:`present` to know which layers to zero).
    """

    def __init__(self, layers: Sequence[KFACLayer], opts: comm.CommOptions,
                 send: Callable[[list[KFACLayer]], None]) -> None:
        self.buckets: list[list[KFACLayer]] = plan_buckets(
            [(l, layer_bytes(l, opts)) for l in layers], opts.bucket_cap_bytes)
        self._send = send
        self._bucket_of = {l.name: i for i, b in enumerate(self.buckets) for l in b}
        self._ready: set[str] = set()
        self._next = 0

    def present(self, layer: KFACLayer) -> bool:
        """Has this rank the layer's statistics this step?"""
        return layer.name in self._ready

    def absent(self) -> set[str]:
        """The layers this rank has no statistics of this step."""
        return set(self._bucket_of) - self._ready

    def ready(self, layer: KFACLayer) -> None:
        """The layer's statistics were just computed: send every bucket now complete."""
        self._ready.add(layer.name)
        while (self._next < len(self.buckets)
               and all(l.name in self._ready for l in self.buckets[self._next])):
            self._next += 1
            self._send(self.buckets[self._next - 1])

    def flush(self) -> None:
        """Send the buckets still waiting (their missing layers as zeros)."""
        while self._next < len(self.buckets):
            self._next += 1
            self._send(self.buckets[self._next - 1])

    def reset(self) -> None:
        """Ready for the next factor step."""
        self._ready = set()
        self._next = 0
