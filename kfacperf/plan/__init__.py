"""``kfacperf plan``: time to solution, and the best strategy for a cluster.

Should I train with K-FAC on this cluster, how, and on how many GPUs?  For each GPU count,
the plan searches strategy (``sgd``, ``spngd``, ``kaisa`` with every grad-worker fraction
from 1/P to 1), factor/inverse intervals, factor communication precision, symmetric
packing, bucket size and batch per GPU; drops what does not fit in the device's memory
(:mod:`kfacperf.plan.memory`); predicts the step time with the simulator and the steps to a
target quality from a convergence model (:mod:`kfacperf.plan.convergence`); and keeps the
configuration with the least time to solution per strategy (:mod:`kfacperf.plan.search`
says how it avoids simulating what it can prove worse or identical)::

    from kfacperf.plan import plan
    result = plan("resnet50", "v100", "abci-v100", gpus=[64, 256, 1024],
                  convergence=["mlperf-v0.7-lars-resnet50", "spngd-resnet50"])
    result.best(1024, "kfac")      # a Choice: its settings, step time, steps, time, GPU-hours
    result.pareto()                # time against GPU-hours

Time to solution = steps(global batch) x mean step time; GPU-hours = GPUs x that time.
Nothing here imports torch.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeAlias

from kfacperf import __version__
from kfacperf import vocab as S
from kfacperf.plan.convergence import (
    OPTIMIZERS,
    ConvergenceModel,
    convergence_for,
    load_convergence,
    optimizer_of,
)
from kfacperf.plan.memory import GB, MemoryBreakdown, memory_per_gpu
from kfacperf.plan.result import Choice, PlanResult, convergence_info, load_plan, save_plan
from kfacperf.plan.search import Evaluated, search
from kfacperf.plan.space import DEFAULT_INTERVALS, STRATEGIES, PlanSpace
from kfacperf.sim.models.cluster import ClusterModel
from kfacperf.sim.models.device import DeviceModel
from kfacperf.sim.models.workload import WorkloadModel
from kfacperf.trace.arguments import one_or_many

DEFAULT_MEMORY_FRACTION = 0.9
"""Share of a device's memory a configuration may fill: the rest is left for the CUDA
context, the allocator's fragmentation and kernels' workspaces (assumed)."""

SEARCHED_OPTIONS = ("comm_dtype", "symmetric_factors")

ConvergenceInput: TypeAlias = ("str | os.PathLike[str] | ConvergenceModel"
                               " | Iterable[str | os.PathLike[str] | ConvergenceModel]")
"""Convergence models (objects, preset names or TOML paths): one alone, or a list."""

__all__ = [
    "DEFAULT_INTERVALS", "DEFAULT_MEMORY_FRACTION", "OPTIMIZERS", "STRATEGIES", "Choice",
    "ConvergenceModel",
    "MemoryBreakdown", "PlanResult", "PlanSpace", "load_convergence", "load_plan",
    "memory_per_gpu", "plan", "save_plan",
]


def _choice(ev: Evaluated, model: ConvergenceModel) -> Choice:
    s, p, est = ev.setting, ev.world_size, ev.estimate
    time_s = ev.time_s
    fi, ii = ev.intervals if ev.intervals is not None else (None, None)
    return Choice(
        gpus=p, strategy=s.strategy, label=s.label(p),
        grad_workers=s.grad_workers if s.strategy == S.KAISA else None,
        batch_per_gpu=s.batch_per_gpu, global_batch=est.global_batch,
        factor_interval=fi, inverse_interval=ii, comm_dtype=s.comm_dtype,
        symmetric=s.symmetric, bucket_mb=s.bucket_mb, step_us=ev.step_us,
        kind_step_us=dict(ev.kind_step_us), steps=est.steps,
        epochs=model.epochs(est.global_batch, est.steps), extrapolated=est.extrapolated,
        time_s=time_s, gpu_hours=p * time_s / 3600.0, memory=ev.memory.as_dict(),
        convergence=model.name,
    )


def _models(workload: WorkloadModel | str | Path, device: DeviceModel | str | Path,
            cluster: ClusterModel | str | Path) -> tuple[WorkloadModel, DeviceModel, ClusterModel]:
    from kfacperf.sim.models import load_cluster, load_device, load_workload

    w = workload if isinstance(workload, WorkloadModel) else load_workload(workload)
    d = device if isinstance(device, DeviceModel) else load_device(device)
    c = cluster if isinstance(cluster, ClusterModel) else load_cluster(cluster)
    return w, d, c


def _convergence_models(workload: str, strategies: Sequence[str], given: ConvergenceInput
                        ) -> dict[str, ConvergenceModel]:
    """One convergence model per optimizer of ``strategies`` (see :func:`convergence_for`)."""
    models = [m if isinstance(m, ConvergenceModel) else _load_convergence(m)
              for m in one_or_many(given, (str, os.PathLike, ConvergenceModel),
                                   what="convergence",
                                   expected="a convergence model, preset name or TOML path")]
    for m in models:
        if m.workload != workload:
            raise ValueError(f"convergence model {m.name!r} is for workload {m.workload!r}, "
                             f"not {workload!r}")
    families = dict.fromkeys(optimizer_of(s) for s in strategies)
    return {f: convergence_for(workload, f, models) for f in families}


def _load_convergence(given: object) -> ConvergenceModel:
    if isinstance(given, (str, os.PathLike)):
        return load_convergence(given)
    raise ValueError(f"convergence: expected a convergence model, preset name or TOML path, "
                     f"got {given!r}")


def _capacity_gb(device: DeviceModel, memory_gb: float | None) -> float:
    if memory_gb is not None:
        if not (isinstance(memory_gb, (int, float)) and 0 < memory_gb < float("inf")):
            raise ValueError(f"memory per GPU must be > 0 GB, got {memory_gb!r}")
        return float(memory_gb)
    if not device.memory_GB > 0:
        raise ValueError(f"device {device.name!r} has no memory capacity; add a [memory] "
                         "table (capacity_GB, source) to its model, or give --memory-gb")
    return float(device.memory_GB)


def plan(
    workload: WorkloadModel | str | Path, device: DeviceModel | str | Path,
    cluster: ClusterModel | str | Path, *, gpus: int | Iterable[int],
    convergence: ConvergenceInput = (),
    strategies: str | Iterable[str] = STRATEGIES, batch_per_gpu: int | Iterable[int] = (32,),
    intervals: str | Iterable[tuple[int, int] | str] = DEFAULT_INTERVALS,
    comm_dtypes: str | Iterable[str] = S.COMM_DTYPES,
    symmetric: bool | Iterable[bool] = (False, True),
    bucket_mb: float | Iterable[float] = (25.0,),
    memory_gb: float | None = None, memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    extrapolate: bool = True, prune: bool = True,
    progress: Callable[[str], None] | None = None, **cost_options: Any,
) -> PlanResult:
    """The best configuration per GPU count and optimizer, and what it takes to reach the
    convergence models' targets (see the module docstring).

    Models are objects, preset names or TOML paths.  Every searched axis (``gpus``,
    ``strategies``, ``batch_per_gpu``, ``intervals``: ``(factor, inverse)`` pairs or ``"F/I"``
    strings, ``comm_dtypes``, ``symmetric``: booleans, ``bucket_mb``) and ``convergence``
    take one value alone or a list.  ``convergence`` names the models to
    use (one per optimizer: ``sgd``, ``kfac``); an optimizer without one takes the only
    preset for the workload, and none (or several) is an error.  ``memory_gb`` overrides
    the device model's capacity; ``memory_fraction`` is the share a configuration may use.
    ``extrapolate=False`` drops global batches outside the convergence data.
    ``cost_options`` go to the cost model (``dtype``, ``kfac_dtype``, ``inverse_method``,
    ``bandwidth_scale``, ...); the searched ones (comm precision, packing) may not.
    ``prune=False`` simulates every setting (for checking the pruning).
    """
    from kfacperf.sim.costs.model import CostModel

    searched = [k for k in SEARCHED_OPTIONS if k in cost_options]
    if searched:
        raise ValueError(f"{', '.join(searched)} is searched; give the choices with "
                         "comm_dtypes= / symmetric= instead")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory fraction must be in (0, 1], got {memory_fraction}")
    space = PlanSpace.of(gpus=gpus, strategies=strategies, batch_per_gpu=batch_per_gpu,
                         intervals=intervals, comm_dtypes=comm_dtypes, symmetric=symmetric,
                         bucket_mb=bucket_mb)
    w, d, c = _models(workload, device, cluster)
    capacity_gb = _capacity_gb(d, memory_gb)
    models = _convergence_models(w.name, space.strategies, convergence)
    cost = CostModel(workload=w, device=d, cluster=c, **cost_options)
    o = cost.options
    found, stats = search(
        workload=w, cost=cost, gpus_per_node=c.gpus_per_node, space=space,
        convergence=models, capacity_bytes=capacity_gb * GB * memory_fraction,
        dtype=o.dtype, inverse_method=o.inverse_method, extrapolate=extrapolate, prune=prune,
        progress=progress,
    )
    choices, missing = [], []
    for (p, optimizer), ev in found.items():
        if isinstance(ev, str):
            missing.append({"gpus": p, "optimizer": optimizer, "reason": ev})
        else:
            choices.append(_choice(ev, models[optimizer]))
    inputs = {
        "workload": w.name, "device": d.name, "cluster": c.name,
        "gpus_per_node": c.gpus_per_node, "memory_GB": capacity_gb,
        "memory_source": "given" if memory_gb is not None else d.memory_source,
        "memory_fraction": memory_fraction, "dtype": o.dtype, "kfac_dtype": o.kfac_dtype,
        "inverse_method": o.inverse_method, "extrapolate": extrapolate,
        "cost_options": dict(sorted(cost_options.items())), "kfacperf_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return PlanResult(inputs=inputs,
                      convergence={f: convergence_info(m) for f, m in models.items()},
                      space=space.as_dict(), stats=asdict(stats), choices=tuple(choices),
                      missing=tuple(missing))
