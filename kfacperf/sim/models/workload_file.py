"""Workload models as TOML files, and from a torch workload's description.

API::

    load_workload_model(path) -> WorkloadModel       (strict; errors name file and key)
    save_workload_model(model, path) -> Path
    workload_model_to_dict(model) -> dict
    workload_model_from_description(desc: Mapping) -> WorkloadModel
        (desc is what ``kfacperf.workloads.describe.describe_workload(name)`` returns)

Format 2 lists every layer, K-FAC and BatchNorm, in one ``[[layers]]`` array in forward order
(a BatchNorm layer follows the K-FAC layer before it); format 1 files (K-FAC layers only) are
still read.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfacperf import vocab
from kfacperf.sim.models.toml_io import Table, read_toml, write_toml
from kfacperf.sim.models.workload import (
    BATCHNORM,
    KRONECKER_KINDS,
    LAYER_KINDS,
    ConvGeometry,
    LayerModel,
    WorkloadModel,
)

FORMAT = "kfacperf-workload-2"
FORMATS = ("kfacperf-workload-1", FORMAT)
"""Formats read: 1 (K-FAC layers only) and 2 (BatchNorm layers too)."""


def _batchnorm_from_table(t: Table, follows: str) -> LayerModel:
    channels = t.int("channels", minimum=1)
    params = t.int("params", minimum=1)
    if params != 2 * channels:
        raise t.error("params", f"a batchnorm layer has 2 x channels = {2 * channels} "
                                "parameters (gamma and beta)")
    layer = LayerModel(
        name=t.str("name"), kind=BATCHNORM, dim_a=2, dim_g=channels, params=params,
        rows_per_example=t.int("rows_per_example", minimum=1), fwd_flops_per_example=0.0,
        in_elems_per_example=t.int("in_elems_per_example", minimum=0),
        out_elems_per_example=t.int("out_elems_per_example", minimum=0), follows=follows,
    )
    t.done()
    return layer


def _layer_from_table(t: Table, kinds: tuple[str, ...] = KRONECKER_KINDS) -> LayerModel:
    name = t.str("name")
    kind = t.str("kind", choices=kinds)
    dim_a = t.int("dim_a", minimum=1)
    dim_g = t.int("dim_g", minimum=1)
    params = t.int("params", minimum=1)
    rows_per_example = t.int("rows_per_example", minimum=1)
    fwd_flops_per_example = t.float("fwd_flops_per_example", nonnegative=True)
    in_elems_per_example = t.int("in_elems_per_example", minimum=0)
    out_elems_per_example = t.int("out_elems_per_example", minimum=0)
    conv: ConvGeometry | None = None
    if t.has("conv"):  # optional: only generated for Conv2d layers
        if kind != "conv2d":
            raise t.error("conv", "only a conv2d layer can have conv geometry")
        c = t.table("conv")

        def pair(key: str) -> tuple[int, int]:
            values = c.int_list(key, minimum=1)
            if len(values) != 2:
                raise c.error(key, f"expected two integers [H, W], got {values}")
            return values[0], values[1]

        conv = ConvGeometry(
            in_channels=c.int("in_channels", minimum=1), kernel=pair("kernel"),
            stride=pair("stride"), dilation=pair("dilation"), padded=pair("padded"),
            output=pair("output"),
        )
        c.done()
    t.done()
    try:
        return LayerModel(
            name=name, kind=kind, dim_a=dim_a, dim_g=dim_g, params=params,
            rows_per_example=rows_per_example, fwd_flops_per_example=fwd_flops_per_example,
            in_elems_per_example=in_elems_per_example,
            out_elems_per_example=out_elems_per_example, conv=conv,
        )
    except ValueError as exc:  # name the file and the table
        raise ValueError(f"{t.source}: [{t.prefix.rstrip('.')}] {exc}") from None


def _read_options(t: Table) -> dict[str, Any]:
    out = {}
    for key in t.keys():
        value = t.raw(key)
        items = value if isinstance(value, list) else [value]
        if (isinstance(value, dict)
                or not all(isinstance(v, (int, float, str, bool)) for v in items)):
            raise t.error(key, "an option must be a number, string, bool or array of them, "
                               f"got {value!r}")
        out[key] = value
    t.done()
    return out


def load_workload_model(path: str | Path) -> WorkloadModel:
    """Read a workload TOML strictly (unknown, missing or mistyped keys are errors)."""
    root = read_toml(path)
    fmt = root.str("format", choices=FORMATS)
    name = root.str("name")
    workload = root.str("workload")
    options = _read_options(root.table("options"))
    custom = root.str_list("custom_options")
    bad = [k for k in custom if k not in options]
    if bad:
        raise root.error("custom_options", f"{bad} are not keys of [options]")
    description = root.str("description", nonempty=False)
    source = root.str("source", nonempty=False)
    fingerprint = root.str("fingerprint", nonempty=False) if root.has("fingerprint") else ""
    other_params = root.int("other_params", minimum=0)
    frozen = root.int("frozen_params", minimum=0) if root.has("frozen_params") else 0
    other_flops = root.float("other_fwd_flops_per_example", nonnegative=True)
    inp = root.table("input")
    shape_raw = inp.int_list("shape", minimum=1)
    dtype = inp.str("dtype")
    inp.done()
    layer_tables = root.tables("layers")
    if not layer_tables:
        raise root.error("layers", "needs at least one [[layers]] entry")
    kinds = LAYER_KINDS if fmt == FORMAT else KRONECKER_KINDS
    layers: list[LayerModel] = []
    norms: list[LayerModel] = []
    seen: set[str] = set()
    last = ""  # the K-FAC layer a batchnorm layer follows
    for t in layer_tables:
        if t.has("kind") and t.str("kind", choices=kinds) == BATCHNORM:
            layer = _batchnorm_from_table(t, last)
            norms.append(layer)
        else:
            layer = _layer_from_table(t, kinds)
            layers.append(layer)
            last = layer.name
        if layer.name in seen:
            raise t.error("name", f"duplicate layer name {layer.name!r}")
        seen.add(layer.name)
    if not layers:
        raise root.error("layers", "has no linear or conv2d layer")
    if sum(l.params for l in norms) > other_params:
        raise root.error("other_params", "must include the batchnorm layers' parameters "
                                         f"({sum(l.params for l in norms)})")
    root.done()
    return WorkloadModel(
        name=name, layers=tuple(layers), other_params=other_params,
        other_fwd_flops_per_example=other_flops, input_shape=tuple(shape_raw),
        input_dtype=dtype, source=source, description=description, workload=workload,
        options=options, custom_options=tuple(custom), batchnorm=tuple(norms),
        fingerprint=fingerprint, frozen_params=frozen,
    )


def workload_model_to_dict(model: WorkloadModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": model.name,
        "workload": model.workload,
        "custom_options": list(model.custom_options),
        "description": model.description,
        "source": model.source,
        **({"fingerprint": model.fingerprint} if model.fingerprint else {}),
        "other_params": model.other_params,
        **({"frozen_params": model.frozen_params} if model.frozen_params else {}),
        "other_fwd_flops_per_example": float(model.other_fwd_flops_per_example),
        "options": dict(model.options),
        "input": {"shape": list(model.input_shape), "dtype": model.input_dtype},
        "layers": [
            _batchnorm_dict(l) if l.kind == BATCHNORM else {
                "name": l.name, "kind": l.kind, "dim_a": l.dim_a, "dim_g": l.dim_g,
                "params": l.params, "rows_per_example": l.rows_per_example,
                "fwd_flops_per_example": float(l.fwd_flops_per_example),
                "in_elems_per_example": l.in_elems_per_example,
                "out_elems_per_example": l.out_elems_per_example,
                **({"conv": {
                    "in_channels": l.conv.in_channels, "kernel": list(l.conv.kernel),
                    "stride": list(l.conv.stride), "dilation": list(l.conv.dilation),
                    "padded": list(l.conv.padded), "output": list(l.conv.output),
                }} if l.conv is not None else {}),
            }
            for l in model.fisher_layers(vocab.BN_UNIT if model.batchnorm else vocab.BN_NONE)
        ],
    }


def _batchnorm_dict(l: LayerModel) -> dict[str, Any]:
    return {"name": l.name, "kind": l.kind, "channels": l.channels, "params": l.params,
            "rows_per_example": l.rows_per_example,
            "in_elems_per_example": l.in_elems_per_example,
            "out_elems_per_example": l.out_elems_per_example}


def save_workload_model(model: WorkloadModel, path: str | Path) -> Path:
    header = (
        f"Workload model {model.name!r} for the kfacperf simulator.",
        "K-FAC and BatchNorm layers in forward order; dim_a includes the bias column.",
        "Regenerate with: kfacperf calibrate --workload NAME --out PATH",
    )
    return write_toml(path, workload_model_to_dict(model), header=header)


# ---------------------------------------------------------------------------------------------
_LAYER_KEYS = (
    "name", "kind", "dim_a", "dim_g", "params", "rows_per_example",
    "fwd_flops_per_example", "in_elems_per_example", "out_elems_per_example",
)

_BATCHNORM_KEYS = ("name", "channels", "params", "rows_per_example", "in_elems_per_example",
                   "out_elems_per_example", "follows")


def workload_model_from_description(
    desc: Mapping[str, Any], *, name: str | None = None, source: str = "",
    other_fwd_flops_per_example: float | None = None, input_dtype: str | None = None,
    custom_options: tuple[str, ...] = (),
) -> WorkloadModel:
    """Build a :class:`WorkloadModel` from a ``describe_workload`` dictionary.

    Expected keys: ``name``, ``layers`` (a list of mappings with the :class:`LayerModel`
    fields), ``other_params``; optional ``frozen_params``, ``other_fwd_flops_per_example``,
    ``input_shape``,
    ``input_dtype``, ``description``, ``options``, ``batchnorm`` (mappings with ``name``,
    ``channels``, ``params``, ``rows_per_example``, ``in_elems_per_example``,
    ``out_elems_per_example``, ``follows``).  ``name`` overrides the model's name
    (the registry name stays in ``workload``).  A missing layer field is an error naming
    the layer, so a change in the description format cannot slip through silently.
    """
    for key in ("name", "layers", "other_params"):
        if key not in desc:
            raise ValueError(f"workload description lacks {key!r} (has: {', '.join(desc)})")
    layers = []
    for i, raw in enumerate(desc["layers"]):
        missing = [k for k in _LAYER_KEYS if k not in raw]
        if missing:
            raise ValueError(
                f"workload description layer {i} ({raw.get('name', '?')!r}) lacks "
                f"{', '.join(missing)}"
            )
        kind = str(raw["kind"]).lower()
        kind = {"conv": "conv2d", "conv2d": "conv2d", "linear": "linear"}.get(kind, kind)
        layers.append(
            LayerModel(
                name=str(raw["name"]), kind=kind, dim_a=int(raw["dim_a"]),
                dim_g=int(raw["dim_g"]), params=int(raw["params"]),
                rows_per_example=int(raw["rows_per_example"]),
                fwd_flops_per_example=float(raw["fwd_flops_per_example"]),
                in_elems_per_example=int(raw["in_elems_per_example"]),
                out_elems_per_example=int(raw["out_elems_per_example"]),
                conv=ConvGeometry(**raw["conv"]) if raw.get("conv") else None,
            )
        )
    norms = []
    for i, raw in enumerate(desc.get("batchnorm") or ()):
        missing = [k for k in _BATCHNORM_KEYS if k not in raw]
        if missing:
            raise ValueError(f"workload description batchnorm layer {i} "
                             f"({raw.get('name', '?')!r}) lacks {', '.join(missing)}")
        norms.append(LayerModel(
            name=str(raw["name"]), kind=BATCHNORM, dim_a=2, dim_g=int(raw["channels"]),
            params=int(raw["params"]), rows_per_example=int(raw["rows_per_example"]),
            fwd_flops_per_example=0.0, in_elems_per_example=int(raw["in_elems_per_example"]),
            out_elems_per_example=int(raw["out_elems_per_example"]),
            follows=str(raw["follows"]),
        ))
    dtype = str(input_dtype or desc.get("input_dtype", "float32")).replace("torch.", "")
    options = dict(desc.get("options") or {})
    other = (other_fwd_flops_per_example if other_fwd_flops_per_example is not None
             else float(desc.get("other_fwd_flops_per_example", 0.0)))
    return WorkloadModel(
        name=name or str(desc["name"]),
        workload=str(desc["name"]),
        options=options,
        custom_options=tuple(custom_options),
        layers=tuple(layers),
        other_params=int(desc["other_params"]),
        frozen_params=int(desc.get("frozen_params", 0)),
        other_fwd_flops_per_example=other,
        input_shape=tuple(int(v) for v in desc.get("input_shape", ())),
        input_dtype=dtype,
        source=source or "kfacperf.workloads.describe.describe_workload",
        description=str(desc.get("description", "")),
        batchnorm=tuple(norms),
    )
