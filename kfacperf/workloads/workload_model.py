"""A torch model -> the simulator's workload model (its K-FAC layers, shapes and FLOPs).

:func:`build_workload_model` (``kfacperf calibrate --workload NAME|FILE.py:FUNC``) builds the
workload's model on the meta device and walks one forward pass of a batch of 1
(:func:`kfacperf.workloads.describe.walk_model`): the K-FAC layers, each Conv2d's geometry,
and the forward FLOPs outside the K-FAC layers from torch's FLOP counter.  No parameter is
allocated, so a model far larger than this machine's memory is described in seconds.
:func:`workload_model_of` does the same for a model object the caller already has (a
training loop instrumented with :func:`kfacperf.instrument`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

FLOPS_NOTE = "FLOPs outside K-FAC layers counted by torch.utils.flop_counter on the meta device"


def workload_model_of(
    model: Any, example: Any, *, name: str, workload: str | None = None,
    options: Mapping[str, Any] | None = None, custom_options: tuple[str, ...] = (),
    source: str = "", description: str = "", fingerprint: str | None = None,
    strict: bool = True,
) -> Any:
    """The :class:`~kfacperf.sim.models.workload.WorkloadModel` of ``model`` fed ``example``.

    ``example`` is one input with its batch dimension (its first example is used).
    ``fingerprint`` defaults to :func:`layers_fingerprint` of the result: what identifies a
    model that has no registry name or factory file.  ``strict=False``: the model of a
    first-order run, for a model K-FAC cannot train (see
    :func:`~kfacperf.workloads.describe.walk_model`).
    """
    from .describe import walk_model

    example = example[:1]
    return _from_walk(walk_model(model, example, strict=strict), example, name=name,
                      workload=workload,
                      options=options, custom_options=custom_options, source=source,
                      description=description, fingerprint=fingerprint)


def _from_walk(walk: Any, example: Any, *, name: str, workload: str | None,
               options: Mapping[str, Any] | None, custom_options: tuple[str, ...], source: str,
               description: str, fingerprint: str | None) -> Any:
    import torch

    from kfacperf.sim.models.workload_file import workload_model_from_description

    from .describe import NoLayerError

    if not walk.layers:  # the simulator's model is one of layers: none, no model
        raise NoLayerError("; ".join(walk.kfac_problems) or "no K-FAC layer")
    if walk.kfac_problems:  # a first-order run's model (strict=False)
        description = (f"{description}; " if description else "") + (
            "a first-order model: K-FAC cannot train it as is (" + "; ".join(walk.kfac_problems)
            + ")")
    if walk.frozen_params:  # no gradient: the simulator neither all-reduces nor updates them
        description = (f"{description}; " if description else "") + (
            f"{walk.frozen_params:,} frozen parameters (requires_grad=False): held in "
            "memory, neither all-reduced nor updated")
    layers = [dict(l, conv=walk.conv.get(l["name"])) for l in walk.layers]
    kfac_flops = sum(float(l["fwd_flops_per_example"]) for l in walk.layers)
    desc = {
        "name": workload or name, "layers": layers, "batchnorm": walk.batchnorm,
        "input_shape": list(example.shape[1:]),
        "other_params": walk.other_params, "frozen_params": walk.frozen_params,
        "description": description,
        "options": {k: _plain(v) for k, v in (options or {}).items()},
    }
    note = FLOPS_NOTE if walk.on_meta else FLOPS_NOTE.replace("the meta device", "this machine")
    src = f"{source or 'kfacperf.workloads.workload_model_of'} (torch {torch.__version__}); {note}"
    model_ = workload_model_from_description(
        desc, name=name, source=src, input_dtype=str(example.dtype),
        other_fwd_flops_per_example=max(0.0, walk.total_flops - kfac_flops),
        custom_options=custom_options,
    )
    fp = layers_fingerprint(model_) if fingerprint is None else fingerprint
    return dataclasses.replace(model_, fingerprint=fp)


def build_workload_model(name: str, options: dict[str, Any], *, strict: bool = True) -> Any:
    """The workload model of torch workload ``name`` (a registry name or a factory reference)
    built with ``options``; the model is built on the meta device, or for real if its
    forward cannot run there.  ``strict=False``: a first-order run's model (see
    :func:`~kfacperf.workloads.describe.walk_model`)."""
    from kfacperf.workloads import get_workload, workload_options
    from kfacperf.workloads import reference as workload_ref

    from .describe import walk_workload

    workload = get_workload(name, **options)
    defaults = workload_options(name)
    changed = {k: _plain(v) for k, v in options.items() if _plain(defaults.get(k)) != _plain(v)}
    walk, example = walk_workload(workload, strict=strict)
    is_ref = workload_ref.is_reference(name)
    label = workload_ref.parse(name).display if is_ref else name
    model_name = label + ("[" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + "]"
                          if changed else "")
    opts = " ".join(f"--workload-option {k}={json.dumps(v, separators=(',', ':'))}"
                    for k, v in sorted(changed.items()))
    kwargs: dict[str, Any] = dict(
        name=model_name, workload=workload_ref.absolute(name), options=workload.options,
        custom_options=tuple(sorted(changed)), description=workload.description,
        source=f"kfacperf calibrate --workload {workload_ref.absolute(name)} {opts}".rstrip(),
        fingerprint=_reference_fingerprint(name) if is_ref else "",
    )
    return _from_walk(walk, example, **kwargs)


def layers_fingerprint(model: Any) -> str:
    """SHA-256 of a workload model's layer table and other parameters: the identity of a
    model recorded without a registry name or factory file."""
    from kfacperf.sim.models.workload_file import workload_model_to_dict

    d = workload_model_to_dict(model)
    keep = {k: d[k] for k in ("layers", "other_params", "input")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def _reference_fingerprint(name: str) -> str:
    from .user import factory_fingerprint

    return factory_fingerprint(name)


def _plain(value: Any) -> Any:
    """Tuples as lists, so options serialise to JSON/TOML and compare alike."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
