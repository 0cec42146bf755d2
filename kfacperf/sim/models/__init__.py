"""Workload, device and cluster models: dataclasses, strict TOML loading, preset names.

Everything the simulator reads about a network, a GPU and a cluster comes through here::

    from kfacperf.sim.models import load_workload, load_device, load_cluster
    workload = load_workload("resnet50")        # preset name, alias or path to a .toml
    device = load_device("h100")                # -> models/devices/h100-sxm5.toml
    cluster = load_cluster("dgx-h100-ndr")

The dataclasses and per-kind loaders live in :mod:`kfacperf.sim.models.workload`,
:mod:`kfacperf.sim.models.device` and :mod:`kfacperf.sim.models.cluster` (each documents its
TOML keys and units); a cluster's optional host model, ranks sharing CPU cores, in
:mod:`kfacperf.sim.models.host`; they are re-exported here.  Loading is strict: an unknown, missing or
mistyped key, a non-positive bandwidth or a key in the wrong unit raises a ``ValueError``
naming the file and the key.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kfacperf.sim.models.cluster import (
    ALGORITHMS,
    OPS,
    ClusterModel,
    CollectiveParams,
    Tier,
    load_cluster_model,
    save_cluster_model,
)
from kfacperf.sim.models.device import (
    DTYPES,
    INVERSE_METHODS,
    STAGE_KINDS,
    DeviceModel,
    MeasuredTime,
    StageEfficiency,
    load_device_model,
    save_device_model,
)
from kfacperf.sim.models.host import DEDICATED, HostDelays, HostModel
from kfacperf.sim.models.presets import list_presets, models_dir, resolve
from kfacperf.sim.models.workload import LayerModel, WorkloadModel
from kfacperf.sim.models.workload_file import (
    load_workload_model,
    save_workload_model,
    workload_model_from_description,
)

__all__ = [
    "ALGORITHMS", "DEDICATED", "DTYPES", "INVERSE_METHODS", "OPS", "STAGE_KINDS",
    "ClusterModel", "CollectiveParams", "DeviceModel", "HostDelays", "HostModel", "LayerModel",
    "MeasuredTime",
    "StageEfficiency", "Tier", "WorkloadModel",
    "list_presets", "load_cluster", "load_cluster_model", "load_device", "load_device_model",
    "load_workload", "load_workload_model", "resolve", "save_cluster_model", "workload_for_run",
    "save_device_model", "save_workload_model", "workload_model_from_description",
]


def load_workload(name_or_path: str | Path) -> WorkloadModel:
    """A workload model from a preset name (``models/workloads/<name>.toml``) or a path."""
    return load_workload_model(resolve("workloads", name_or_path))


def load_device(name_or_path: str | Path) -> DeviceModel:
    """A device model from a preset name or alias (``h100``) or a path."""
    return load_device_model(resolve("devices", name_or_path))


def load_cluster(name_or_path: str | Path) -> ClusterModel:
    """A cluster model from a preset name or alias (``abci``) or a path."""
    return load_cluster_model(resolve("clusters", name_or_path))


def workload_for_run(
    workload: str, options: Mapping[str, Any] | None = None, *,
    search: Iterable[str | Path] = (),
) -> WorkloadModel:
    """The workload model of a run of ``workload`` built with ``options``.

    Looks at the ``.toml`` files in ``search`` (files or folders) and then in
    ``models/workloads/``, the preset named ``workload`` first, and returns the first whose
    registry name and options match (options the run leaves out are the defaults).  Without a
    match the error says how to generate one.
    """
    candidates: list[Path] = []
    for entry in search:
        p = Path(entry)
        candidates.extend(sorted(p.glob("*.toml")) if p.is_dir() else [p])
    folder = models_dir() / "workloads"
    preset = folder / f"{workload}.toml"
    if preset.is_file():
        candidates.append(preset)
    if folder.is_dir():
        candidates.extend(p for p in sorted(folder.glob("*.toml")) if p != preset)
    for path in candidates:
        model = load_workload_model(path)
        if model.matches_run(workload, options):
            return model
    opts = " ".join(f"--workload-option {k}={v}" for k, v in (options or {}).items())
    raise ValueError(
        f"no workload model for {workload!r} with options {dict(options or {})} among "
        f"{len(candidates)} file(s); generate one with: kfacperf calibrate --workload "
        f"{workload} {opts} --out models/workloads/NAME.toml".replace("  ", " ")
    )
