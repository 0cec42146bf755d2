"""Communication building blocks of the distributed strategies.

* :class:`CommOptions`: factor precision (fp32/fp16/bf16), symmetric upper-triangle packing,
  bucket size.
* :func:`pack_symmetric` / :func:`unpack_symmetric`: a symmetric ``n x n`` matrix as its
  ``n(n+1)/2`` upper-triangle entries.
* :class:`AllReduceBuckets`: flatten tensors into buckets of at most ``bucket_cap_mb`` and
  all-reduce each asynchronously.
* :func:`reduce_scatter_v`, :func:`all_gather_v`, :func:`broadcast`: asynchronous collectives
  that return a :class:`Pending` (waited on explicitly, never inside a getter).

**Byte accounting** (the ``bytes`` column of comm events): the payload of the *logical*
collective, in the dtype sent —

* all-reduce: the size of the buffer reduced (each bucket is one event);
* reduce-scatter-v: the size of the whole input buffer (= the sum of every rank's block);
* all-gather-v: the size of the whole output buffer (= the sum of every rank's block);
* broadcast: the size of the tensor broadcast.

These are the sizes nccl-tests reports as "size"; cost models turn them into time.

**Uneven blocks.** reduce-scatter-v uses the list form of ``dist.reduce_scatter`` with
per-rank blocks of their true sizes (a real -v collective: gloo in this torch implements it
natively, NCCL as grouped reduces).  gloo's ``all_gather`` rejects uneven blocks, so on gloo
all-gather-v pads every block to the largest one and trims after; the recorded bytes stay
the logical (unpadded) payload.  On NCCL the list form takes uneven blocks directly.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kfacperf import vocab as S
from kfacperf.buckets import bucket_label
from kfacperf.profiler.timer import NULL_TIMER, Timer

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}
COMM_DTYPES: dict[str, torch.dtype] = {name: _TORCH_DTYPES[name] for name in S.COMM_DTYPES}
"""The factor communication precisions (:data:`kfacperf.vocab.COMM_DTYPES`) as torch dtypes."""


@dataclass(frozen=True, kw_only=True)
class CommOptions:
    """How factors travel: precision, triangle packing, bucket size (MB = 10**6 bytes).

    ``bucket_cap_mb=0`` sends each tensor alone (no bucketing).
    """

    dtype: str = "fp32"
    symmetric: bool = False
    bucket_cap_mb: float = 25.0

    def __post_init__(self) -> None:
        S.check_choice("comm dtype", self.dtype, S.COMM_DTYPES)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if isinstance(self.bucket_cap_mb, bool) or not self.bucket_cap_mb >= 0:
            raise ValueError(f"bucket_cap_mb must be >= 0, got {self.bucket_cap_mb!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return COMM_DTYPES[self.dtype]

    @property
    def bucket_cap_bytes(self) -> int:
        return int(self.bucket_cap_mb * 1_000_000)

    def factor_numel(self, n: int, count: int = 1) -> int:
        """Elements sent for ``count`` symmetric ``n x n`` factors."""
        return count * (n * (n + 1) // 2 if self.symmetric else n * n)

    def factor_bytes(self, n: int, count: int = 1) -> int:
        return self.factor_numel(n, count) * elem_size(self.torch_dtype)


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


_TRIU: dict[tuple[int, str], Tensor] = {}


def _triu_flat_index(n: int, device: torch.device) -> Tensor:
    key = (n, str(device))
    idx = _TRIU.get(key)
    if idx is None:
        r, c = torch.triu_indices(n, n, device=device)
        idx = r * n + c
        _TRIU[key] = idx
    return idx


def pack_symmetric(m: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of square ``m``, row by row; of a stack
    ``[count, n, n]``, each matrix's triangle in turn (one flat tensor)."""
    if m.dim() not in (2, 3) or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"expected a square matrix or a stack of them, got shape "
                         f"{tuple(m.shape)}")
    n = m.shape[-1]
    rows = m.reshape(-1, n * n)
    return rows.index_select(1, _triu_flat_index(n, m.device)).reshape(-1)


def unpack_symmetric(flat: Tensor, n: int, count: int = 0) -> Tensor:
    """The symmetric ``n x n`` matrix whose upper triangle is ``flat``; with ``count`` >= 1,
    the ``[count, n, n]`` stack packed by :func:`pack_symmetric`."""
    tri = n * (n + 1) // 2
    if flat.numel() != tri * max(count, 1):
        what = (f"triangles of {count} {n}x{n} matrices" if count
                else f"triangle of a {n}x{n} matrix")
        raise ValueError(f"{flat.numel()} elements cannot be the {what}")
    out = flat.new_zeros(max(count, 1), n * n)
    out.index_copy_(1, _triu_flat_index(n, flat.device), flat.view(-1, tri))
    m = out.view(-1, n, n)
    m = m + m.triu(1).transpose(1, 2)
    return m if count else m[0]


def encode_factor(m: Tensor, opts: CommOptions) -> Tensor:
    """A factor (``n x n``, or a ``[count, n, n]`` stack) as a new flat tensor to send
    (packed and/or cast; never a view of ``m``)."""
    if opts.symmetric:
        return pack_symmetric(m).to(opts.torch_dtype)
    return m.reshape(-1).to(opts.torch_dtype, copy=True)


def decode_factor(flat: Tensor, n: int, opts: CommOptions, dtype: torch.dtype,
                  count: int = 1) -> Tensor:
    """Inverse of :func:`encode_factor`, back in ``dtype``; ``count`` > 1 for a stack."""
    flat = flat.to(dtype)
    stack = count if count > 1 else 0
    if opts.symmetric:
        return unpack_symmetric(flat, n, stack)
    return flat.view(count, n, n) if stack else flat.view(n, n)


class CollectiveError(RuntimeError):
    """A collective failed (typically: a peer rank died or the group timed out)."""


class Pending:
    """An in-flight collective; :meth:`wait` blocks, then runs its finishing step once."""

    def __init__(
        self, work: Any, what: str, finish: Callable[[], Any] | None = None
    ) -> None:
        self._work = work
        self._what = what
        self._finish = finish
        self._done = False
        self._value: Any = None

    def wait(self) -> Any:
        if not self._done:
            if self._work is not None:
                try:
                    self._work.wait()
                except RuntimeError as exc:
                    raise CollectiveError(collective_failure_message(self._what, exc)) from exc
            self._value = self._finish() if self._finish is not None else None
            self._done = True
        return self._value


def collective_failure_message(what: str, exc: BaseException) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return (
        f"rank {rank}: collective {what} failed; a peer rank probably died or stopped "
        f"responding within the process-group timeout ({exc})"
    )


_BACKEND_FAILURE_MARKERS = (
    "gloo", "NCCL", "ProcessGroup", "Connection closed", "Connection reset", "imed out",
    "peer rank",
)


def looks_like_collective_failure(exc: BaseException) -> bool:
    """Does ``exc`` (raised by torch.distributed or DDP) report a failed collective?

    Used to turn errors raised inside DDP (bucket rebuilds, its all-reduce) into a
    :class:`CollectiveError` that says which rank saw it; other errors pass through.
    """
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _BACKEND_FAILURE_MARKERS)


def _check_rank_failure(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RuntimeError as exc:
        raise CollectiveError(collective_failure_message(what, exc)) from exc


def all_reduce(
    t: Tensor, *, stage: str, layer: str = "", timer: Timer = NULL_TIMER,
    group: Any = None, average: bool = True,
) -> Pending:
    """Asynchronous in-place sum (or mean over the group) of ``t``.

    The mean is taken by scaling before the reduction, so fp16 sums do not overflow.
    """
    size = dist.get_world_size(group)
    if average and size > 1:
        t.div_(size)
    mark = timer.issue_mark()
    work = _check_rank_failure(
        f"all_reduce[{stage}]",
        lambda: dist.all_reduce(t, group=group, async_op=True),
    )
    timer.async_comm(stage, layer, nbytes(t), work, issued_at=mark)
    return Pending(work, f"all_reduce[{stage}:{layer}]", lambda: t)


def broadcast(
    t: Tensor, src: int, *, stage: str, layer: str = "", timer: Timer = NULL_TIMER,
    group: Any = None,
) -> Pending:
    """Asynchronous broadcast of ``t`` from global rank ``src`` to ``group``."""
    mark = timer.issue_mark()
    work = _check_rank_failure(
        f"broadcast[{stage}]",
        lambda: dist.broadcast(t, src=src, group=group, async_op=True),
    )
    timer.async_comm(stage, layer, nbytes(t), work, issued_at=mark)
    return Pending(work, f"broadcast[{stage}:{layer}]", lambda: t)


def reduce_scatter_v(
    blocks: Sequence[Tensor], *, stage: str, layer: str = "", timer: Timer = NULL_TIMER,
    group: Any = None, average: bool = True,
) -> Pending:
    """Rank r receives the sum (or mean) over ranks of ``blocks[r]``; blocks may differ in size.

    ``blocks`` has one flat tensor per rank of ``group`` (in group-rank order), all of one
    dtype; they are scaled in place when averaging.  ``wait()`` returns this rank's block.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(blocks) != world:
        raise ValueError(f"reduce_scatter_v needs {world} blocks, got {len(blocks)}")
    if average and world > 1:
        for b in blocks:
            b.div_(world)
    out = torch.empty_like(blocks[rank])
    mark = timer.issue_mark()
    work = _check_rank_failure(
        f"reduce_scatter[{stage}]",
        lambda: dist.reduce_scatter(out, list(blocks), group=group, async_op=True),
    )
    timer.async_comm(stage, layer, sum(nbytes(b) for b in blocks), work, issued_at=mark)
    return Pending(work, f"reduce_scatter_v[{stage}:{layer}]", lambda: out)


def all_gather_v(
    local: Tensor, sizes: Sequence[int], *, stage: str, layer: str = "",
    timer: Timer = NULL_TIMER, group: Any = None,
) -> Pending:
    """Every rank receives every rank's flat block; ``sizes[r]`` is group-rank r's size.

    ``wait()`` returns the list of blocks in group-rank order.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(sizes) != world or local.numel() != sizes[rank]:
        raise ValueError(
            f"all_gather_v: sizes {list(sizes)} do not match world {world} / "
            f"local block of {local.numel()} elements on rank {rank}"
        )
    logical = sum(sizes) * local.element_size()
    uneven = len(set(sizes)) > 1
    if uneven and dist.get_backend(group) == "gloo":
        width = max(sizes)
        padded = local.new_zeros(width)
        padded[: local.numel()] = local
        outs = [local.new_empty(width) for _ in range(world)]
        mark = timer.issue_mark()
        work = _check_rank_failure(
            f"all_gather[{stage}]",
            lambda: dist.all_gather(outs, padded, group=group, async_op=True),
        )
        timer.async_comm(stage, layer, logical, work, issued_at=mark)
        return Pending(
            work, f"all_gather_v[{stage}:{layer}]",
            lambda: [o[:n] for o, n in zip(outs, sizes)],
        )
    outs = [local.new_empty(n) for n in sizes]
    mark = timer.issue_mark()
    work = _check_rank_failure(
        f"all_gather[{stage}]", lambda: dist.all_gather(outs, local, group=group, async_op=True)
    )
    timer.async_comm(stage, layer, logical, work, issued_at=mark)
    return Pending(work, f"all_gather_v[{stage}:{layer}]", lambda: outs)


class AllReduceBuckets:
    """Averages many flat tensors with few all-reduces.

    :meth:`add` queues a flat tensor under a key; when the queued bytes reach the cap the
    bucket is flattened and all-reduced asynchronously (one comm event labelled with the
    bucket's layers).  :meth:`flush` sends the rest; :meth:`wait` returns ``key -> averaged
    flat tensor``.  A tensor larger than the cap travels alone.
    """

    def __init__(
        self, *, stage: str, cap_bytes: int, timer: Timer = NULL_TIMER, group: Any = None,
        average: bool = True,
    ) -> None:
        self._stage = stage
        self._cap = cap_bytes
        self._timer = timer
        self._group = group
        self._average = average
        self._queued: list[tuple[Any, str, Tensor]] = []
        self._queued_bytes = 0
        self._inflight: list[tuple[Pending, list[tuple[Any, int]]]] = []

    def add(self, key: Any, label: str, flat: Tensor) -> None:
        size = nbytes(flat)
        if self._queued and self._queued_bytes + size > self._cap:
            self.flush()
        self._queued.append((key, label, flat.reshape(-1)))
        self._queued_bytes += size
        if self._queued_bytes >= self._cap:
            self.flush()

    def flush(self) -> None:
        if not self._queued:
            return
        items, self._queued, self._queued_bytes = self._queued, [], 0
        buf = items[0][2] if len(items) == 1 else torch.cat([t for _, _, t in items])
        labels = list(dict.fromkeys(lbl for _, lbl, _ in items))
        pending = all_reduce(
            buf, stage=self._stage, layer=bucket_label(labels), timer=self._timer,
            group=self._group, average=self._average,
        )
        self._inflight.append((pending, [(k, t.numel()) for k, _, t in items]))

    def wait(self) -> dict[Any, Tensor]:
        self.flush()
        out: dict[Any, Tensor] = {}
        for pending, keys in self._inflight:
            buf = pending.wait()
            offset = 0
            for key, n in keys:
                out[key] = buf[offset: offset + n]
                offset += n
        self._inflight = []
        return out
