"""The Monte-Carlo Fisher: statistics from labels sampled from the model's predictive distribution.

With ``fisher="mc"`` (SP-NGD's ``1mc``) the K-FAC statistics are not taken from the true
labels' backward (the *empirical* Fisher) but from one extra backward pass of the loss of
labels ``ŷ ~ p(y | x; θ)``, one sample per example: the output gradients of that pass give the
G factors and the BatchNorm per-example gradients (the A factors, inputs of the forward pass,
are the same for both).  The true labels' backward still gives the gradient.

For the workloads' loss, cross-entropy over logits, ``p(y | x)`` is ``softmax(logits)`` along
the class dimension (dimension 1, as :func:`torch.nn.functional.cross_entropy` reads it).  A
loss whose predictive distribution is not known here cannot be sampled: :class:`MonteCarloFisher`
refuses it at construction.  A loss function can declare itself categorical by carrying the
attribute ``predictive_distribution = "categorical"`` (as ``Workload.loss_fn`` does).

**Determinism.**  Labels are drawn by inverse-CDF sampling from uniforms of a CPU generator
seeded by ``(seed, step)``.  The uniforms are drawn for the whole global batch (``world_size``
equal shares, rank r's rows ``r·m .. (r+1)·m - 1``), so P ranks with their slices of a global
batch draw exactly the labels one process draws for the whole batch.

**Cost.**  The pass is a backward to every trainable parameter through ``torch.autograd.grad``,
so it costs one whole backward, like the true one; it does not touch ``.grad`` and does not
trigger DistributedDataParallel's gradient all-reduce (that hooks on gradient accumulation,
which ``autograd.grad`` skips).  The graph is kept for the true backward that follows.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CATEGORICAL = "categorical"


def predictive_distribution(loss_fn: Callable[..., Any]) -> str | None:
    """``"categorical"`` for cross-entropy over logits (and losses that say so), else None."""
    if loss_fn is F.cross_entropy:
        return CATEGORICAL
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return CATEGORICAL
    declared = getattr(loss_fn, "predictive_distribution", None)
    return declared if declared == CATEGORICAL else None


def _generator(seed: int, step: int) -> torch.Generator:
    digest = hashlib.blake2b(f"mc-fisher:{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)


class MonteCarloFisher:
    """Samples labels from the model's outputs and runs the Monte-Carlo backward pass."""

    def __init__(
        self, loss_fn: Callable[..., Any], *, params: Iterable[Tensor], seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__
        if predictive_distribution(loss_fn) != CATEGORICAL:
            raise ValueError(
                f"fisher 'mc' samples labels from the model's predictive distribution, which "
                f"is defined here for cross-entropy over logits only; loss {name!r} is not "
                "one (use fisher 'emp', or give the loss function the attribute "
                "predictive_distribution = 'categorical' if it is a cross-entropy)"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.params = [p for p in params if p.requires_grad]
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def sample_targets(self, outputs: Tensor, *, step: int) -> Tensor:
        """One label per row of ``outputs`` (``[N, classes, ...]`` logits), int64."""
        if outputs.dim() < 2:
            raise ValueError(f"expected logits [N, classes, ...], got shape {tuple(outputs.shape)}")
        logits = outputs.detach().to(torch.float64).movedim(1, -1)
        classes = logits.shape[-1]
        cum = torch.softmax(logits.reshape(-1, classes), dim=-1).cumsum(dim=-1)
        rows = cum.shape[0]
        u = torch.rand(self.world_size * rows, generator=_generator(self.seed, step),
                       dtype=torch.float64)[self.rank * rows:(self.rank + 1) * rows]
        u = u.to(cum.device) * cum[:, -1]
        labels = torch.searchsorted(cum, u.unsqueeze(1), right=True).squeeze(1)
        return labels.clamp_(max=classes - 1).reshape(logits.shape[:-1])

    def backward(self, outputs: Tensor, *, step: int) -> None:
        """The backward of the sampled labels' mean cross-entropy (``.grad`` untouched)."""
        targets = self.sample_targets(outputs, step=step)
        loss = F.cross_entropy(outputs, targets, reduction="mean")
        torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
