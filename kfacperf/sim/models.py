"""Workload, device and cluster models: dataclasses, strict TOML loading, preset names.

Everything the simulator reads about a network, a GPU and a cluster comes through here::

    from kfacperf.sim.models import load_workload, load_device, load_cluster
    workload = load_workload("resnet50")        # preset name, alias or path to a .toml
    device = load_device("h100")                # -> models/devices/h100-sxm5.toml
    cluster = load_cluster("dgx-h100-ndr")

The dataclasses and per-kind loaders live in :mod:`kfacperf.sim.workload_model`,
:mod:`kfacperf.sim.device_model` and :mod:`kfacperf.sim.cluster_model` (each documents its
TOML keys and units); they are re-exported here.  Loading is strict: an unknown, missing or
mistyped key, a non-positive bandwidth or a key in the wrong unit raises a ``ValueError``
naming the file and the key.
"""
from __future__ import annotations

from pathlib import Path

from kfacperf.sim.cluster_model import (
    ALGORITHMS, OPS, ClusterModel, CollectiveParams, Tier, load_cluster_model,
    save_cluster_model,
)
from kfacperf.sim.device_model import (
    DTYPES, INVERSE_METHODS, STAGE_KINDS, DeviceModel, MeasuredTime, StageEfficiency,
    load_device_model, save_device_model,
)
from kfacperf.sim.presets import list_presets, resolve
from kfacperf.sim.workload_model import (
    LayerModel, WorkloadModel, load_workload_model, save_workload_model,
    workload_model_from_description,
)

__all__ = [
    "ALGORITHMS", "DTYPES", "INVERSE_METHODS", "OPS", "STAGE_KINDS",
    "ClusterModel", "CollectiveParams", "DeviceModel", "LayerModel", "MeasuredTime",
    "StageEfficiency", "Tier", "WorkloadModel",
    "list_presets", "load_cluster", "load_cluster_model", "load_device", "load_device_model",
    "load_workload", "load_workload_model", "resolve", "save_cluster_model",
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
