"""The models a validation predicts with: calibrated on the calibration traces alone."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from kfacperf import vocab as S
from kfacperf.bench.results import CommbenchResult
from kfacperf.sim.models.cluster import ClusterModel
from kfacperf.sim.models.device import DeviceModel
from kfacperf.trace.arguments import one_or_many
from kfacperf.trace.measure import KindTimes
from kfacperf.trace.schema import fisher_options
from kfacperf.validation.inputs import (
    TraceInputs,
    distinct_traces,
    load_traces,
    trace_label,
    trace_workload_models,
)

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.calibrate.device import DeviceCalibration
    from kfacperf.sim.prediction import Prediction

ClusterInput: TypeAlias = "ClusterModel | CommbenchResult | str | os.PathLike[str] | None"
"""What :func:`resolve_cluster` takes."""
SearchInput: TypeAlias = "str | os.PathLike[str] | Sequence[str | os.PathLike[str]]"
"""Workload model files and folders to look in: one alone, or a list."""


def search_paths(search: SearchInput) -> list[str]:
    """``search`` (one file or folder alone, or a list) as a list of paths."""
    return [str(s) for s in one_or_many(search, (str, os.PathLike), what="workload_search",
                                        expected="a workload model file or folder")]


def resolve_cluster(cluster: ClusterInput) -> ClusterModel:
    """A cluster model from a ClusterModel, a commbench result, a preset name or a TOML path
    (``None``: the committed ``local-cpu`` model)."""
    from kfacperf.sim.models import load_cluster

    if cluster is None:
        try:
            return load_cluster("local-cpu")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no cluster model given and no local-cpu preset ({exc}); "
                                    "run kfacperf commbench --out models/clusters/local-cpu.toml"
                                    ) from None
    if isinstance(cluster, ClusterModel):
        return cluster
    if isinstance(cluster, CommbenchResult):
        from kfacperf.calibrate.cluster import fit_cluster

        return fit_cluster(cluster, name="local")[0]
    if isinstance(cluster, (str, os.PathLike)):
        return load_cluster(cluster)
    raise TypeError(f"cluster: expected a ClusterModel, a CommbenchResult, a preset name or "
                    f"the path of a cluster TOML, got {type(cluster).__name__}")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """What the predictions use: the fitted device, the cluster, and how to find workloads."""

    device: DeviceModel
    cluster: ClusterModel
    fit: DeviceCalibration
    traces: tuple[str, ...]
    workload_search: tuple[str, ...] = ()
    workloads: tuple[tuple[str, str], ...] = ()
    """The workload models of the calibration traces, each as (name, fingerprint)
    (:func:`kfacperf.sim.models.device.workload_key`: what ``[[measured]]`` times are keyed
    by)."""


class WorkloadFinder:
    """Workload models matched to runs by registry name, options and fingerprint (cached):
    the files and folders of ``search`` first, then ``models/workloads/``."""

    def __init__(self, search: SearchInput) -> None:
        self.search = search_paths(search)
        self.cache: dict[str, Any] = {}

    def __call__(self, run: Mapping[str, Any], label: str = "") -> Any:
        import json

        from kfacperf.sim.models import workload_for_run

        name = run.get("workload")
        if not name:
            raise ValueError(f"{label or 'run'}: run.json has no 'workload'")
        options = run.get("workload_options") or {}
        fingerprint = str(run.get("workload_fingerprint") or "")
        key = json.dumps([name, options, fingerprint], sort_keys=True, default=str)
        if key not in self.cache:
            try:
                self.cache[key] = workload_for_run(str(name), options, search=self.search,
                                                   fingerprint=fingerprint)
            except ValueError as exc:
                raise ValueError(f"{label}: {exc}" if label else str(exc)) from None
        return self.cache[key]

    def unused(self, files: Sequence[str | os.PathLike[str]]) -> list[str]:
        """Those of ``files`` (workload model files given by the user; folders are skipped)
        whose model matched none of the runs looked up so far: a model meant for the traces
        that was silently not used would fit them against another workload."""

        from kfacperf.sim.models import load_workload

        used = list(self.cache.values())
        out = []
        for f in files:
            if not Path(f).is_file():
                continue
            try:
                model = load_workload(Path(f))
            except ValueError:
                continue  # the lookup itself reports a broken file where it reads one
            if not any(model == u for u in used):
                out.append(str(f))
        return out


def calibrate(
    traces: TraceInputs, *, cluster: ClusterInput = None,
    workload_search: SearchInput = (), device_name: str = "calibrated",
) -> Calibration:
    """Fit the device model to ``traces`` (paths or loaded traces, one alone or a list) only,
    each once (:func:`~kfacperf.validation.inputs.distinct_traces`).  Workload models are
    looked for in ``workload_search``, then in the traces themselves, then in ``models/``."""
    from kfacperf.calibrate.device import fit_device_model
    from kfacperf.sim.models.device import workload_key

    loaded = distinct_traces(load_traces(traces, what="calibration traces"), "calibration")
    if not loaded:
        raise ValueError("no calibration traces given")
    workloads = WorkloadFinder([*search_paths(workload_search), *trace_workload_models(loaded)])
    fit = fit_device_model(loaded, workloads=lambda run: workloads(run), name=device_name)
    keys: dict[tuple[str, str], None] = {}
    for t in loaded:
        try:
            keys[workload_key(workloads(t.run))] = None
        except ValueError:  # a trace the fit left out (multi-process) without a model
            continue
    return Calibration(device=fit.device, cluster=resolve_cluster(cluster), fit=fit,
                       traces=tuple(str(getattr(t, "path", trace_label(t))) for t in loaded),
                       workload_search=tuple(workloads.search), workloads=tuple(keys))


def strategy_of(run: Mapping[str, Any], label: str) -> Any:
    from kfacperf.sim.graphs.strategies import StrategySpec

    world = int(run.get("world_size") or 1)
    if run.get("optimizer") == S.SGD:
        return StrategySpec(S.SGD)
    name = str(run.get("strategy"))
    if run.get("fused"):
        raise ValueError(f"{label}: fused SP-NGD (one fused all-reduce) is not modelled by the "
                         "simulator")
    if name == S.LOCAL:
        if world != 1:
            raise ValueError(f"{label}: strategy 'local' with world_size {world}")
        return StrategySpec(S.SPNGD)  # the same work as any strategy on one process
    if name == S.SPNGD:
        return StrategySpec(S.SPNGD)
    if name == S.KAISA:
        f = float(run.get("grad_worker_fraction", 1.0))
        return StrategySpec(S.KAISA, f, f"kaisa:{f:g}")
    raise ValueError(f"{label}: strategy {name!r} is not modelled (sgd, spngd, kaisa, local)")


Predicted = KindTimes
"""A prediction of a run: per kind of step, the step and stage times."""


def predict(run: Mapping[str, Any], calibration: Calibration, *, label: str = "run",
            workloads: WorkloadFinder | None = None) -> KindTimes:
    """The predicted times of each kind of step of the run described by ``run`` (a
    run.json), simulated on the calibrated models (:func:`simulate_run`)."""
    from kfacperf.sim.prediction import kind_times

    pred = simulate_run(run, calibration, label=label, workloads=workloads)
    row = pred.summary.iloc[0]
    return kind_times(pred, str(row["strategy"]), int(row["gpus"]))


def simulate_run(run: Mapping[str, Any], calibration: Calibration, *, label: str = "run",
                 workloads: WorkloadFinder | None = None) -> Prediction:
    """The simulator's prediction of the run described by ``run`` (a run.json): its
    workload, strategy, world size, batch, intervals, precision and communication settings,
    on the calibrated models.  One row, the run's strategy at its world size.

    The run computes at the peaks of its precision
    (:func:`kfacperf.calibrate.run_dtypes.run_dtypes`); the calibration's ``[[measured]]``
    times, which name no precision, apply only to a run of the precision they were measured
    in."""
    from kfacperf.calibrate.run_dtypes import run_dtypes
    from kfacperf.sim.costs.model import CostModel
    from kfacperf.sim.graphs.strategies.common import CommSettings
    from kfacperf.sim.sweep import simulate_with_costs

    workloads = workloads or WorkloadFinder(calibration.workload_search)
    w = workloads(run, label)
    spec = strategy_of(run, label)
    world = int(run.get("world_size") or 1)
    batch = int(run["batch_per_rank"])
    fi, ii = int(run.get("factor_interval") or 1), int(run.get("inverse_interval") or 1)
    method = str(run.get("inverse_method") or "eigen")
    dtype = str(run.get("comm_dtype") or "fp32")
    symmetric = bool(run.get("symmetric", False))
    cap = float(run.get("bucket_cap_mb", 25.0))
    dtypes = run_dtypes(run, calibration.device, label=label)
    measured_in = calibration.fit.measured_dtypes
    cost = CostModel(workload=w, device=calibration.device, cluster=calibration.cluster,
                     inverse_method=method, comm_dtype=dtype, symmetric_factors=symmetric,
                     threads_per_rank=int(run.get("threads_per_rank") or 1),
                     use_measured=measured_in is None or measured_in == dtypes,
                     **dtypes.cost_options(), **fisher_options(run))
    comm = CommSettings(factor_dtype=dtype, symmetric=symmetric, inverse_method=method,
                        factor_bucket_mb=cap, ddp_bucket_mb=cap or 25.0,
                        ddp_first_bucket_mb=cap or 25.0)
    return simulate_with_costs(w, cost, gpus_per_node=calibration.cluster.gpus_per_node,
                               strategies=[spec], gpus=[world], batch_per_gpu=batch,
                               factor_interval=fi, inverse_interval=ii, comm=comm,
                               meta={"workload": run.get("workload")})
