"""One instrumented training step for every optimizer and strategy.

:class:`Trainer` puts the pieces together the way the profiler and the demo run them:

* ``optimizer="sgd"``: the first-order optimizer alone; on several ranks the model is wrapped
  in DDP (:func:`kfacperf.kfac.ddp.wrap_ddp`, bucketed all-reduce overlapped with backward,
  each bucket a ``grad_comm`` event).
* ``optimizer="kfac"``: the same first-order optimizer after
  :class:`~kfacperf.kfac.preconditioner.KFACPreconditioner` with the named strategy.  KAISA's
  gradients are averaged by DDP; SP-NGD reduces them itself (no DDP); ``local`` is the
  single-process strategy.

A step is ``timer.step_begin`` → ``forward`` (forward + loss, under ``torch.autocast`` when
an ``autocast_dtype`` is given) → ``backward`` (zero the grads, ``loss.backward()``) → the
preconditioner's own stages → ``update`` (``optimizer.step()``) → ``timer.step_end``.  With
``fisher="mc"``, factor steps run the Monte-Carlo pass (:meth:`KFACPreconditioner.mc_backward`)
between forward and backward, timed as a second ``backward`` row whose ``layer`` is
``"mc_fisher"`` (:data:`kfacperf.vocab.MC_FISHER_PASS`); the statistics (``factor_compute``
rows) are nested in that row, not in the true backward.  After :meth:`Trainer.train_step`
returns, each parameter's ``.grad`` holds the update direction the optimizer used.

The first-order optimizer is SGD with the config's settings unless the caller passes its
own (a training loop instrumented by :func:`kfacperf.instrument` does); K-FAC's KL clipping
then reads the learning rate from that optimizer at every step, so a schedule is followed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kfacperf import vocab as stages
from kfacperf.kfac.comm import (
    CollectiveError,
    collective_failure_message,
    looks_like_collective_failure,
)
from kfacperf.kfac.ddp import wrap_ddp
from kfacperf.kfac.fisher import MonteCarloFisher
from kfacperf.kfac.preconditioner import KFACPreconditioner
from kfacperf.kfac.strategies import make_strategy
from kfacperf.profiler.timer import NULL_TIMER, Timer
from kfacperf.runtime import distributed
from kfacperf.runtime.settings import OptimizerSettings
from kfacperf.sim.graphs.strategies.common import MAX_BUCKET_MB


@dataclass(frozen=True, kw_only=True)
class TrainConfig(OptimizerSettings):
    """Optimizer, strategy and their settings (the keys run.json records)."""

    optimizer: str = stages.KFAC
    strategy: str = stages.LOCAL

    def __post_init__(self) -> None:
        stages.check_choice("optimizer", self.optimizer, stages.OPTIMIZERS)
        if self.optimizer == stages.SGD and self.strategy not in (stages.SGD, stages.LOCAL):
            raise ValueError(
                f"optimizer 'sgd' takes no K-FAC strategy (got {self.strategy!r}); "
                "its gradients are averaged by DDP"
            )
        if self.optimizer == stages.KFAC:
            stages.check_choice("strategy", self.strategy, stages.OPTIMIZER_KFAC_STRATEGIES)
        for key in ("lr", "bucket_cap_mb"):
            if not 0 <= getattr(self, key) < float("inf"):
                raise ValueError(f"{key} must be a finite number >= 0, got {getattr(self, key)!r}")
        if self.bucket_cap_mb > MAX_BUCKET_MB:
            raise ValueError(f"bucket_cap_mb must be at most {MAX_BUCKET_MB:g}, "
                             f"got {self.bucket_cap_mb!r}")
        stages.check_choice("bn_blocks", self.bn_blocks, stages.BN_BLOCKS)
        stages.check_choice("fisher", self.fisher, stages.FISHER_TYPES)

    @property
    def strategy_name(self) -> str:
        """``sgd`` for the baseline, else the K-FAC strategy (run.json's ``strategy``)."""
        return stages.SGD if self.optimizer == stages.SGD else self.strategy


class Trainer:
    """Runs instrumented training steps of ``model`` on this process's share of the batch.

    ``seed`` seeds the labels sampled for the Monte-Carlo Fisher (``fisher="mc"``).
    ``autocast_dtype`` (e.g. ``torch.bfloat16``): run the forward pass and the loss under
    ``torch.autocast`` with that dtype (see :mod:`kfacperf.runtime.precision`); None: as they are.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
        config: TrainConfig,
        timer: Timer = NULL_TIMER,
        seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.config = config
        self.timer = timer
        self.autocast_dtype = autocast_dtype
        self.loss_fn = loss_fn
        self.model = model
        self.info = distributed.describe()
        world = self.info.world_size
        strategy = config.strategy_name
        if world > 1 and strategy == stages.LOCAL:
            raise ValueError(
                f"strategy 'local' runs on one process but the world has {world} ranks; "
                "use 'spngd' or 'kaisa' (K-FAC) or optimizer 'sgd'"
            )
        use_ddp = world > 1 and strategy in (stages.SGD, stages.KAISA)
        self.net: nn.Module = (
            wrap_ddp(model, timer=timer, bucket_cap_mb=config.bucket_cap_mb or 25.0,
                     device=self.info.device)
            if use_ddp else model
        )
        self.optimizer = optimizer if optimizer is not None else torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.preconditioner: KFACPreconditioner | None = None
        if config.optimizer == stages.KFAC:
            first_order = self.optimizer
            self.preconditioner = KFACPreconditioner(
                self.net,
                damping=config.damping,
                lr=config.lr if optimizer is None
                else (lambda _step: first_order.param_groups[0]["lr"]),
                factor_interval=config.factor_interval,
                inverse_interval=config.inverse_interval,
                inverse_method=config.inverse_method,
                factor_decay=config.factor_decay,
                kl_clip=config.kl_clip,
                strategy=make_strategy(strategy, **_strategy_options(config)),
                timer=timer,
                bn_blocks=config.bn_blocks,
                fisher=config.fisher,
                batch_first=config.batch_first,
            )
        self.mc_fisher: MonteCarloFisher | None = None
        if self.preconditioner is not None and config.fisher == stages.FISHER_MC:
            if loss_fn is None:
                raise ValueError("the Monte-Carlo Fisher needs the loss function (its extra "
                                 "backward pass samples labels from the outputs); give "
                                 "loss_fn, or use the empirical Fisher")
            self.mc_fisher = MonteCarloFisher(loss_fn, params=model.parameters(), seed=seed,
                                              rank=self.info.rank,
                                              world_size=self.info.world_size)
        self.steps = 0

    def train_step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One step on this rank's ``(inputs, targets)``; returns the (local) loss, detached.

        On several ranks, a collective that fails (a peer died, or did not answer within
        the process-group timeout) raises :class:`~kfacperf.kfac.comm.CollectiveError`.
        """
        with self.collective_errors(self.steps):
            return self._step(inputs, targets)

    @contextlib.contextmanager
    def collective_errors(self, step: int) -> Iterator[None]:
        """Turn a failed collective (a peer died, or did not answer within the process-group
        timeout) into a :class:`~kfacperf.kfac.comm.CollectiveError` naming ``step``."""
        try:
            yield
        except CollectiveError:
            raise
        except RuntimeError as exc:
            if self.info.world_size > 1 and looks_like_collective_failure(exc):
                raise CollectiveError(
                    collective_failure_message(f"in training step {step}", exc)
                ) from exc
            raise

    def update(self) -> None:
        """The step after backward: the preconditioner's stages (K-FAC), then ``update``
        (``optimizer.step()``)."""
        if self.preconditioner is not None:
            self.preconditioner.step()
        with self.timer.stage(stages.UPDATE):
            self.optimizer.step()

    def _step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        if self.loss_fn is None:
            raise ValueError("Trainer.train_step needs a loss_fn")
        timer = self.timer
        timer.step_begin(self.steps)
        pc = self.preconditioner
        with timer.stage(stages.FORWARD), self._autocast(inputs):
            outputs = self.net(inputs)
            loss = self.loss_fn(outputs, targets)
        if self.mc_fisher is not None and pc is not None and pc.factor_step:
            with timer.stage(stages.BACKWARD, stages.MC_FISHER_PASS):
                pc.mc_backward(outputs, self.mc_fisher)
        with timer.stage(stages.BACKWARD):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.update()
        timer.step_end()
        self.steps += 1
        return loss.detach()

    def _autocast(self, inputs: Tensor) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=inputs.device.type, dtype=self.autocast_dtype)


def _strategy_options(config: TrainConfig) -> dict[str, Any]:
    if config.strategy == stages.LOCAL:
        return {}
    opts: dict[str, Any] = {
        "comm_dtype": config.comm_dtype, "symmetric": config.symmetric,
        "bucket_cap_mb": config.bucket_cap_mb,
    }
    if config.strategy == stages.SPNGD:
        opts["fused"] = config.fused
    if config.strategy == stages.KAISA:
        opts["grad_worker_fraction"] = config.grad_worker_fraction
    return opts
