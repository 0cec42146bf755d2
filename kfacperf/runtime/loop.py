"""Profile a training loop you wrote: the same trace as ``kfacperf profile``, from your own code.

::

    import kfacperf

    model = MyNet().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with kfacperf.instrument(model, optimizer, out="traces/mynet", strategy="spngd",
                             warmup=5) as run:
        for inputs, targets in batches:
            with run.step():
                loss = loss_fn(run.model(inputs), targets)   # forward
                optimizer.zero_grad()
                run.backward(loss)                            # backward
                run.update()     # K-FAC's stages (factors, inverses, preconditioning), then
                                 # optimizer.step()

What it adds to the loop, and nothing else:

* **The distributed set-up of a strategy.** Under ``torchrun`` it joins the process group
  (initialising it from the environment unless you already did); alone it runs on one
  process.  ``run.model`` is ``model`` wrapped in DDP (each gradient bucket timed) where the
  strategy averages gradients that way (``sgd``, ``kaisa``), else ``model`` itself: call
  ``run.model`` in the loop.
* **The real preconditioner** (:class:`kfacperf.kfac.KFACPreconditioner` with the named
  strategy: ``local`` on one process, ``spngd``, ``kaisa``; ``sgd`` for none) in front of
  your optimizer; its KL clipping follows your optimizer's learning rate.
* **The trace**: ``run.json``, per-rank crash-safe parts flushed every step, NVTX ranges, CUDA
  events on a GPU, NVML telemetry, compacted into ``events.parquet`` when the ``with`` block
  ends (:class:`~kfacperf.runtime.recording.TraceRecorder`, shared with ``kfacperf profile``).
  ``forward`` runs from the first call of ``run.model`` in a step to :meth:`backward`;
  ``backward`` is ``loss.backward()``; :meth:`update` records the preconditioner's stages
  and ``update``.  If the loop raises, every finished step stays in the trace (marked
  incomplete) with the traceback in ``parts/error-rank<R>.txt``.
* **The workload model** of ``model`` (its K-FAC layers, shapes, FLOPs, walked on the meta
  device from the first batch's shape) into ``TRACE/workload.toml``, with a fingerprint of
  its layers that ``run.json`` records, so ``kfacperf calibrate``, ``validate`` and
  ``simulate`` work on the trace as they do on a ``kfacperf profile`` trace.

Zero the gradients where your loop does (``optimizer.zero_grad()``); one forward and one
backward per step (K-FAC's statistics are per step).  Its cost on the step is the stage
timer's (``tests/benchmarks/test_bench_loop.py``).
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kfacperf import vocab as S
from kfacperf.runtime.loop_inputs import (
    check_kfac_model,
    check_settings,
    first_tensor,
    in_keywords,
    input_kind,
    loop_config,
)
from kfacperf.runtime.recording import exception_summary


def instrument(model: nn.Module, optimizer: torch.optim.Optimizer, *, out: str | Path,
               strategy: str | None = None, name: str | None = None, warmup: int = 0,
               batch_size: int | None = None, precision: str = "fp32", force: bool = False,
               isolate: bool = False, keep_heap: bool = True, timeout_s: float = 60.0,
               telemetry_interval_s: float = 0.1, **settings: Any) -> InstrumentedLoop:
    """Instrument a training loop of ``model`` and ``optimizer``; see the module docstring.

    Args:
        out: the trace directory (an existing non-empty one needs ``force``).
        strategy: ``sgd`` (no K-FAC), ``local`` (K-FAC on one process; the default there),
            ``spngd`` (the default on several), ``kaisa``.
        name: the workload's name in the trace (default: the model's class name).
        warmup: the first steps, recorded but left out of summaries and fits.
        batch_size: examples per rank per step (default: the first input's first dimension).
        precision: what the loop computes in (``fp32``, ``tf32``, ``bf16`` under autocast;
            :mod:`kfacperf.runtime.precision`), recorded for the simulator with torch's TF32
            switches as they are; kfacperf changes neither.
        isolate: synchronise around every stage, so each is measured alone.
        keep_heap: keep freed memory in the process (:mod:`kfacperf.runtime.heap`).
        settings: K-FAC settings (``damping``, ``factor_interval``, ``inverse_interval``,
            ``inverse_method``, ``factor_decay``, ``kl_clip``, ``grad_worker_fraction``,
            ``comm_dtype``, ``symmetric``, ``bucket_cap_mb``, ``bn_blocks``).  The Fisher
            is the empirical one (the Monte-Carlo Fisher's extra backward needs the loss
            function, which the loop keeps to itself).
    """
    return InstrumentedLoop(model, optimizer, out=out, strategy=strategy, name=name,
                            warmup=warmup, batch_size=batch_size, precision=precision,
                            force=force, isolate=isolate,
                            keep_heap=keep_heap, timeout_s=timeout_s,
                            telemetry_interval_s=telemetry_interval_s, settings=settings)


class InstrumentedLoop:
    """What :func:`instrument` returns; use it as a context manager."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, out: str | Path,
                 strategy: str | None, name: str | None, warmup: int, batch_size: int | None,
                 precision: str, force: bool, isolate: bool, keep_heap: bool, timeout_s: float,
                 telemetry_interval_s: float, settings: Mapping[str, Any]) -> None:
        from kfacperf.runtime import heap
        from kfacperf.runtime.recording import TraceRecorder
        from kfacperf.runtime.training import TrainConfig, Trainer

        if not isinstance(model, nn.Module):
            raise TypeError(f"instrument: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("instrument: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        check_settings(settings)
        if strategy != S.SGD:
            check_kfac_model(model, settings)
        device = _device_of(model)
        info = _join_process_group(device, strategy, timeout_s)
        strategy = strategy or (S.LOCAL if info.world_size == 1 else S.SPNGD)
        S.check_choice("strategy", strategy, S.PROFILE_STRATEGIES)
        config = loop_config(
            optimizer, workload=name or type(model).__name__, world_size=info.world_size,
            device=device.type, asked=dict(
                out=str(out), strategy=strategy, warmup=warmup, batch_size=batch_size,
                isolate=isolate, keep_heap=keep_heap, timeout_s=timeout_s,
                telemetry_interval_s=telemetry_interval_s, precision=precision, **settings))
        heap_policy = heap.keep_heap() if keep_heap else heap.DEFAULT
        if info.rank == 0:
            from kfacperf.runtime.runner import prepare_out

            try:
                prepare_out(Path(out), force=force)
            except ValueError as exc:
                raise ValueError(f"instrument: {in_keywords(str(exc), (), ('force',))}"
                                 ) from None
        if info.world_size > 1:
            torch.distributed.barrier()  # nobody writes into ``out`` before it is prepared
        self.config = config
        self.rank, self.world_size = info.rank, info.world_size
        self.trace_dir = Path(out)
        self.workload_model: Any = None
        self._recorder = TraceRecorder(
            config, info, device=device, heap_policy=heap_policy, batch_per_rank=batch_size,
            run_extra={"steps": None, "loop": "kfacperf.instrument",
                       "first_order": type(optimizer).__name__})
        self.timer = self._recorder.timer
        self._trainer = Trainer(model, loss_fn=None, config=TrainConfig(
            **config.train_config_kwargs()), timer=self.timer, optimizer=optimizer)
        self._raw_model = model
        self.steps = 0
        self._in_step = self._forward_seen = self._updated = self._backward_seen = False
        self._in_backward = False
        self._forward: Any = None
        self._example: Tensor | None = None
        self._no_example = ""  # why the first forward gave no example to walk, once said
        self._batch = batch_size
        self._faults_at_warmup: int | None = None
        self._closed = False
        self._hooks = [self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)]
        self._layer_calls: set[str] = set()
        pc = self._trainer.preconditioner
        if pc is not None:  # a layer called twice in a step: factors of one call, gradient of two
            self._layer_names = {id(layer.module): name for name, layer in pc.layers.items()}
            self._hooks += [layer.module.register_forward_hook(self._on_layer_call)
                            for layer in pc.layers.values()]

    # ---------------------------------------------------------------- what the loop calls

    @property
    def model(self) -> nn.Module:
        """The model to call in the loop (DDP-wrapped where the strategy needs it)."""
        return self._trainer.net

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._trainer.optimizer

    @property
    def preconditioner(self) -> Any:
        """The :class:`~kfacperf.kfac.KFACPreconditioner`, or None for ``sgd``."""
        return self._trainer.preconditioner

    @contextlib.contextmanager
    def step(self) -> Iterator[InstrumentedLoop]:
        """One training step: a ``step`` row and NVTX range around its stages."""
        if self._closed:
            raise RuntimeError("instrument: the run is closed; no more steps")
        if self._in_step:
            raise RuntimeError("instrument: run.step() inside run.step()")
        if self.steps == self.config.warmup:
            self._faults_at_warmup = _minor_faults()
        self._in_step, self._forward_seen, self._updated = True, False, False
        self._backward_seen = False
        self._layer_calls.clear()
        self.timer.step_begin(self.steps)
        ok = False
        try:
            with self._trainer.collective_errors(self.steps):
                yield self
            ok = True
        finally:
            self._end_forward()
            self._in_step = False
            if not ok:  # a loop that catches the error and goes on records this step anew
                self.timer.step_abort()
        if not self._backward_seen:
            self.timer.step_abort()
            raise RuntimeError(f"instrument: step {self.steps} ended without run.backward(loss)"
                               "; call run.backward(loss) in place of loss.backward() (else "
                               "the backward pass is timed as part of forward)")
        if not self._updated:
            self.timer.step_abort()
            raise RuntimeError(f"instrument: step {self.steps} ended without run.update(); "
                               "call it once per step (it runs K-FAC and optimizer.step())")
        self.timer.step_end()
        self.steps += 1

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)``, timed as ``backward`` (ends ``forward``)."""
        self._require_step("run.backward(loss)")
        self._end_forward()
        self._in_backward = True  # a checkpointed layer's forward re-run is not a second call
        try:
            with self.timer.stage(S.BACKWARD):
                loss.backward(**kwargs)
        finally:
            self._in_backward = False
        self._backward_seen = True

    def update(self) -> None:
        """The preconditioner's stages (K-FAC), then ``optimizer.step()`` timed as ``update``."""
        self._require_step("run.update()")
        self._end_forward()
        if self._updated:
            raise RuntimeError(f"instrument: run.update() called twice in step {self.steps}")
        self._trainer.update()
        self._updated = True

    # ---------------------------------------------------------------------- the end

    def __enter__(self) -> InstrumentedLoop:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon(exception_summary(exc),
                          "".join(traceback.format_exception(exc_type, exc, tb)))

    def close(self) -> None:
        """Finish the trace (every rank: it gathers the ranks' parts) and, on rank 0, write
        the workload model into it."""
        if self._closed:
            return
        self._closed = True
        self._remove_hooks()
        faults = 0.0
        measured = self.steps - self.config.warmup
        if self._faults_at_warmup is not None and measured > 0:
            faults = (_minor_faults() - self._faults_at_warmup) / measured
        updates = self._run_updates()
        if self.steps == 0:
            updates["failure"] = NO_STEP
            if self.rank == 0:
                print(f"[kfacperf] instrument: {NO_STEP}; the trace in {self.trace_dir} has no "
                      "events and is marked incomplete", file=sys.stderr)
        elif measured <= 0 and self.rank == 0:
            print(f"[kfacperf] instrument: warning: all {self.steps} step(s) were warm-up "
                  f"(warmup={self.config.warmup}), so the trace in {self.trace_dir} has no "
                  "measured step to summarize or fit; run more steps than warmup",
                  file=sys.stderr)
        self._recorder.finish(faults_per_step=faults, run_updates=updates,
                              completed=self.steps > 0)

    def _abandon(self, summary: str, details: str) -> None:
        self._closed = True
        self._remove_hooks()
        # what a fit of the finished steps needs, as close() records it
        updates = self._run_updates()
        self._recorder.abandon(summary, details, run_updates=dict(updates, failure=summary))

    def _run_updates(self) -> dict[str, Any]:
        """``run.json``'s keys known at the end: the measured steps, the batch, and (rank 0)
        the workload model's fingerprint, once its file is written."""
        measured = self.steps - self.config.warmup
        updates: dict[str, Any] = {"steps": max(0, measured), "batch_per_rank": self._batch}
        if self.rank == 0:
            updates.update(self._write_workload_model())
        return updates

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _write_workload_model(self) -> dict[str, Any]:
        """``workload.toml`` in the trace (rank 0); ``run.json`` keys that point to it."""
        from kfacperf.sim.models import save_workload_model
        from kfacperf.trace.schema import WORKLOAD_FILE
        from kfacperf.workloads.describe import NoLayerError
        from kfacperf.workloads.workload_model import workload_model_of

        if self._example is None:
            return {}
        try:
            model = workload_model_of(
                self._raw_model, self._example, name=self.config.workload,
                description=f"{type(self._raw_model).__name__}, recorded by kfacperf.instrument",
                source="kfacperf.instrument", strict=self.config.optimizer == S.KFAC)
        except NoLayerError:
            print(f"[kfacperf] no workload model for {self.config.workload}: the simulator's "
                  "workload model is made of a model's nn.Linear and nn.Conv2d layers, and "
                  "this model has none", file=sys.stderr)
            return {}
        except Exception as exc:  # the trace stands without it; say why it is missing
            print(f"[kfacperf] no workload model for {self.config.workload}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return {}
        save_workload_model(model, self.trace_dir / WORKLOAD_FILE)
        self.workload_model = model
        return {"workload_fingerprint": model.fingerprint}

    # ---------------------------------------------------------------------- internals

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
        if not self._in_step or self._forward_seen:
            return
        self._forward_seen = True
        self._forward = self.timer.stage(S.FORWARD)
        self._forward.__enter__()
        if self._example is not None or self._no_example:
            return
        first = args[0] if args else None
        dim = 0 if self.config.batch_first else 1  # where the examples are
        if isinstance(first, Tensor) and first.dim() > dim:
            self._example = first.narrow(dim, 0, 1).detach().to("cpu")
            if self._batch is None:
                self._batch = int(first.shape[dim])
            return
        self._no_example = input_kind(args, kwargs)
        leaf = first_tensor((args, kwargs))
        if self._batch is None and leaf is not None and leaf.dim() > dim:
            self._batch = int(leaf.shape[dim])
        if self.rank == 0:
            which = "first" if dim == 0 else "second (batch_first=False)"
            batch = (f"batch_per_rank {self._batch} is the {which} dimension of its first "
                     "tensor (pass batch_size= to instrument() to say otherwise)"
                     if leaf is not None else "pass batch_size= to instrument() to record the "
                     "examples per step")
            print(f"[kfacperf] instrument: no workload model for {self.config.workload}: "
                  f"its forward takes {self._no_example}, and the workload model (what "
                  "calibrate, validate and simulate read) is walked from a model called on "
                  "one tensor; to have one, call the model on a tensor (e.g. a wrapper "
                  f"module whose forward(x) builds the rest); {batch}", file=sys.stderr)

    def _on_layer_call(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (self._in_step and module.training and torch.is_grad_enabled()) \
                or self._in_backward:
            return
        name = self._layer_names[id(module)]
        if name in self._layer_calls:
            raise RuntimeError(
                f"instrument: layer {name!r} ({type(module).__name__}) is called twice in step "
                f"{self.steps}; K-FAC takes a layer's statistics from one call per step while "
                "its gradient sums every call, so a layer used twice per step is not "
                "supported: give each use a layer of its own, or run strategy='sgd'")
        self._layer_calls.add(name)

    def _end_forward(self) -> None:
        if self._forward is not None:
            forward, self._forward = self._forward, None
            forward.__exit__(None, None, None)

    def _require_step(self, call: str) -> None:
        if not self._in_step:
            raise RuntimeError(f"instrument: {call} outside a step; call it inside "
                               "`with run.step():`")


NO_STEP = "no step was run (no `with run.step():` block finished)"


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _join_process_group(device: torch.device, strategy: str | None, timeout_s: float) -> Any:
    """Join (or initialise) the process group under torchrun; alone, a world of one (with a
    gloo group of one for a distributed strategy, as ``kfacperf profile --nproc 1`` runs)."""
    import os

    from kfacperf.runtime import distributed
    from kfacperf.runtime.net import free_port
    from kfacperf.runtime.runner import under_torchrun

    backend = "nccl" if device.type == "cuda" else "gloo"
    if torch.distributed.is_initialized():
        return distributed.describe()
    if under_torchrun():
        return distributed.init_distributed(backend=backend, timeout_s=timeout_s)
    if strategy in (S.SPNGD, S.KAISA):
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        return distributed.init_distributed(backend=backend, timeout_s=timeout_s, env=env)
    return distributed.describe()


def _minor_faults() -> int:
    from kfacperf.runtime.heap import minor_faults

    return minor_faults()
