"""Workload model: a network's K-FAC layers, in forward order, as the simulator sees them.

API (stable; the step graphs and the engine build on it)::

    LayerModel(*, name, kind, dim_a, dim_g, params, rows_per_example,
               fwd_flops_per_example, in_elems_per_example, out_elems_per_example,
               conv: ConvGeometry | None = None)
    ConvGeometry(*, in_channels, kernel, stride, dilation, padded, output)  # (H, W) pairs
    WorkloadModel(*, name, layers: tuple[LayerModel, ...], other_params: int,
                  other_fwd_flops_per_example: float, input_shape: tuple[int, ...],
                  input_dtype: str, source: str, description: str = "",
                  workload: str = "", options: Mapping[str, Any] = {},
                  custom_options: tuple[str, ...] = ())
        .layer(name) -> LayerModel          .layer_names -> tuple[str, ...]
        .kfac_params / .total_params -> int .fwd_flops_per_example -> float
        .matches_run(workload, options) -> bool
    load_workload_model(path) -> WorkloadModel       (strict; errors name file and key)
    save_workload_model(model, path) -> Path
    workload_model_from_description(desc: Mapping) -> WorkloadModel
        (desc is what ``kfacperf.workloads.describe.describe_workload(name)`` returns)

``dim_a`` includes the bias column (``in_features + 1`` or ``C_in*kh*kw + 1`` when the layer has
a bias); ``dim_g`` is the output dimension.  ``rows_per_example`` is how many rows of ``a`` and
``g`` one example contributes to the factors (output spatial positions for a convolution,
sequence length for a token-wise linear layer, 1 otherwise).  ``other_params`` are the
parameters outside K-FAC layers (normalisation, embeddings); they still travel in the gradient
all-reduce and the update.  ``other_fwd_flops_per_example`` is forward work outside the K-FAC
layers (attention score products, normalisation) when the description knows it, else 0.

``workload`` is the registry name the model was built from (``kfacperf.workloads``),
``options`` the full keyword options it was built with and ``custom_options`` those that
differ from the workload's defaults.  ``name`` is unique per build (the registry name, plus
the non-default options in brackets, e.g. ``resnet50[image_size=64]``), because measured times
in a device model are keyed by it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfacperf.sim.models.toml_io import Table, read_toml, write_toml

LAYER_KINDS = ("linear", "conv2d")
_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b
FORMAT = "kfacperf-workload-1"


@dataclass(frozen=True, kw_only=True)
class ConvGeometry:
    """Shape of a convolution, for stage costs that depend on more than its dims.

    The optimizer computes a convolution's A factor from displacement Grams of the padded
    input (``kfacperf.kfac.conv_factors``), whose cost depends on channels, kernel, stride and
    the padded image size rather than on ``dim_a`` alone.
    """

    in_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padded: tuple[int, int]  # (H, W) of the input after padding
    output: tuple[int, int]  # (H, W) of the output

    def __post_init__(self) -> None:
        for key in ("kernel", "stride", "dilation", "padded", "output"):
            value = tuple(getattr(self, key))
            if len(value) != 2 or any(v < 1 for v in value):
                raise ValueError(f"conv {key} must be two integers >= 1, got {value}")
            object.__setattr__(self, key, value)
        if self.in_channels < 1:
            raise ValueError(f"conv in_channels must be >= 1, got {self.in_channels}")


@dataclass(frozen=True, kw_only=True)
class LayerModel:
    """One K-FAC layer (a Linear or Conv2d); ``conv`` is optional detail for a Conv2d."""

    name: str
    kind: str
    dim_a: int
    dim_g: int
    params: int
    rows_per_example: int
    fwd_flops_per_example: float
    in_elems_per_example: int
    out_elems_per_example: int
    conv: ConvGeometry | None = None

    def __post_init__(self) -> None:
        if self.conv is not None and self.kind != "conv2d":
            raise ValueError(f"layer {self.name!r}: conv geometry on a {self.kind} layer")
        if not self.name:
            raise ValueError("layer name must not be empty")
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"layer {self.name!r}: kind {self.kind!r} not in {LAYER_KINDS}")
        for key in ("dim_a", "dim_g", "params", "rows_per_example"):
            if getattr(self, key) < 1:
                raise ValueError(f"layer {self.name!r}: {key} must be >= 1")
        if self.params != self.dim_a * self.dim_g:  # dim_a counts the bias column
            raise ValueError(f"layer {self.name!r}: params {self.params:,} is not dim_a x dim_g "
                             f"= {self.dim_a:,} x {self.dim_g:,} = {self.dim_a * self.dim_g:,} "
                             "(dim_a includes the bias column)")
        for key in ("fwd_flops_per_example", "in_elems_per_example", "out_elems_per_example"):
            if getattr(self, key) < 0:
                raise ValueError(f"layer {self.name!r}: {key} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class WorkloadModel:
    """A network as the simulator sees it: its K-FAC layers in forward order."""

    name: str
    layers: tuple[LayerModel, ...]
    other_params: int
    other_fwd_flops_per_example: float
    input_shape: tuple[int, ...]
    input_dtype: str
    source: str
    description: str = ""
    workload: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    custom_options: tuple[str, ...] = ()
    _by_name: dict[str, LayerModel] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"workload {self.name!r} has no K-FAC layers")
        by_name: dict[str, LayerModel] = {}
        for layer in self.layers:
            if layer.name in by_name:
                raise ValueError(f"workload {self.name!r}: duplicate layer name {layer.name!r}")
            by_name[layer.name] = layer
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "workload", self.workload or self.name)
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "custom_options", tuple(self.custom_options))
        unknown = [k for k in self.custom_options if k not in self.options]
        if unknown:
            raise ValueError(f"workload {self.name!r}: custom_options {unknown} not in its options")

    def layer(self, name: str) -> LayerModel:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(
                f"workload {self.name!r} has no K-FAC layer {name!r}; "
                f"its layers: {', '.join(self._by_name)}"
            ) from None

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def matches_run(self, workload: str, options: Mapping[str, Any] | None = None) -> bool:
        """Whether a run of ``workload`` with ``options`` (defaults where absent) is this model.

        Every option the run names must have its value here, and every non-default option of
        this model must be named by the run (else the run used the default, not this value).
        """
        options = options or {}
        if workload != self.workload:
            return False
        if any(k not in options for k in self.custom_options):
            return False
        return all(_same(self.options.get(k, _MISSING), v) for k, v in options.items())

    @property
    def kfac_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def total_params(self) -> int:
        return self.kfac_params + self.other_params

    @property
    def fwd_flops_per_example(self) -> float:
        return sum(l.fwd_flops_per_example for l in self.layers) + self.other_fwd_flops_per_example


# ---------------------------------------------------------------------------------------------
def _layer_from_table(t: Table) -> LayerModel:
    kwargs = dict(
        name=t.str("name"),
        kind=t.str("kind", choices=LAYER_KINDS),
        dim_a=t.int("dim_a", minimum=1),
        dim_g=t.int("dim_g", minimum=1),
        params=t.int("params", minimum=1),
        rows_per_example=t.int("rows_per_example", minimum=1),
        fwd_flops_per_example=t.float("fwd_flops_per_example", nonnegative=True),
        in_elems_per_example=t.int("in_elems_per_example", minimum=0),
        out_elems_per_example=t.int("out_elems_per_example", minimum=0),
    )
    if t.has("conv"):  # optional: only generated for Conv2d layers
        if kwargs["kind"] != "conv2d":
            raise t.error("conv", "only a conv2d layer can have conv geometry")
        c = t.table("conv")

        def pair(key: str) -> tuple[int, int]:
            values = c.int_list(key, minimum=1)
            if len(values) != 2:
                raise c.error(key, f"expected two integers [H, W], got {values}")
            return values[0], values[1]

        kwargs["conv"] = ConvGeometry(
            in_channels=c.int("in_channels", minimum=1), kernel=pair("kernel"),
            stride=pair("stride"), dilation=pair("dilation"), padded=pair("padded"),
            output=pair("output"),
        )
        c.done()
    t.done()
    try:
        return LayerModel(**kwargs)
    except ValueError as exc:  # name the file and the table
        raise ValueError(f"{t.source}: [{t.prefix.rstrip('.')}] {exc}") from None


def _read_options(t: Table) -> dict[str, Any]:
    out = {}
    for key in t.keys():
        value = t.raw(key)
        items = value if isinstance(value, list) else [value]
        if isinstance(value, dict) or not all(isinstance(v, (int, float, str, bool)) for v in items):
            raise t.error(key, f"an option must be a number, string, bool or array of them, got {value!r}")
        out[key] = value
    t.done()
    return out


def load_workload_model(path: str | Path) -> WorkloadModel:
    """Read a workload TOML strictly (unknown, missing or mistyped keys are errors)."""
    root = read_toml(path, fmt=FORMAT)
    name = root.str("name")
    workload = root.str("workload")
    options = _read_options(root.table("options"))
    custom = root.str_list("custom_options")
    bad = [k for k in custom if k not in options]
    if bad:
        raise root.error("custom_options", f"{bad} are not keys of [options]")
    description = root.str("description", nonempty=False)
    source = root.str("source", nonempty=False)
    other_params = root.int("other_params", minimum=0)
    other_flops = root.float("other_fwd_flops_per_example", nonnegative=True)
    inp = root.table("input")
    shape_raw = inp.int_list("shape", minimum=1)
    dtype = inp.str("dtype")
    inp.done()
    layer_tables = root.tables("layers")
    if not layer_tables:
        raise root.error("layers", "needs at least one [[layers]] entry")
    layers = [_layer_from_table(t) for t in layer_tables]
    seen: set[str] = set()
    for t, layer in zip(layer_tables, layers):
        if layer.name in seen:
            raise t.error("name", f"duplicate layer name {layer.name!r}")
        seen.add(layer.name)
    root.done()
    return WorkloadModel(
        name=name, layers=tuple(layers), other_params=other_params,
        other_fwd_flops_per_example=other_flops, input_shape=tuple(shape_raw),
        input_dtype=dtype, source=source, description=description, workload=workload,
        options=options, custom_options=tuple(custom),
    )


def workload_model_to_dict(model: WorkloadModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": model.name,
        "workload": model.workload,
        "custom_options": list(model.custom_options),
        "description": model.description,
        "source": model.source,
        "other_params": model.other_params,
        "other_fwd_flops_per_example": float(model.other_fwd_flops_per_example),
        "options": dict(model.options),
        "input": {"shape": list(model.input_shape), "dtype": model.input_dtype},
        "layers": [
            {
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
            for l in model.layers
        ],
    }


def save_workload_model(model: WorkloadModel, path: str | Path) -> Path:
    header = (
        f"Workload model {model.name!r} for the kfacperf simulator.",
        "K-FAC layers in forward order; dim_a includes the bias column.",
        "Regenerate with: kfacperf calibrate --workload NAME --out PATH",
    )
    return write_toml(path, workload_model_to_dict(model), header=header)


# ---------------------------------------------------------------------------------------------
_LAYER_KEYS = (
    "name", "kind", "dim_a", "dim_g", "params", "rows_per_example",
    "fwd_flops_per_example", "in_elems_per_example", "out_elems_per_example",
)


def workload_model_from_description(
    desc: Mapping[str, Any], *, name: str | None = None, source: str = "",
    other_fwd_flops_per_example: float | None = None, input_dtype: str | None = None,
    custom_options: tuple[str, ...] = (),
) -> WorkloadModel:
    """Build a :class:`WorkloadModel` from a ``describe_workload`` dictionary.

    Expected keys: ``name``, ``layers`` (a list of mappings with the :class:`LayerModel`
    fields), ``other_params``; optional ``other_fwd_flops_per_example``, ``input_shape``,
    ``input_dtype``, ``description``, ``options``.  ``name`` overrides the model's name
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
        other_fwd_flops_per_example=other,
        input_shape=tuple(int(v) for v in desc.get("input_shape", ())),
        input_dtype=dtype,
        source=source or "kfacperf.workloads.describe.describe_workload",
        description=str(desc.get("description", "")),
    )
