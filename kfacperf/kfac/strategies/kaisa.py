"""KAISA (Pauloski et al.): factors everywhere, inverses placed, gradient workers per layer.

With ``gw = grad_worker_fraction * P`` gradient workers per layer (see
:mod:`kfacperf.kfac.assignment` for the grid of grad-worker columns and receiver rows):

* ``factor_comm`` — every layer's A and G (a BatchNorm block: its Fisher block) are
  all-reduced (mean) in buckets of up to ``bucket_cap_mb`` fixed at set-up, last layer first,
  each sent once the backward hooks have filled it, so they overlap the backward pass (a
  layer a rank skipped travels as zeros with a presence flag:
  :mod:`kfacperf.kfac.factor_exchange`); triangle packing and the factor precision apply.
* ``inverse`` — on the layer's inverse worker only (the only rank that keeps its running
  averages).
* ``inverse_comm`` — when ``gw > 1``: the inverse state (eigenvectors and eigenvalues, or the
  two damped inverses — triangle-packed when ``symmetric``) is broadcast from the inverse
  worker to the layer's column; one broadcast per (column, inverse worker) carries all of that
  worker's layers (a layer that never had statistics, not yet used in a forward, has no
  inverse state: it is passed through everywhere).  Inverse state always travels in its own
  precision (fp32).
* ``grad_comm`` — gradients are averaged by DistributedDataParallel (wrap the model with
  :func:`kfacperf.kfac.ddp.wrap_ddp`), or, with ``average_gradients=True``, all-reduced here
  (with one presence flag per layer, see
  :class:`~kfacperf.kfac.strategies.base.DistributedStrategy`).
* ``precondition`` — on the layer's ``gw`` gradient workers.
* ``precond_comm`` — when ``gw < P``: in each receiver row, the row's gradient worker of a
  layer broadcasts the preconditioned gradient (and KL term) to the rest of the row; one
  broadcast per (row, source rank) carries all of that source's layers.

``f = 1`` is COMM-OPT, ``f = 1/P`` MEM-OPT, in between HYBRID-OPT.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from kfacperf import vocab as stages
from kfacperf.buckets import bucket_label
from kfacperf.kfac import comm, factor_exchange
from kfacperf.kfac.assignment import (
    Assignment,
    LayerShape,
    grad_worker_groups,
    grad_workers_count,
    kaisa_assignment,
    receiver_groups,
)
from kfacperf.kfac.strategies.base import DistributedStrategy, grad_matrix, present_grads

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from kfacperf.kfac.layers import KFACLayer
    from kfacperf.profiler.timer import Timer


class KAISAStrategy(DistributedStrategy):
    """KAISA with a gradient-worker fraction; see the module docstring."""

    name = "kaisa"

    def __init__(
        self, *, grad_worker_fraction: float = 1.0, comm_options: comm.CommOptions | None = None,
        average_gradients: bool = False, check_model: bool = True,
    ) -> None:
        super().__init__(comm=comm_options, check_model=check_model)
        if isinstance(grad_worker_fraction, bool) or not isinstance(
            grad_worker_fraction, (int, float)
        ) or not 0.0 < grad_worker_fraction <= 1.0:
            raise ValueError(
                f"grad_worker_fraction must be in (0, 1], got {grad_worker_fraction!r}"
            )
        self.grad_worker_fraction = float(grad_worker_fraction)
        self.average_gradients = bool(average_gradients)
        self.grad_workers = 1
        self._exchange = factor_exchange.BucketQueue([], self.comm, self._send_factors)
        self._factor_pending: list[tuple[comm.Pending, list[KFACLayer]]] = []
        self._column: tuple[int, ...] = (0,)
        self._row: tuple[int, ...] = (0,)
        self._column_group: Any = None
        self._row_group: Any = None
        # Layers whose statistics have been exchanged (the same on every rank): those that
        # have inverse state on their inverse worker (one first used later has none yet).
        self._factored: set[str] = set()

    def make_assignment(self, shapes: list[LayerShape], world_size: int) -> Assignment:
        return kaisa_assignment(shapes, world_size, self.grad_worker_fraction)

    def settings(self) -> str:
        return f"{super().settings()} f={self.grad_worker_fraction}"

    def setup(
        self, model: nn.Module, layers: Mapping[str, KFACLayer], *, timer: Timer
    ) -> None:
        if dist.is_available() and dist.is_initialized():
            # Fail before any collective, identically on every rank.
            grad_workers_count(dist.get_world_size(), self.grad_worker_fraction)
        super().setup(model, layers, timer=timer)
        self.grad_workers = grad_workers_count(self.world_size, self.grad_worker_fraction)
        if not self.distributed:
            return
        self._exchange = factor_exchange.BucketQueue(
            list(layers.values())[::-1], self.comm, self._send_factors)
        columns = grad_worker_groups(self.world_size, self.grad_workers)
        rows = receiver_groups(self.world_size, self.grad_workers)
        # new_group is collective over the world: every rank creates every group, in order.
        for col in columns:
            g = self._subgroup(col)
            if self.rank in col:
                self._column, self._column_group = col, g
        for row in rows:
            g = self._subgroup(row)
            if self.rank in row:
                self._row, self._row_group = row, g

    def _subgroup(self, ranks: tuple[int, ...]) -> Any:
        if len(ranks) == self.world_size:
            return self.group
        if len(ranks) == 1:
            return None  # nothing to communicate
        return dist.new_group(list(ranks))

    # ---------------------------------------------------------------- factors
    def on_factor_batch(self, layer: KFACLayer) -> None:
        if not self.distributed:
            return
        assert layer.has_batch_stats
        self._exchange.ready(layer)

    def _send_factors(self, bucket: list[KFACLayer]) -> None:
        buf = factor_exchange.encode(bucket, self._exchange.present, self.comm)
        pending = comm.all_reduce(buf, stage=stages.FACTOR_COMM, timer=self.timer,
                                  layer=bucket_label([l.name for l in bucket]), group=self.group)
        self._factor_pending.append((pending, bucket))

    def finish_factors(self) -> None:
        if not self.distributed:
            return
        self._exchange.flush()
        # A layer this rank lacks is read on the host only where its answer matters: to
        # keep it, or to learn whether it has been exchanged at all (``_factored``).
        absent = {n for n in self._exchange.absent()
                  if n not in self._factored or self.needs_factors(n)}
        for pending, bucket in self._factor_pending:
            gone = factor_exchange.decode(
                bucket, pending.wait(), self.comm, absent_here=absent,
                keep=lambda l: self.needs_factors(l.name))
            self._factored.update(l.name for l in bucket if l.name not in gone)
        self._factor_pending = []
        self._exchange.reset()

    # ---------------------------------------------------------------- inverses
    def _packable(self, attr: str) -> bool:
        """Symmetric inverse state (damped inverses: the Cholesky method's, and every
        unit-wise BatchNorm block's) travels as triangles when asked."""
        return self.comm.symmetric and attr in ("a_inv", "g_inv", "f_inv")

    def share_inverses(self) -> None:
        if not self.distributed or len(self._column) == 1:
            return
        assert self.assignment is not None
        inverse_worker = self.assignment.inverse_worker
        factored = self._factored
        self._broadcast_layers(
            self._column, lambda l: inverse_worker[l.name] if l.name in factored else -1,
            stage=stages.INVERSE_COMM, group=self._column_group, pack=self._encode_inverse,
            numel=self._inverse_numel, unpack=self._decode_inverse,
            dtype=lambda l: _state_dtype(l.weight),
        )

    def _broadcast_layers(
        self, sources: tuple[int, ...], source_of: Callable[[KFACLayer], int], *, stage: str,
        group: Any, pack: Callable[[KFACLayer], Tensor], numel: Callable[[KFACLayer], int],
        unpack: Callable[[KFACLayer, Tensor], None], dtype: Callable[[KFACLayer], torch.dtype],
    ) -> None:
        """One broadcast per rank in ``sources`` carrying all layers it is ``source_of``.

        The buffer is in the ``dtype`` of the source's first layer there, on the source and
        on every receiver alike.  All broadcasts are in flight at once; then every rank,
        the source included, ``unpack``s each layer from its ``numel``-long slice of the
        source's buffer, in layer order: the source keeps what the receivers get, values
        and memory layout alike.  (Its own copy may differ in both: cast, or laid out
        column-major as ``linalg.eigh`` and ``cholesky_inverse`` return their results, and
        a matrix product rounds differently with a transposed operand, so the ranks of a
        column would precondition one gradient into slightly different updates and their
        weights drift apart.)
        """
        inflight = []
        for src in sources:
            layers = [l for l in self.layers.values() if source_of(l) == src]
            if not layers:
                continue
            kind, device = dtype(layers[0]), layers[0].weight.device
            if src == self.rank:
                buf = torch.cat([pack(l) for l in layers]).to(kind)
            else:
                buf = torch.empty(sum(numel(l) for l in layers), dtype=kind, device=device)
            pending = comm.broadcast(buf, src, stage=stage,
                                     layer=bucket_label([l.name for l in layers]),
                                     timer=self.timer, group=group)
            inflight.append((layers, pending))
        for layers, pending in inflight:
            buf = pending.wait()
            offset = 0
            for layer in layers:
                n = numel(layer)
                unpack(layer, buf[offset:offset + n])
                offset += n

    def _inverse_numel(self, layer: KFACLayer) -> int:
        total = 0
        for attr, shape in zip(layer.inverse_names(), layer.inverse_shapes()):
            total += _triangles(shape) if self._packable(attr) else _numel(shape)
        return total

    def _encode_inverse(self, layer: KFACLayer) -> Tensor:
        parts = []
        for attr in layer.inverse_names():
            t = getattr(layer, attr)
            if self._packable(attr):  # the sender, too, then rebuilds it (_broadcast_layers)
                parts.append(comm.pack_symmetric(t))
            else:
                parts.append(t.reshape(-1))
        return torch.cat(parts)

    def _decode_inverse(self, layer: KFACLayer, flat: Tensor) -> None:
        offset = 0
        for attr, shape in zip(layer.inverse_names(), layer.inverse_shapes()):
            if self._packable(attr):
                size = _triangles(shape)
                setattr(layer, attr, comm.unpack_symmetric(flat[offset:offset + size],
                                                            shape[-1], _stack(shape)))
            else:
                size = _numel(shape)
                setattr(layer, attr, flat[offset:offset + size].view(shape).clone())
            offset += size

    # ------------------------------------------------------------- gradients
    def reduce_gradients(self) -> None:
        if not self.distributed:
            return
        layers = list(self.layers.values())
        if not self.average_gradients:  # averaged by DDP: no gradient here is none anywhere
            self.note_absent(layers)
            return
        buckets = comm.AllReduceBuckets(
            stage=stages.GRAD_COMM, cap_bytes=self.comm.bucket_cap_bytes, timer=self.timer,
            group=self.group,
        )
        for layer in layers:
            buckets.add(layer.name, "", grad_matrix(layer).reshape(-1))
        buckets.add(_FLAGS, "", self.grad_flags(layers))
        others = present_grads(self.other_params)
        for i, (_, grad) in enumerate(others):
            buckets.add(i, "", grad.reshape(-1))
        flat = buckets.wait()
        for layer in layers:
            layer.grad = flat[layer.name].view(layer.dim_g, layer.dim_a)
        self.note_flags(layers, flat[_FLAGS])
        for i, (_, grad) in enumerate(others):
            grad.copy_(flat[i].view_as(grad))

    # ----------------------------------------------------- preconditioned gradients
    def share_preconditioned(self) -> None:
        if not self.distributed:
            return
        if self.grad_workers < self.world_size:
            assert self.assignment is not None
            assignment, rank = self.assignment, self.rank
            self._broadcast_layers(
                self._row, lambda l: assignment.grad_source(l.name, rank),
                stage=stages.PRECOND_COMM, group=self._row_group,
                pack=lambda l: l.pack_preconditioned(), numel=lambda l: l.preconditioned_numel,
                unpack=lambda l, flat: l.unpack_preconditioned(flat),
                dtype=lambda l: self.grad_dtype,
            )
        self.drop_absent()


_FLAGS = ("presence flags",)
"""The key of the layers' presence flags among the gradients all-reduced (not a layer name,
not a parameter index)."""


def _stack(shape: tuple[int, ...]) -> int:
    """Matrices in a ``[count, n, n]`` stack; 0 for a plain ``n x n`` matrix."""
    return shape[0] if len(shape) == 3 else 0


def _triangles(shape: tuple[int, ...]) -> int:
    n = shape[-1]
    return max(_stack(shape), 1) * n * (n + 1) // 2


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _state_dtype(weight: Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
