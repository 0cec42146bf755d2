"""Workload model: a network's K-FAC layers, in forward order, as the simulator sees them.

API (stable; the step graphs and the engine build on it)::

    LayerModel(*, name, kind, dim_a, dim_g, params, rows_per_example,
               fwd_flops_per_example, in_elems_per_example, out_elems_per_example,
               conv: ConvGeometry | None = None, follows: str = "")
        .channels -> int  (a batchnorm layer's C)
    ConvGeometry(*, in_channels, kernel, stride, dilation, padded, output)  # (H, W) pairs
    WorkloadModel(*, name, layers: tuple[LayerModel, ...], other_params: int,
                  other_fwd_flops_per_example: float, input_shape: tuple[int, ...],
                  input_dtype: str, source: str, description: str = "",
                  workload: str = "", options: Mapping[str, Any] = {},
                  custom_options: tuple[str, ...] = (),
                  batchnorm: tuple[LayerModel, ...] = (), fingerprint: str = "")
        .layer(name) -> LayerModel          .layer_names -> tuple[str, ...]
        .kfac_params / .total_params -> int .fwd_flops_per_example -> float
        .fisher_layers(bn_blocks) -> tuple[LayerModel, ...]   (forward order)
        .other_params_with(bn_blocks) -> int   .batchnorm_params -> int
        .matches_run(workload, options, fingerprint="") -> bool

Reading and writing TOML files and building a model from a torch workload's description are
in :mod:`kfacperf.sim.models.workload_file`.

``dim_a`` includes the bias column (``in_features + 1`` or ``C_in*kh*kw + 1`` when the layer has
a bias); ``dim_g`` is the output dimension.  ``rows_per_example`` is how many rows of ``a`` and
``g`` one example contributes to the factors (output spatial positions for a convolution,
sequence length for a token-wise linear layer, 1 otherwise).  ``other_params`` are the
parameters outside K-FAC layers (normalisation, embeddings); they still travel in the gradient
all-reduce and the update.  ``other_fwd_flops_per_example`` is forward work outside the K-FAC
layers (attention score products, normalisation) when the description knows it, else 0.

**BatchNorm layers** (``kind = "batchnorm"``) are kept apart, in ``batchnorm``: each is a
Fisher block only when the optimizer runs with ``bn_blocks = "unit"`` or ``"full"``
(:data:`kfacperf.vocab.BN_BLOCKS`); otherwise their parameters are among ``other_params``
like any other.  A BatchNorm layer's ``dim_g`` is its channels C and ``dim_a`` is 2 (its
gradient is the ``C x 2`` matrix ``[∇γ | ∇β]``, as in the optimizer), ``rows_per_example``
the spatial positions one example has (H x W), ``params`` 2C, and ``fwd_flops_per_example``
0 (elementwise work, not counted, like torch's FLOP counter).  ``follows`` names the K-FAC
layer the forward pass ran just before it ("" for none), which places it among the layers:
:meth:`WorkloadModel.fisher_layers` gives every Fisher block of a ``bn_blocks`` setting in
forward order.  In the TOML file (format 2) all layers are one ``[[layers]]`` array in
forward order; files of format 1 (no BatchNorm layers) are still read.

``workload`` is the registry name the model was built from (``kfacperf.workloads``),
``options`` the full keyword options it was built with and ``custom_options`` those that
differ from the workload's defaults.  ``name`` is unique per build (the registry name, plus
the non-default options in brackets, e.g. ``resnet50[image_size=64]``), because measured times
in a device model are keyed by it.

A model of the user's own network has ``workload`` = its factory reference
(``/path/my_model.py:build``, :mod:`kfacperf.workload_ref`) or the name a training loop gave
it, and a ``fingerprint``: the SHA-256 of the factory's file, or of the layer table for a
model recorded from a training loop.  A run matches such a model only with the same
fingerprint (a registry model has none), so an edited file or a different network of the same
name is never taken for it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kfacperf import vocab
from kfacperf.workloads.reference import match_key

KRONECKER_KINDS = ("linear", "conv2d")
BATCHNORM = "batchnorm"
LAYER_KINDS = (*KRONECKER_KINDS, BATCHNORM)
_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


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
    """One K-FAC layer (a Linear or Conv2d; ``conv`` is optional detail for a Conv2d), or a
    BatchNorm layer (``kind = "batchnorm"``, see the module docstring)."""

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
    follows: str = ""

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
        if self.conv is not None:
            self._check_conv(self.conv)
        if self.kind == BATCHNORM:
            if self.dim_a != 2 or self.params != 2 * self.dim_g:
                raise ValueError(f"batchnorm layer {self.name!r}: dim_a must be 2 and params "
                                 f"2 x channels ({2 * self.dim_g}), got dim_a={self.dim_a}, "
                                 f"params={self.params}")
        elif self.follows:
            raise ValueError(f"layer {self.name!r}: only a batchnorm layer follows another")

    def _check_conv(self, c: ConvGeometry) -> None:
        """The geometry must be the layer's own: ``dim_a`` is in_channels x kernel (+ 1 for
        a bias) and one row per output position, or costs that read the geometry (the
        A factor's) would price another layer than the dims do."""
        patch = c.in_channels * c.kernel[0] * c.kernel[1]
        if self.dim_a not in (patch, patch + 1):
            raise ValueError(f"layer {self.name!r}: dim_a {self.dim_a:,} is not in_channels x "
                             f"kernel = {c.in_channels} x {c.kernel[0]} x {c.kernel[1]} = "
                             f"{patch:,} (+ 1 with a bias): the conv geometry is another "
                             "layer's")
        if self.rows_per_example != c.output[0] * c.output[1]:
            raise ValueError(f"layer {self.name!r}: rows_per_example {self.rows_per_example:,} "
                             f"is not the output's {c.output[0]} x {c.output[1]} positions")

    @property
    def channels(self) -> int:
        """A BatchNorm layer's channels C (its ``dim_g``)."""
        if self.kind != BATCHNORM:
            raise ValueError(f"layer {self.name!r} is a {self.kind} layer, not batchnorm")
        return self.dim_g


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
    batchnorm: tuple[LayerModel, ...] = ()
    fingerprint: str = ""
    frozen_params: int = 0
    """Parameters without a gradient (``requires_grad=False``): held in memory, neither
    all-reduced nor updated."""
    _by_name: dict[str, LayerModel] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"workload {self.name!r} has no K-FAC layers")
        by_name: dict[str, LayerModel] = {}
        for layer in (*self.layers, *self.batchnorm):
            if layer.name in by_name:
                raise ValueError(f"workload {self.name!r}: duplicate layer name {layer.name!r}")
            by_name[layer.name] = layer
        wrong = [l.name for l in self.layers if l.kind == BATCHNORM]
        wrong += [l.name for l in self.batchnorm if l.kind != BATCHNORM]
        if wrong:
            raise ValueError(f"workload {self.name!r}: layers {wrong} are in the wrong list "
                             "(batchnorm layers go in 'batchnorm', the others in 'layers')")
        unknown = [l.follows for l in self.batchnorm
                   if l.follows and (l.follows not in by_name or by_name[l.follows].kind
                                     == BATCHNORM)]
        if unknown:
            raise ValueError(f"workload {self.name!r}: batchnorm layers follow unknown K-FAC "
                             f"layer(s) {unknown}")
        bn_params = sum(l.params for l in self.batchnorm)
        if bn_params > self.other_params:
            raise ValueError(f"workload {self.name!r}: other_params ({self.other_params}) must "
                             f"include the batchnorm parameters ({bn_params})")
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "batchnorm", tuple(self.batchnorm))
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
        """The K-FAC layers' names (BatchNorm layers are in :meth:`fisher_layers`)."""
        return tuple(l.name for l in self.layers)

    def fisher_layers(self, bn_blocks: str = vocab.BN_NONE) -> tuple[LayerModel, ...]:
        """The Fisher blocks of ``bn_blocks`` in forward order: the K-FAC layers, with each
        BatchNorm layer right after the layer it follows when BatchNorm layers are blocks."""
        vocab.check_choice("bn_blocks", bn_blocks, vocab.BN_BLOCKS)
        if bn_blocks == vocab.BN_NONE:
            return self.layers
        if not self.batchnorm:
            raise ValueError(
                f"workload {self.name!r} has no batchnorm layers to make Fisher blocks of "
                f"(bn_blocks={bn_blocks!r}; use 'none'); if its model file is of format 1, "
                "which predates them, regenerate it with kfacperf calibrate --workload "
                f"{self.workload} --out FILE")
        after: dict[str, list[LayerModel]] = {}
        for l in self.batchnorm:
            after.setdefault(l.follows, []).append(l)
        out = list(after.get("", []))
        for l in self.layers:
            out.append(l)
            out.extend(after.get(l.name, []))
        return tuple(out)

    @property
    def batchnorm_params(self) -> int:
        return sum(l.params for l in self.batchnorm)

    def other_params_with(self, bn_blocks: str = vocab.BN_NONE) -> int:
        """Parameters outside the Fisher blocks of ``bn_blocks``."""
        vocab.check_choice("bn_blocks", bn_blocks, vocab.BN_BLOCKS)
        if bn_blocks == vocab.BN_NONE:
            return self.other_params
        return self.other_params - self.batchnorm_params

    def matches_run(self, workload: str, options: Mapping[str, Any] | None = None,
                    fingerprint: str = "") -> bool:
        """Whether a run of ``workload`` with ``options`` (defaults where absent) is this model.

        Every option the run names must have its value here, and every non-default option of
        this model must be named by the run (else the run used the default, not this value).
        A factory reference matches by file name and function (see the module docstring) and
        the ``fingerprint`` must be the same.
        """
        options = options or {}
        if match_key(workload) != match_key(self.workload) or fingerprint != self.fingerprint:
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
