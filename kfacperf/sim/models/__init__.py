"""Workload, device and cluster models: dataclasses, strict TOML loading, preset names.

Everything the simulator reads about a network, a GPU and a cluster comes through here::

    from kfacperf.sim.models import load_workload, load_device, load_cluster
    workload = load_workload("resnet50")        # preset name, alias or path to a .toml
    device = load_device("h100")                # -> models/devices/h100-sxm5.toml
    cluster = load_cluster("dgx-h100-ndr")

The dataclasses and per-kind loaders live in :mod:`kfacperf.sim.models.workload`,
:mod:`kfacperf.sim.models.device` and :mod:`kfacperf.sim.models.cluster` (each documents its
TOML keys and units); a cluster's optional host model, ranks sharing CPU cores, in
:mod:`kfacperf.sim.models.host`; they are re-exported here.  Loading is strict: an unknown,
missing or mistyped key, a non-positive bandwidth or a key in the wrong unit raises a
``ValueError`` naming the file and the key.
"""
from __future__ import annotations

import json
import os
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
from kfacperf.workloads import reference as workload_ref

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
    text = str(name_or_path)
    if not isinstance(name_or_path, Path) and not text.endswith(".toml") \
            and workload_ref.is_reference(text):
        raise ValueError(
            f"--workload {text} names a torch model; the simulator reads its workload model: "
            f"generate it with kfacperf calibrate --workload {text} --out my-model.toml and "
            "pass --workload my-model.toml (a trace of it has one: TRACE/workload.toml)")
    return load_workload_model(resolve("workloads", name_or_path))


def load_device(name_or_path: str | os.PathLike[str]) -> DeviceModel:
    """A device model from a preset name or alias (``h100``) or a path."""
    return load_device_model(resolve("devices", name_or_path))


def load_cluster(name_or_path: str | os.PathLike[str]) -> ClusterModel:
    """A cluster model from a preset name or alias (``abci``) or a path."""
    return load_cluster_model(resolve("clusters", name_or_path))


def workload_for_run(
    workload: str, options: Mapping[str, Any] | None = None, *,
    search: Iterable[str | Path] = (), fingerprint: str = "",
) -> WorkloadModel:
    """The workload model of a run of ``workload`` built with ``options``.

    Looks at the ``.toml`` files in ``search`` (files or folders) and then in
    ``models/workloads/``, the preset named ``workload`` first, and returns the first whose
    registry name and options match (options the run leaves out are the defaults) and whose
    fingerprint is the run's (``workload_fingerprint`` in run.json: the user's own models,
    see :mod:`kfacperf.sim.models.workload`).  Without a match the error says how to make one.
    """
    candidates: list[Path] = []
    for entry in search:
        p = Path(entry)
        candidates.extend(sorted(p.glob("*.toml")) if p.is_dir() else [p])
    folder = models_dir() / "workloads"
    preset = folder / f"{workload}.toml"
    if not workload_ref.is_reference(workload) and preset.is_file():
        candidates.append(preset)
    if folder.is_dir():
        candidates.extend(p for p in sorted(folder.glob("*.toml")) if p != preset)
    other_versions = []
    for path in candidates:
        model = load_workload_model(path)
        if model.matches_run(workload, options, fingerprint):
            return model
        if fingerprint and model.matches_run(workload, options, model.fingerprint):
            other_versions.append(path)
    opts = "".join(f" --workload-option {k}={json.dumps(v, separators=(',', ':'))}"
                   for k, v in (options or {}).items())
    make = f"kfacperf calibrate --workload {workload}{opts} --out my-model.toml"
    if workload_ref.is_reference(workload):
        head = (f"no workload model for {workload_ref.match_key(workload)} with options "
                f"{dict(options or {})} and fingerprint {fingerprint[:12] or '(none)'} among "
                f"{len(candidates)} file(s)")
        if other_versions:
            head += (f" ({', '.join(map(str, other_versions))} describe another version of "
                     "the file)")
        raise ValueError(f"{head}; a trace of kfacperf profile carries its own (TRACE/"
                        f"workload.toml); else generate one with: {make}, then pass "
                        "--workload-model my-model.toml")
    if fingerprint:
        raise ValueError(f"no workload model for {workload!r} with fingerprint "
                        f"{fingerprint[:12]} among {len(candidates)} file(s): a trace recorded "
                        "by kfacperf.instrument carries its own (TRACE/workload.toml); pass it "
                        "with --workload-model")
    raise ValueError(
        f"no workload model for {workload!r} with options {dict(options or {})} among "
        f"{len(candidates)} file(s); a trace carries its own where its run could describe "
        "the model (TRACE/workload.toml: pass it with --workload-model); for a built-in "
        f"workload, generate one with: {make.replace('my-model', 'models/workloads/NAME')}"
    )
