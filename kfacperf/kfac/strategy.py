"""The interface between the preconditioner's maths and where its work and communication happen.

:class:`~kfacperf.kfac.preconditioner.KFACPreconditioner` does the maths (batch statistics,
running averages, inverses, preconditioning, KL-clipping) and asks a :class:`Strategy` *which
rank* does which part and *how* data moves between ranks.  The single-process default is
:class:`LocalStrategy`: every rank does everything and nothing is communicated.  Distributed
strategies (``spngd``, ``kaisa``) live in :mod:`kfacperf.kfac.strategies` and implement the same
protocol.

Call order within one optimizer step (``loss.backward(); precond.step(); opt.step()``)::

    backward (factor steps only, last layer first, from each layer's backward hook):
        layer.a_batch, layer.g_batch <- local batch statistics   [timer: factor_compute]
        strategy.on_factor_batch(layer)          # may launch async factor communication
    precond.step():
        grad_io.load_grads(every layer)          # layer.grad <- g x a matrix of .grad (+bias)
        if factor step:
            strategy.finish_factors()            # afterwards a_batch/g_batch are GLOBAL on
                                                 # every rank with needs_factors(name)
            running average on layers with needs_factors(name)   [timer: factor_compute]
            every layer's a_batch/g_batch released (None until the next factor step)
        if inverse step:
            inverse of layers with inverts(name)                  [timer: inverse]
            strategy.share_inverses()            # afterwards every rank with
                                                 # preconditions(name) holds the inverse state
        strategy.reduce_gradients()              # afterwards layer.grad is the GLOBAL average
                                                 # on every rank with preconditions(name), and
                                                 # non-K-FAC parameters' .grad are averaged
        precondition layers with preconditions(name)             [timer: precondition]
            -> layer.precond_grad, layer.kl_term
        strategy.share_preconditioned()          # afterwards EVERY rank holds every layer's
                                                 # precond_grad and kl_term (None, and grad
                                                 # None, where NO rank had a gradient)
        KL-clip scale from all kl_terms; grad_io.write_grads: scale * precond_grad into .grad

Rules every strategy follows:

* The preconditioner never communicates; the strategy never does maths other than reductions.
  Each collective is recorded by the strategy on the timer it receives in :meth:`setup`
  (``timer.async_comm`` for async handles, ``timer.stage`` for blocking ones) with its payload
  in bytes (:func:`kfacperf.kfac.comm.broadcast` and friends take it from the buffer they send).
* ``inverts(name)`` implies ``needs_factors(name)``; the same rank must not be asked to
  precondition a layer whose inverse it will not hold after :meth:`Strategy.share_inverses`.
* Answers of ``needs_factors``/``inverts``/``preconditions`` are fixed after :meth:`setup`.
* No ``.item()``, no host synchronisation other than waiting on communication handles
  (and, only on a rank that lacks some layer's statistics or gradient in a step, one small
  read of the reduced presence flags: :mod:`kfacperf.kfac.factor_exchange`).
* ``layer.grad`` is ``None`` for a layer whose weight got no gradient this step, and a
  layer with no inverse state yet (it never had factors) is passed through unchanged
  (``precond_grad`` is ``grad``).  A layer that got no gradient on ANY rank ends the step
  as it does locally: ``precond_grad`` and ``kl_term`` None on every rank, so its ``.grad``
  stays None; one that got a gradient on some ranks only gets the average over all ranks
  (zeros from the others).  Deciding this may read a per-layer flag on the host, once per
  step and only on a rank that lacks some layer's gradient, after waiting on the collective
  that carried it (see :class:`kfacperf.kfac.strategies.base.DistributedStrategy`).
* The batch statistics handed to :meth:`on_factor_batch` are *local means* over this rank's
  examples (see :mod:`kfacperf.kfac.layers` for the exact convention); with equal per-rank
  batches the global statistic is the average over ranks, so an all-reduce/reduce with
  ``AVG`` (or ``SUM`` then ``/ world_size``) is the right reduction.  Gradients under DDP are
  already averaged when ``step()`` runs.

The layer state a strategy reads and writes is documented on
:class:`~kfacperf.kfac.layers.KFACLayer`: ``a_batch``/``g_batch`` (reduce in place or replace),
the inverse state via :meth:`KFACLayer.inverse_buffers` (broadcast into them in place),
``grad`` (reduce in place), ``precond_grad`` and ``kl_term`` (or, packed together,
:meth:`KFACLayer.pack_preconditioned` / :meth:`KFACLayer.unpack_preconditioned`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kfacperf import vocab as S
from kfacperf.profiler.timer import NULL_TIMER, Timer

if TYPE_CHECKING:  # pragma: no cover - import for annotations only
    from torch import nn

    from kfacperf.kfac.layers import KFACLayer


@runtime_checkable
class Strategy(Protocol):
    """Where each K-FAC stage runs and how its results move between ranks."""

    name: str
    """Strategy name as in DESIGN.md and run.json: ``"local"``, ``"spngd"``, ``"kaisa"``."""

    def setup(
        self, model: nn.Module, layers: Mapping[str, KFACLayer], *, timer: Timer
    ) -> None:
        """Called once by the preconditioner's constructor, after the layers are registered.

        ``layers`` is in forward (registration) order and identical on every rank.  Do the
        layer-to-rank assignment and any cross-rank validation here (e.g. that every rank
        registered the same layers with the same shapes).  ``model`` is the unwrapped module
        (for strategies that must also reduce the gradients of non-K-FAC parameters).
        """

    def on_factor_batch(self, layer: KFACLayer) -> None:
        """A layer's local ``a_batch``/``g_batch`` were just computed in the backward pass.

        Called on factor steps only, from the autograd hook (layers arrive last-to-first), so
        communication launched here overlaps the rest of the backward pass.  Must not block.
        """

    def finish_factors(self) -> None:
        """Complete the factor communication of this step.

        Afterwards, for every layer with ``needs_factors(name)``, ``layer.a_batch`` and
        ``layer.g_batch`` hold the statistics of the global batch.  Called on factor steps
        only, after ``layer.grad`` has been loaded (a fused factor+gradient exchange may also
        reduce ``layer.grad`` here and make :meth:`reduce_gradients` a no-op).
        """

    def needs_factors(self, name: str) -> bool:
        """Does this rank keep the running-average factors of layer ``name``?"""

    def inverts(self, name: str) -> bool:
        """Does this rank compute the inverse (eigen/Cholesky) of layer ``name``?"""

    def share_inverses(self) -> None:
        """Send inverse state from inverting ranks to the ranks that precondition.

        Called on inverse steps only, after the local inverses are computed.
        """

    def reduce_gradients(self) -> None:
        """Make ``layer.grad`` the global average where it is preconditioned.

        E.g. SP-NGD's reduce-scatter of gradients to owners (which also averages non-K-FAC
        parameter gradients); a no-op locally and under DDP.
        """

    def preconditions(self, name: str) -> bool:
        """Does this rank compute layer ``name``'s preconditioned gradient?"""

    def share_preconditioned(self) -> None:
        """Afterwards every rank holds every layer's ``precond_grad`` and ``kl_term`` (both
        None for a layer that got no gradient on any rank)."""


class LocalStrategy:
    """Single process (or every rank independently): everything local, nothing communicated.

    Also a convenient base class: a distributed strategy overrides only what differs.
    """

    name = S.LOCAL

    def __init__(self) -> None:
        self.layers: Mapping[str, KFACLayer] = {}
        self.timer: Timer = NULL_TIMER

    def setup(
        self, model: nn.Module, layers: Mapping[str, KFACLayer], *, timer: Timer
    ) -> None:
        self.layers = layers
        self.timer = timer

    def on_factor_batch(self, layer: KFACLayer) -> None:
        return None

    def finish_factors(self) -> None:
        return None

    def needs_factors(self, name: str) -> bool:
        return True

    def inverts(self, name: str) -> bool:
        return True

    def share_inverses(self) -> None:
        return None

    def reduce_gradients(self) -> None:
        return None

    def preconditions(self, name: str) -> bool:
        return True

    def share_preconditioned(self) -> None:
        return None
