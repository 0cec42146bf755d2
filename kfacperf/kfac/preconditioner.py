"""The K-FAC preconditioner: hooks, the step, and its placement through a :class:`Strategy`.

Use with any first-order optimizer::

    precond = KFACPreconditioner(model, damping=1e-3, lr=0.1)
    loss.backward(); precond.step(); optimizer.step()

``precond.step()`` replaces the ``.grad`` of every registered layer's weight (and bias) with
its preconditioned, KL-clipped gradient.  Registered layers: ``nn.Linear`` and ``nn.Conv2d``
with ``groups=1`` whose weight requires a gradient, and with ``bn_blocks="unit"`` or
``"full"`` every BatchNorm with trainable affine parameters (:mod:`kfacperf.kfac.batchnorm`).
Every other parameter (BatchNorm by default, LayerNorm, embeddings, grouped convolutions) is
left to the first-order optimizer and listed in :attr:`KFACPreconditioner.other_params` (and
logged) at construction.

``fisher="emp"`` (the empirical Fisher) captures the statistics in the backward pass of the
true labels.  With ``fisher="mc"`` they come from one extra backward pass with labels sampled
from the model's predictive distribution, run by :meth:`KFACPreconditioner.mc_backward` (see
:mod:`kfacperf.kfac.fisher`) between forward and the true backward on factor steps; only that
pass captures statistics, and the true backward gives the gradient.

Steps are counted by calls to :meth:`KFACPreconditioner.step`, starting at 0.  On step k the
forward/backward hooks compute batch statistics iff ``k % factor_interval == 0`` and the
inverses are recomputed iff ``k % inverse_interval == 0`` (so step 0 does both).  Only one
forward/backward per step is supported (a module called twice in a step keeps the
statistics of the call whose output gradient arrives last; :func:`kfacperf.instrument`
refuses it).  Two layers that share a parameter (tied weights) are refused at construction:
each would write its own preconditioned gradient into the one ``.grad``.  See
:mod:`kfacperf.kfac.layers` for the factor conventions and :mod:`kfacperf.kfac.inverse` for
the two inverse methods.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Union

import torch
from torch import Tensor, nn

from kfacperf import vocab as stages
from kfacperf.kfac import inverse
from kfacperf.kfac.batchnorm import BatchNormLayer, is_batchnorm
from kfacperf.kfac.fisher import MonteCarloFisher
from kfacperf.kfac.grad_io import load_grads, write_grads
from kfacperf.kfac.layers import Conv2dLayer, KFACLayer, LinearLayer, is_kfac_layer
from kfacperf.kfac.strategy import LocalStrategy, Strategy
from kfacperf.profiler.timer import NULL_TIMER, Timer

logger = logging.getLogger(__name__)

ROOT_LAYER = "<model>"
"""The name of a layer that is the model itself (``nn.Linear(4, 3)`` as the whole model): its
module path in ``named_modules()`` is ``""``, which reads as "no layer" in a trace row.  The
preconditioner, the workload model (:mod:`kfacperf.workloads.describe`) and the trace's layer
column all use this one name for it."""

Schedule = Union[float, Callable[[int], float]]  # noqa: UP007 (a runtime alias: no | on 3.10)
"""A hyperparameter: a number, or a function of the step index."""


class KFACPreconditioner:
    """K-FAC for ``nn.Linear`` and ``nn.Conv2d``, composable with any optimizer.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        damping: Tikhonov damping λ > 0 (or a function of the step).
        lr: the first-order optimizer's learning rate (or a function of the step); used
            only by KL-clipping.
        factor_interval: compute batch statistics every this many steps.
        inverse_interval: recompute inverses every this many steps (a multiple of
            ``factor_interval``).
        inverse_method: ``"eigen"`` (exact ``(G⊗A+λI)⁻¹``) or ``"cholesky"`` (π-damped).
        factor_decay: running-average weight d in ``F ← d·F + (1-d)·F_batch``, in [0, 1).
        kl_clip: bound on the predicted KL change of the update; ``None`` disables.
        strategy: placement and communication (default :class:`LocalStrategy`).
        timer: stage timer (default: records nothing).
        inverse_dtype: dtype of the decompositions (stored results use the factor dtype).
        skip_layers: module names (exact, or a ``name.`` prefix) not to register.
        bn_blocks: ``"none"`` (BatchNorm parameters left to the first-order optimizer),
            ``"unit"`` or ``"full"`` (BatchNorm layers as Fisher blocks).
        fisher: ``"emp"`` (statistics from the true labels' backward) or ``"mc"`` (from
            :meth:`mc_backward`).
        batch_first: whether a linear layer's input of three or more dimensions has the
            examples first (``[N, T, F]``, the default) or second (``[T, N, F]``: pass
            False for a sequence-first model, e.g. ``nn.Transformer`` by default); the
            examples scale G (:class:`~kfacperf.kfac.layers.LinearLayer`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Schedule,
        lr: Schedule,
        factor_interval: int = 1,
        inverse_interval: int = 1,
        inverse_method: str = "eigen",
        factor_decay: float = 0.95,
        kl_clip: float | None = 1e-3,
        strategy: Strategy | None = None,
        timer: Timer = NULL_TIMER,
        inverse_dtype: torch.dtype = torch.float64,
        skip_layers: tuple[str, ...] | list[str] = (),
        bn_blocks: str = stages.BN_NONE,
        fisher: str = stages.FISHER_EMP,
        batch_first: bool = True,
    ) -> None:
        stages.check_choice("bn_blocks", bn_blocks, stages.BN_BLOCKS)
        if not isinstance(batch_first, bool):
            raise ValueError(f"batch_first must be True or False, got {batch_first!r}")
        stages.check_choice("fisher", fisher, stages.FISHER_TYPES)
        _check_schedule("damping", damping)
        _check_schedule("lr", lr)
        stages.check_intervals(factor_interval, inverse_interval)
        stages.check_choice("inverse_method", inverse_method, stages.INVERSE_METHODS)
        _check_numerics(factor_decay, kl_clip, inverse_dtype)
        strategy = LocalStrategy() if strategy is None else strategy
        if not isinstance(strategy, Strategy):
            raise ValueError(f"strategy {strategy!r} does not implement the Strategy protocol")

        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.damping = damping
        self.lr = lr
        self.factor_interval = factor_interval
        self.inverse_interval = inverse_interval
        self.inverse_method = inverse_method
        self.factor_decay = float(factor_decay)
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.strategy = strategy
        self.timer = timer
        self.inverse_dtype = inverse_dtype
        self.bn_blocks = bn_blocks
        self.fisher = fisher
        self.batch_first = batch_first
        self.steps = 0
        self.last_kl_scale: Tensor | None = None
        self._in_mc_pass = False

        self.layers: dict[str, KFACLayer] = {}
        self.skipped_modules: list[str] = []
        self._register(model, tuple(skip_layers))
        self.other_params: list[str] = self._first_order_params(model)

        self._handles = [
            layer.module.register_forward_hook(self._forward_hook)
            for layer in self.layers.values()
        ]
        self._by_module = {id(layer.module): layer for layer in self.layers.values()}
        self.strategy.setup(model, self.layers, timer=timer)

    # ------------------------------------------------------------------ registration
    def _first_order_params(self, model: nn.Module) -> list[str]:
        """Names of the parameters no K-FAC layer owns (left to the first-order optimizer),
        logged with the modules skipped so a user sees what K-FAC does not precondition."""
        registered = {id(p) for layer in self.layers.values()
                      for p in layer.module.parameters(recurse=False)}
        others = [name for name, p in model.named_parameters() if id(p) not in registered]
        logger.info(
            "K-FAC registered %d layers; %d parameter tensors left to the first-order "
            "optimizer: %s", len(self.layers), len(others), ", ".join(others) or "(none)",
        )
        if self.skipped_modules:
            logger.warning("K-FAC skips unsupported modules: %s", ", ".join(self.skipped_modules))
        return others

    def _register(self, model: nn.Module, skip: tuple[str, ...]) -> None:
        self.layers, self.skipped_modules = find_layers(
            model, skip=skip, inverse_method=self.inverse_method, bn_blocks=self.bn_blocks,
            batch_first=self.batch_first)

    # ------------------------------------------------------------------------ hooks
    @property
    def factor_step(self) -> bool:
        """Does the current step compute batch statistics?"""
        return stages.computes_factors(self.steps, self.factor_interval)

    @property
    def inverse_step(self) -> bool:
        """Does the current step recompute inverses?"""
        return stages.recomputes_inverses(self.steps, self.inverse_interval)

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (self.factor_step and module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        layer = self._by_module[id(module)]
        x = inputs[0].detach()  # kept by the closure until this output's gradient arrives
        output.register_hook(lambda grad: self._on_grad_output(layer, x, grad))

    def _on_grad_output(self, layer: KFACLayer, x: Tensor, grad: Tensor) -> None:
        if self.fisher == stages.FISHER_MC and not self._in_mc_pass:
            return  # the true labels' backward: the statistics came from the sampled pass
        flops = layer.factor_flops(x, grad)
        with self.timer.stage(stages.FACTOR_COMPUTE, layer.name, flops=flops):
            layer.compute_batch_factors(x, grad)
        self.strategy.on_factor_batch(layer)

    def mc_backward(self, outputs: Tensor, sampler: MonteCarloFisher) -> None:
        """The Monte-Carlo pass (``fisher="mc"``, factor steps): a backward of the loss of
        labels sampled from ``outputs`` that captures the statistics and leaves ``.grad``
        alone.  Call it after the forward pass and before the true labels' backward."""
        if self.fisher != stages.FISHER_MC:
            raise RuntimeError(f"mc_backward needs fisher='mc' (this preconditioner uses "
                               f"fisher={self.fisher!r})")
        if not self.factor_step:
            return
        self._in_mc_pass = True
        try:
            sampler.backward(outputs, step=self.steps)
        finally:
            self._in_mc_pass = False

    def remove_hooks(self) -> None:
        """Detach from the model (the preconditioner cannot be stepped afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> None:
        """Precondition the registered layers' ``.grad`` in place (see the module doc)."""
        damping = _value("damping", self.damping, self.steps)
        strategy, timer = self.strategy, self.timer
        load_grads(self.layers.values())
        if self.factor_step:
            strategy.finish_factors()
            for name, layer in self.layers.items():
                if strategy.needs_factors(name) and layer.has_batch_stats:
                    nflops = 3.0 * layer.factor_numel()
                    with timer.stage(stages.FACTOR_COMPUTE, name, flops=nflops):
                        layer.update_factors(self.factor_decay)
            for layer in self.layers.values():
                layer.release_batch_stats()
        if self.inverse_step:
            for name, layer in self.layers.items():
                if strategy.inverts(name) and layer.has_factors:
                    with timer.stage(stages.INVERSE, name, flops=layer.inverse_flops()):
                        inverse.compute_inverse(layer, damping=damping, dtype=self.inverse_dtype)
            strategy.share_inverses()
        strategy.reduce_gradients()
        for name, layer in self.layers.items():
            if strategy.preconditions(name):
                with timer.stage(stages.PRECONDITION, name, flops=layer.precondition_flops()):
                    inverse.precondition(layer, damping=damping)
        strategy.share_preconditioned()
        scale = None
        if self.kl_clip is not None:
            terms = [layer.kl_term for layer in self.layers.values() if layer.kl_term is not None]
            lr = _value("lr", self.lr, self.steps)
            scale = inverse.kl_clip_scale(terms, lr=lr, kl_clip=self.kl_clip)
        self.last_kl_scale = scale
        write_grads(self.layers.values(), scale)
        self.steps += 1

    # ------------------------------------------------------------------- inspection
    def __iter__(self) -> Iterator[KFACLayer]:
        return iter(self.layers.values())

    def __repr__(self) -> str:
        return (
            f"KFACPreconditioner(layers={len(self.layers)}, method={self.inverse_method!r}, "
            f"intervals={self.factor_interval}/{self.inverse_interval}, "
            f"strategy={self.strategy.name!r}, bn_blocks={self.bn_blocks!r}, "
            f"fisher={self.fisher!r})"
        )


def find_layers(model: nn.Module, *, skip: tuple[str, ...] | list[str] = (),
                inverse_method: str = "eigen", bn_blocks: str = stages.BN_NONE,
                batch_first: bool = True) -> tuple[dict[str, KFACLayer], list[str]]:
    """The layers :class:`KFACPreconditioner` registers in ``model`` (by module name) and the
    unsupported modules it skips; a ``ValueError`` for a model it cannot take (no supported
    layer, or two layers sharing a parameter), which a caller may check up front."""
    layers: dict[str, KFACLayer] = {}
    skipped: list[str] = []
    owner: dict[int, str] = {}  # id of a registered layer's parameter -> its module
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.requires_grad:
            continue
        label = name or ROOT_LAYER
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not is_kfac_layer(module):
            skipped.append(label)  # a grouped convolution, attention's out_proj
            continue
        if isinstance(module, nn.Linear):
            layer: KFACLayer = LinearLayer(name=label, module=module,
                                           inverse_method=inverse_method,
                                           batch_first=batch_first)
        elif isinstance(module, nn.Conv2d):
            layer = Conv2dLayer(name=label, module=module, inverse_method=inverse_method)
        elif bn_blocks != stages.BN_NONE and is_batchnorm(module):
            layer = BatchNormLayer(name=label, module=module, inverse_method=inverse_method,
                                   mode=bn_blocks)
        else:
            continue
        for p in module.parameters(recurse=False):
            if id(p) in owner:
                raise ValueError(tied_layers_message(owner[id(p)], label))
        owner.update((id(p), label) for p in module.parameters(recurse=False))
        layers[label] = layer
    if not layers:
        raise ValueError(
            f"model {type(model).__name__} has no supported layer for K-FAC "
            "(nn.Linear or nn.Conv2d with groups=1 and a trainable weight, or BatchNorm "
            "with bn_blocks)"
        )
    return layers, skipped


def tied_layers_message(first: str, second: str) -> str:
    """Why K-FAC refuses layers ``first`` and ``second`` that share a parameter, and what to do."""
    return (f"layers {first!r} and {second!r} share a parameter (tied weights); K-FAC "
            "preconditions a parameter with the statistics of one layer, so each would "
            "overwrite the other's update: untie them, or train this model with the "
            "first-order optimizer alone (strategy 'sgd', kfacperf profile --optimizer sgd)")


def _check_schedule(key: str, value: Schedule) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key} must be > 0 (or a function of the step), got {value!r}")


def _check_numerics(factor_decay: float, kl_clip: float | None,
                    inverse_dtype: torch.dtype) -> None:
    if not (isinstance(factor_decay, (int, float)) and 0.0 <= factor_decay < 1.0):
        raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay!r}")
    if kl_clip is not None and not (isinstance(kl_clip, (int, float)) and kl_clip > 0):
        raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip!r}")
    if inverse_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"inverse_dtype must be float32 or float64, got {inverse_dtype}")


def _value(key: str, value: Schedule, step: int) -> float:
    v = value(step) if callable(value) else value
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{key} at step {step} must be > 0, got {v!r}")
    return float(v)
