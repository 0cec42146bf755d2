"""SP-NGD (Osawa et al.): every K-FAC layer has one owner rank.

Per step, on P ranks (``owner`` = :func:`~kfacperf.kfac.assignment.spngd_assignment`):

* ``factor_comm`` — reduce-scatter-v of the batch statistics: layers are bucketed up to
  ``bucket_cap_mb`` by a plan fixed at set-up (last layer first), each bucket sent once the
  backward hooks have filled it; each bucket is one reduce-scatter-v whose rank-r block holds
  the A and G (a BatchNorm block: its Fisher block; triangle-packed and cast when asked) of
  the bucket's layers owned by r, then their presence flags, so each owner receives the
  global mean of its layers' statistics while the backward pass continues (a layer a rank
  skipped travels as zeros: :mod:`kfacperf.kfac.factor_exchange`).  The
  blocks have their true, uneven sizes (the list form of ``reduce_scatter``), no padding.
* ``inverse``/``precondition`` — on the owner only.
* ``grad_comm`` — a reduce-scatter-v of the K-FAC layers' gradient matrices to their owners
  (each owner's block ends with one presence flag per layer, see
  :class:`~kfacperf.kfac.strategies.base.DistributedStrategy`), plus a bucketed all-reduce
  of the other parameters' gradients (BatchNorm, LayerNorm, embeddings), which every rank
  needs for its first-order update.
* ``precond_comm`` — an all-gather-v of every owner's preconditioned gradients (with their
  KL terms), after which every rank holds every layer's update.

``fused=True`` is the variant of the original implementation: on factor steps ONE all-reduce
of a packed buffer (every layer's factors and gradients and the other gradients) replaces the
two reduce-scatters and the all-reduce; it is recorded as a single ``factor_comm`` event whose
bytes are the whole buffer (factors and gradients).  On other steps the gradients travel in
one all-reduce (``grad_comm``).  Fused buffers are sent in fp32 unless the factor precision is
lower, in which case the factors go in a second buffer of their own.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kfacperf import vocab as stages
from kfacperf.buckets import bucket_label
from kfacperf.kfac import comm, factor_exchange
from kfacperf.kfac.assignment import Assignment, LayerShape, spngd_assignment
from kfacperf.kfac.strategies.base import DistributedStrategy, grad_matrix, present_grads
from kfacperf.profiler.timer import Timer

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.kfac.layers import KFACLayer


class SPNGDStrategy(DistributedStrategy):
    """Owner-based SP-NGD; see the module docstring."""

    name = "spngd"

    def __init__(
        self, *, comm_options: comm.CommOptions | None = None, fused: bool = False,
        check_model: bool = True,
    ) -> None:
        super().__init__(comm=comm_options, check_model=check_model)
        self.fused = bool(fused)
        self._exchange = factor_exchange.BucketQueue([], self.comm, self._send_factor_bucket)
        self._factor_pending: list[tuple[comm.Pending, list[KFACLayer]]] = []
        self._grads_reduced = False

    def make_assignment(self, shapes: list[LayerShape], world_size: int) -> Assignment:
        return spngd_assignment(shapes, world_size)

    def settings(self) -> str:
        return f"{super().settings()} fused={self.fused}"

    # ---------------------------------------------------------------- factors
    def setup(
        self, model: torch.nn.Module, layers: Mapping[str, KFACLayer], *, timer: Timer
    ) -> None:
        super().setup(model, layers, timer=timer)
        if self.distributed and not self.fused:
            self._exchange = factor_exchange.BucketQueue(
                list(layers.values())[::-1], self.comm, self._send_factor_bucket)

    def on_factor_batch(self, layer: KFACLayer) -> None:
        if not self.distributed or self.fused:
            return
        self._exchange.ready(layer)

    def _send_factor_bucket(self, bucket: list[KFACLayer]) -> None:
        assert self.assignment is not None
        owner = self.assignment.inverse_worker
        by_owner: dict[int, list[KFACLayer]] = {}
        for l in bucket:
            by_owner.setdefault(owner[l.name], []).append(l)
        parts = {r: [factor_exchange.encode(group, self._exchange.present, self.comm)]
                 for r, group in by_owner.items()}
        empty = torch.empty(0, dtype=self.comm.torch_dtype, device=bucket[0].weight.device)
        pending = comm.reduce_scatter_v(
            _blocks(parts, self.world_size, empty), stage=stages.FACTOR_COMM,
            layer=bucket_label([l.name for l in bucket]), timer=self.timer, group=self.group,
        )
        self._factor_pending.append((pending, by_owner.get(self.rank, [])))

    def finish_factors(self) -> None:
        if not self.distributed:
            return
        if self.fused:
            self._fused_allreduce()
            return
        self._exchange.flush()
        absent = self._exchange.absent()
        for pending, mine in self._factor_pending:
            flat = pending.wait()
            if mine:
                factor_exchange.decode(mine, flat, self.comm, keep=lambda l: True,
                                       absent_here=absent)
        self._factor_pending = []
        self._exchange.reset()

    # ------------------------------------------------------------- gradients
    def reduce_gradients(self) -> None:
        if not self.distributed:
            return
        if self._grads_reduced:  # done by the fused all-reduce of this factor step
            self._grads_reduced = False
            return
        if self.fused:
            self._fused_allreduce(with_factors=False)
            return
        by_owner = self._by_owner()
        in_order = [l for group in by_owner for l in group]
        flags = self.grad_flags(in_order).split([len(group) for group in by_owner])
        parts: dict[int, list[Tensor]] = {}
        for r, group in enumerate(by_owner):
            if group:  # the owner's gradient matrices, then their flags
                parts[r] = [grad_matrix(l).reshape(-1).to(self.grad_dtype)
                            for l in group] + [flags[r]]
        blocks = _blocks(parts, self.world_size, self._empty_grad())
        grads = comm.reduce_scatter_v(
            blocks, stage=stages.GRAD_COMM, timer=self.timer, group=self.group
        )
        others = self._reduce_other_grads()
        flat = grads.wait()
        offset = 0
        mine = by_owner[self.rank]
        for layer in mine:
            n = layer.dim_g * layer.dim_a
            layer.grad = flat[offset:offset + n].view(layer.dim_g, layer.dim_a)
            offset += n
        self.note_flags(mine, flat[offset:])
        if others is not None:
            others.wait()

    def _by_owner(self) -> list[list[KFACLayer]]:
        """Every rank's layers, in layer order."""
        assert self.assignment is not None
        owner = self.assignment.inverse_worker
        out: list[list[KFACLayer]] = [[] for _ in range(self.world_size)]
        for layer in self.layers.values():
            out[owner[layer.name]].append(layer)
        return out

    def _empty_grad(self) -> Tensor:
        w = next(iter(self.layers.values())).weight
        return torch.empty(0, dtype=self.grad_dtype, device=w.device)

    def _reduce_other_grads(self) -> _GradBuckets | None:
        """All-reduce (mean) the non-K-FAC gradients in place; returns the in-flight buckets."""
        params = present_grads(self.other_params)
        if not params:
            return None
        return _GradBuckets(params, cap_bytes=self.comm.bucket_cap_bytes, timer=self.timer,
                            group=self.group)

    def _fused_allreduce(self, *, with_factors: bool = True) -> None:
        """One all-reduce of factors (on factor steps), K-FAC gradients and other gradients."""
        layers = list(self.layers.values())
        other = present_grads(self.other_params)
        flags = self.grad_flags(layers)
        grad_parts = [grad_matrix(l).reshape(-1) for l in layers] + [flags] + [
            g.reshape(-1) for _, g in other
        ]
        absent = {l.name for l in layers if not l.has_batch_stats}
        fac_parts = ([factor_exchange.encode(layers, lambda l: l.name not in absent, self.comm)]
                     if with_factors else [])
        label = bucket_label([l.name for l in layers])
        n_fac = sum(p.numel() for p in fac_parts)
        if fac_parts and all(p.dtype == self.comm.torch_dtype for p in grad_parts):
            buf = torch.cat(fac_parts + grad_parts)
            comm.all_reduce(buf, stage=stages.FACTOR_COMM, layer=label, timer=self.timer,
                            group=self.group).wait()
            fac_flat, grad_flat = buf[:n_fac], buf[n_fac:]
        else:  # factors in a lower precision than the gradients: two buffers
            grad_flat = torch.cat(grad_parts)
            pending = [comm.all_reduce(grad_flat, stage=stages.GRAD_COMM, timer=self.timer,
                                       group=self.group)]
            fac_flat = torch.cat(fac_parts) if fac_parts else grad_flat[:0]
            if fac_parts:
                pending.append(comm.all_reduce(fac_flat, stage=stages.FACTOR_COMM, layer=label,
                                               timer=self.timer, group=self.group))
            for item in pending:
                item.wait()
        offset = 0
        for layer in layers:
            n = layer.dim_g * layer.dim_a
            layer.grad = grad_flat[offset:offset + n].view(layer.dim_g, layer.dim_a)
            offset += n
        self.note_flags(layers, grad_flat[offset:offset + len(layers)])
        offset += len(layers)
        for p, g in other:
            n = p.numel()
            g.copy_(grad_flat[offset:offset + n].view_as(p))
            offset += n
        if with_factors:
            factor_exchange.decode(layers, fac_flat, self.comm, absent_here=absent,
                                   keep=lambda l: self.needs_factors(l.name))
        self._grads_reduced = with_factors

    # ----------------------------------------------------- preconditioned gradients
    def share_preconditioned(self) -> None:
        if not self.distributed:
            return
        layers = list(self.layers.values())
        by_rank = self._by_owner()
        sizes = [sum(l.preconditioned_numel for l in group) for group in by_rank]
        mine = by_rank[self.rank]
        for layer in mine:
            if self.absent_here(layer.name):
                self.mark_no_gradient(layer)
        local = (torch.cat([l.pack_preconditioned() for l in mine]) if mine
                 else self._empty_grad())
        if local.dtype != self.grad_dtype:  # every rank's block in one dtype; keep what we send
            local = local.to(self.grad_dtype)
            offset = 0
            for layer in mine:
                n = layer.preconditioned_numel
                layer.unpack_preconditioned(local[offset:offset + n])
                offset += n
        gathered = comm.all_gather_v(
            local, sizes, stage=stages.PRECOND_COMM, timer=self.timer, group=self.group,
            layer=bucket_label([l.name for l in layers]),
        ).wait()
        for r, group in enumerate(by_rank):
            if r == self.rank:
                continue
            offset = 0
            for layer in group:
                n = layer.preconditioned_numel
                layer.unpack_preconditioned(gathered[r][offset:offset + n])
                self.note_received(layer)
                offset += n
        self.drop_absent()


def _blocks(parts: dict[int, list[Tensor]], world: int, empty: Tensor) -> list[Tensor]:
    """One flat block per rank (ranks without parts share one empty tensor: O(P) cheap)."""
    return [torch.cat(parts[r]) if r in parts else empty for r in range(world)]


class _GradBuckets:
    """Bucketed in-place mean of parameter gradients over the group (``grad_comm``)."""

    def __init__(self, params: list[tuple[torch.nn.Parameter, Tensor]], *, cap_bytes: int,
                 timer: Timer, group: object) -> None:
        self._params = params
        self._buckets = comm.AllReduceBuckets(
            stage=stages.GRAD_COMM, cap_bytes=cap_bytes, timer=timer, group=group
        )
        for i, (_, grad) in enumerate(params):
            self._buckets.add(i, "", grad.reshape(-1))
        self._buckets.flush()

    def wait(self) -> None:
        flat = self._buckets.wait()
        for i, (_, grad) in enumerate(self._params):
            grad.copy_(flat[i].view_as(grad))
