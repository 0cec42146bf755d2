"""The data-parallel gradient all-reduce: ``DistributedDataParallel`` with a timing comm hook.

The SGD baseline and KAISA both average gradients this way, so their ``grad_comm`` events
come from the same code: DDP's buckets (filled in reverse layer order during backward, each
all-reduced as soon as it is full, overlapping the rest of the backward pass) are all-reduced
by :func:`timed_allreduce_hook`, which records each bucket's all-reduce on the timer as one
``grad_comm`` event with the bucket's size in bytes.
"""
# No ``from __future__ import annotations`` here: DDP checks the comm hook's annotations
# against the real classes, not strings.
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfacperf.kfac.comm import CollectiveError, collective_failure_message
from kfacperf.profiler.timer import NULL_TIMER, Timer
from kfacperf.vocab import GRAD_COMM


@dataclass
class HookState:
    """What the comm hook needs: the timer and the group gradients are averaged over."""

    timer: Timer
    group: Any | None = None


def timed_allreduce_hook(
    state: HookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average one gradient bucket over the group and time it as ``grad_comm``.

    The same arithmetic as DDP's default hook (scale by 1/P, then sum).
    """
    buf = bucket.buffer()
    world = dist.get_world_size(state.group)
    buf.div_(world)
    mark = state.timer.issue_mark()
    work = dist.all_reduce(buf, group=state.group, async_op=True)
    state.timer.async_comm(GRAD_COMM, "", buf.numel() * buf.element_size(), work,
                           issued_at=mark)

    def done(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        try:
            return fut.value()[0]
        except RuntimeError as exc:
            raise CollectiveError(collective_failure_message("all_reduce[grad_comm]", exc)
                                  ) from exc

    fut: torch.futures.Future[list[torch.Tensor]] = work.get_future()
    return fut.then(done)


def wrap_ddp(
    model: nn.Module,
    *,
    timer: Timer = NULL_TIMER,
    bucket_cap_mb: float = 25.0,
    sync_buffers: bool = False,
    device: torch.device | None = None,
    group: Any = None,
) -> DistributedDataParallel:
    """Wrap ``model`` in DDP with the timing hook.

    DDP broadcasts rank 0's parameters (and buffers) at construction, so every rank starts
    from the same weights.  ``sync_buffers`` (DDP's per-forward buffer broadcast) defaults to
    False so that the K-FAC strategies (which never broadcast BatchNorm statistics) and the
    baseline communicate the same things.
    """
    if not dist.is_initialized():
        raise RuntimeError("wrap_ddp needs an initialised process group (init_distributed())")
    if bucket_cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    device_ids = [device] if device is not None and device.type == "cuda" else None
    ddp = DistributedDataParallel(
        model,
        device_ids=device_ids,
        bucket_cap_mb=bucket_cap_mb,
        forward_sync_buffers=sync_buffers,
        process_group=group,
    )
    ddp.register_comm_hook(HookState(timer=timer, group=group), timed_allreduce_hook)
    return ddp
