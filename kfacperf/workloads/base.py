"""The :class:`Workload` record and the deterministic data helpers every workload shares.

Determinism rules:

* ``build_model(seed=s)`` initialises parameters from ``torch.manual_seed(s)`` inside
  :func:`torch.random.fork_rng`, so it neither depends on nor disturbs the global RNG.
* ``make_batch(n, seed=s, step=k)`` draws from a private :class:`torch.Generator` seeded with a
  hash of ``(s, k)``.  The CPU generator keeps only the low 32 bits of a seed, so packing
  ``(s, k)`` into one integer (``s << 32 | k``) would silently ignore ``s``; hashing does not.
* A global batch of ``P * n`` examples sliced with :func:`rank_slice` gives rank ``r`` its
  share, so a P-process run and a single-process run of the same batch see the same data.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ModelFactory = Callable[[], nn.Module]
BatchSampler = Callable[[int, torch.Generator], "tuple[Tensor, Tensor]"]
LossFn = Callable[[Any, Tensor], Tensor]
"""``loss(outputs, targets)``: outputs are what the model returns (a tensor, or e.g. a tuple
of tensors for a model with several heads)."""
_M = TypeVar("_M", bound=nn.Module)


def data_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, step)``."""
    for label, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label} must be a non-negative int, got {value!r}")
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)


def seeded_build(factory: Callable[[], _M], seed: int) -> _M:
    """Call ``factory`` with the global RNG seeded by ``seed``, restoring the RNG afterwards."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def gaussian_classification(
    input_shape: tuple[int, ...], num_classes: int
) -> BatchSampler:
    """Sampler of N(0, 1) inputs of ``input_shape`` with uniformly random labels."""

    def sample(batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn((batch_size, *input_shape), generator=gen)
        y = torch.randint(0, num_classes, (batch_size,), generator=gen)
        return x, y

    return sample


@dataclass(frozen=True, kw_only=True, eq=False)
class Workload:
    """A model definition plus its synthetic data and loss.

    ``input_shape`` is the shape of one example (without the batch dimension);
    ``input_dtype`` is ``torch.float32`` for images/features and ``torch.int64`` for token ids.
    ``options`` records the keyword options the workload was built with (e.g. ``image_size``).
    ``loss`` is ``loss(outputs, targets)``; ``None`` is mean cross-entropy.
    """

    name: str
    description: str
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    num_classes: int
    default_batch_size: int
    model_factory: ModelFactory
    batch_sampler: BatchSampler
    options: Mapping[str, Any] = field(default_factory=dict)
    loss: LossFn | None = None

    def build_model(self, *, seed: int = 0) -> nn.Module:
        """A freshly initialised model; the same ``seed`` gives identical parameters."""
        return seeded_build(self.model_factory, seed)

    def make_batch(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        step: int = 0,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` for one step, a pure function of ``(batch_size, seed, step)``.

        Examples are drawn one generator stream per call, so example ``i`` of a batch of
        size ``n`` equals example ``i`` of a larger batch only for the same ``batch_size``;
        use :func:`rank_slice` on one global batch to split it across ranks.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        x, y = self.batch_sampler(batch_size, data_generator(seed, step))
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The workload's ``loss``; by default mean-reduced cross-entropy over the batch."""
        if self.loss is not None:
            return self.loss(outputs, targets)
        return F.cross_entropy(outputs, targets, reduction="mean")

    # Its model distribution is softmax(outputs): the Monte-Carlo Fisher may sample it
    # (kfacperf.kfac.fisher).
    loss_fn.predictive_distribution = "categorical"  # type: ignore[attr-defined]


def rank_slice(tensor: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous share of a global batch (dimension 0).

    The global batch must divide evenly by ``world_size``; otherwise ranks would train on
    different amounts of data and the single-process comparison would be wrong.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    total = tensor.shape[0]
    if total % world_size:
        raise ValueError(
            f"global batch of {total} does not divide into world_size={world_size} equal parts"
        )
    per = total // world_size
    return tensor[rank * per:(rank + 1) * per]
