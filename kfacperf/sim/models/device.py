"""Device model: what one GPU (or one CPU rank) computes how fast.

API (stable)::

    STAGE_KINDS = ("forward", "backward", "factor_compute", "inverse", "precondition", "update")
    DTYPES = ("fp32", "tf32", "bf16")
    MODES = ("roofline", "additive")
    StageEfficiency(*, efficiency: float, mem_efficiency: float, overhead_us: float, assumed: bool,
                    row_us: float = 0.0)
    MeasuredTime(*, workload, stage, layer, batch, inverse_method, time_us, fingerprint="")
    DeviceModel(*, name, fp32_tflops, tf32_tflops, bf16_tflops, mem_bandwidth_GBps,
                stages: Mapping[str, StageEfficiency], mode: str = "roofline",
                measured: tuple[MeasuredTime, ...] = (), source: str = "", description: str = "",
                capture_overhead: Mapping[str, float] = {},
                layer_host_us: Mapping[str, float] = {},
                inverse_methods: Mapping[str, StageEfficiency] = {},
                memory_GB: float = 0.0, memory_source: str = "")
        .peak_flops_per_us(dtype) -> float   .mem_bytes_per_us -> float
        .capture_scale(kind) -> float        .host_us(step) -> float
        .stage(kind, inverse_method=None) -> StageEfficiency
        .with_stages(**{kind: StageEfficiency}) -> DeviceModel
    load_device_model(path) -> DeviceModel  (strict)      save_device_model(model, path) -> Path

A call of a stage of kind ``k`` whose phases (:mod:`kfacperf.sim.costs.stage_work`) do ``F_i``
FLOPs and move ``B_i`` bytes takes (:mod:`kfacperf.sim.costs.model`)::

    roofline:  overhead_us[k] + row_us[k] R + sum_i max(F_i / (peak * efficiency[k]),
                                                    B_i / (mem_bandwidth * mem_efficiency[k]))
    additive:  overhead_us[k] + row_us[k] R + sum_i F_i / (peak * efficiency[k])
                                            + sum_i B_i / (mem_bandwidth * mem_efficiency[k])

``R`` is the rows of the matrices the call factorises (the inverse: ``dA + dG``; 0 for every
other stage), ``row_us`` (optional, 0 when absent) the time per row.  A GPU factorisation is
latency-bound well past the sizes K-FAC inverts: blocked Cholesky and the eigensolvers' panel
steps are a few dependent kernel launches each, so ``overhead + row_us n`` dominates below
n ~ 2,000 and FLOPs / (peak efficiency) only above (on a V100, a BERT-Large block's twelve
Cholesky inverses of sides 1,024 and 4,096 ran at 12 % of the fp32 peak).  One efficiency
times FLOPs cannot fit both small and large layers; these three terms can.  Eigensolvers
and Cholesky differ in that floor by an order of magnitude, so an optional
``[inverse_method.<eigen|cholesky>]`` table gives the inverse stage's terms for one method
(absent: ``[stages.inverse]`` applies to both).

``roofline`` suits GPUs, whose kernels overlap arithmetic and memory traffic; ``additive``
("no overlap", as Calculon's ``processing_mode``) suits CPU kernels such as strided reductions
that reach a small fraction of either peak.  Efficiencies are in (0, 1]; ``assumed = true``
marks a guess (datasheet presets), ``false`` a value fitted from a trace.
``tf32_tflops``/``bf16_tflops`` may be 0 for "not supported" (Volta has no TF32; its
half-precision tensor-core rate is given as ``bf16_tflops``, which is the FP16 rate there).
``[[measured]]`` entries (optional) are per-call times taken from a trace of this very device;
the cost model prefers them over the roofline.  An entry applies to one model only: the
workload model's ``name`` (which carries its non-default options) and its ``fingerprint``
(optional, absent for a registry workload: the SHA-256 of a user's factory file or layer
table, :mod:`kfacperf.sim.models.workload`), so another network of the same name, or an
edited file, is never priced with this one's times.

``[capture_overhead]`` (optional; keys of :data:`CAPTURE_STAGES`) is the relative extra time
of forward and backward on factor steps, *besides* the batch statistics themselves (which are
``factor_compute``): the optimizer's hooks keeping inputs and output gradients and running
between the layers' kernels, and the caches the statistics leave cold.  On the development
CPU, backward without its nested statistics took 49-52 ms on ResNet-20 factor steps against
41 ms on plain ones.  Calibration fits it from runs with both kinds of step; absent, it is 0.

``[layer_host_us]`` (optional; keys of :data:`HOST_STEPS`) is the time per K-FAC layer and
step that the optimizer spends *between* stages, on the compute stream: ``load_grad`` forms
each layer's gradient matrix right after backward, ``write_grad`` writes the preconditioned
gradients back (with the KL-clipping scale) right before the update.  A trace charges it to
no stage, yet it is in the step: on the development CPU 0.35-0.5 ms and 0.7-0.8 ms per
ResNet-20 step (22 layers) at every batch size and for both K-FAC strategies.  On a GPU it
is the time the device idles while the host does that work, which is near 0 when kernels are
queued ahead.  Calibration fits it from single-process K-FAC runs; absent, it is 0.

``[memory]`` (optional) is what one device holds: ``capacity_GB`` (10^9 bytes: the total the
device reports, e.g. nvidia-smi's; a datasheet's "80 GB" of HBM counts GiB, 7 % more than
80 x 10^9 bytes) and the ``source`` of that number.  ``kfacperf plan`` drops configurations
that do not fit; absent, the capacity is unknown (0) and the plan asks for one.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kfacperf import vocab as S
from kfacperf.sim.models.toml_io import read_toml, write_toml

STAGE_KINDS: tuple[str, ...] = S.COMPUTE_STAGES
"""The compute stages, each with its efficiency (``forward`` ... ``update``)."""
DTYPES: tuple[str, ...] = S.COMPUTE_DTYPES
MODES: tuple[str, ...] = ("roofline", "additive")
PEAK_FIELDS: tuple[str, ...] = ("fp32_tflops", "tf32_tflops", "bf16_tflops", "mem_bandwidth_GBps")
"""A device model's peaks (its ``[peak]`` table): every efficiency is a fraction of them."""
INVERSE_METHODS: tuple[str, ...] = S.INVERSE_METHODS
FORMAT = "kfacperf-device-1"


@dataclass(frozen=True, kw_only=True)
class StageEfficiency:
    """How close one stage kind gets to the roofline, plus a fixed cost per call."""

    efficiency: float
    mem_efficiency: float
    overhead_us: float
    assumed: bool
    row_us: float = 0.0
    """Time per row of a factorised matrix (the inverse stage's phases carry their rows)."""

    def __post_init__(self) -> None:
        for key in ("efficiency", "mem_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"{key} must be in (0, 1], got {getattr(self, key)}")
        for key in ("overhead_us", "row_us"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class MeasuredTime:
    """Mean time of one call of ``stage`` on ``layer`` ("" for whole-model stages) of the
    workload model named ``workload`` whose fingerprint is ``fingerprint`` ("" for a registry
    workload)."""

    workload: str
    stage: str
    layer: str
    batch: int
    inverse_method: str
    time_us: float
    fingerprint: str = ""

    @property
    def model_key(self) -> tuple[str, str]:
        """The workload model this time belongs to (:func:`workload_key`)."""
        return (self.workload, self.fingerprint)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_KINDS:
            raise ValueError(f"measured stage {self.stage!r} is not one of {STAGE_KINDS}")
        if self.batch < 1 or self.time_us < 0:
            raise ValueError(f"measured {self.stage}/{self.layer}: bad batch or time")


def workload_key(workload: Any) -> tuple[str, str]:
    """What ``[[measured]]`` times of a workload model are keyed by: its ``name`` (registry
    name or factory reference, with its non-default options) and its ``fingerprint``."""
    return (str(workload.name), str(getattr(workload, "fingerprint", "") or ""))


CAPTURE_STAGES: tuple[str, ...] = (S.FORWARD, S.BACKWARD)
"""The stages a factor step's statistics capture makes slower (``capture_overhead``)."""

HOST_STEPS: tuple[str, ...] = ("load_grad", "write_grad")
"""The optimizer's per-layer host work between stages (``layer_host_us``)."""


@dataclass(frozen=True, kw_only=True)
class DeviceModel:
    """Peak rates plus a fitted (or assumed) efficiency per stage kind."""

    name: str
    fp32_tflops: float
    tf32_tflops: float
    bf16_tflops: float
    mem_bandwidth_GBps: float
    stages: Mapping[str, StageEfficiency]
    mode: str = "roofline"
    measured: tuple[MeasuredTime, ...] = ()
    source: str = ""
    description: str = ""
    capture_overhead: Mapping[str, float] = field(default_factory=dict)
    layer_host_us: Mapping[str, float] = field(default_factory=dict)
    inverse_methods: Mapping[str, StageEfficiency] = field(default_factory=dict)
    memory_GB: float = 0.0
    """Memory of one device in GB (10^9 bytes); 0 when unknown."""
    memory_source: str = ""
    _rates: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"device {self.name!r}: mode {self.mode!r} not in {MODES}")
        if self.fp32_tflops <= 0:
            raise ValueError(f"device {self.name!r}: fp32_tflops must be > 0")
        if self.mem_bandwidth_GBps <= 0:
            raise ValueError(f"device {self.name!r}: mem_bandwidth_GBps must be > 0")
        if self.tf32_tflops < 0 or self.bf16_tflops < 0:
            raise ValueError(f"device {self.name!r}: peak rates must be >= 0")
        if not (isinstance(self.memory_GB, (int, float)) and 0 <= self.memory_GB < float("inf")):
            raise ValueError(f"device {self.name!r}: memory_GB must be a finite number >= 0, "
                             f"got {self.memory_GB!r}")
        missing = [k for k in STAGE_KINDS if k not in self.stages]
        extra = [k for k in self.stages if k not in STAGE_KINDS]
        if missing or extra:
            raise ValueError(
                f"device {self.name!r}: stages must be exactly {STAGE_KINDS} "
                f"(missing {missing}, unknown {extra})"
            )
        object.__setattr__(self, "stages", {k: self.stages[k] for k in STAGE_KINDS})
        object.__setattr__(self, "measured", tuple(self.measured))
        object.__setattr__(self, "capture_overhead", self._nonnegative_table(
            "capture_overhead", self.capture_overhead, CAPTURE_STAGES))
        object.__setattr__(self, "layer_host_us", self._nonnegative_table(
            "layer_host_us", self.layer_host_us, HOST_STEPS))
        unknown = [m for m in self.inverse_methods if m not in INVERSE_METHODS]
        if unknown:
            raise ValueError(f"device {self.name!r}: inverse_method.{unknown[0]} is not an "
                             f"inverse method; known: {', '.join(INVERSE_METHODS)}")
        object.__setattr__(self, "inverse_methods", {
            m: self.inverse_methods[m] for m in INVERSE_METHODS if m in self.inverse_methods})
        rates = {"fp32": self.fp32_tflops, "tf32": self.tf32_tflops, "bf16": self.bf16_tflops}
        object.__setattr__(self, "_rates", rates)

    def _nonnegative_table(self, name: str, table: Mapping[str, float],
                           keys: tuple[str, ...]) -> dict[str, float]:
        """``table`` checked (keys among ``keys``, finite values >= 0), in ``keys`` order."""
        for key, value in table.items():
            if key not in keys:
                raise ValueError(f"device {self.name!r}: {name} has {key!r}; known: "
                                 f"{', '.join(keys)}")
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"device {self.name!r}: {name}.{key} must be a finite "
                                 f"number >= 0, got {value!r}")
        return {k: float(table[k]) for k in keys if k in table}

    def peak_flops_per_us(self, dtype: str = "fp32") -> float:
        """Peak FLOP per microsecond for ``dtype`` (an error if the device lacks it)."""
        try:
            tflops = self._rates[dtype]
        except KeyError:
            raise ValueError(f"unknown compute dtype {dtype!r}; use one of {DTYPES}") from None
        if tflops <= 0:
            raise ValueError(f"device {self.name!r} has no {dtype} rate (its {dtype}_tflops is 0)")
        return tflops * 1e6

    @property
    def peaks(self) -> dict[str, float]:
        """:data:`PEAK_FIELDS` and their values."""
        return {k: float(getattr(self, k)) for k in PEAK_FIELDS}

    @property
    def mem_bytes_per_us(self) -> float:
        return self.mem_bandwidth_GBps * 1e3

    def capture_scale(self, kind: str) -> float:
        """Factor by which a factor step's statistics capture slows stage ``kind``."""
        return 1.0 + self.capture_overhead.get(kind, 0.0)

    def host_us(self, step: str) -> float:
        """Host time per K-FAC layer of ``step`` (one of :data:`HOST_STEPS`), 0 if unknown."""
        if step not in HOST_STEPS:
            raise ValueError(f"no host step {step!r}; known: {', '.join(HOST_STEPS)}")
        return self.layer_host_us.get(step, 0.0)

    def stage(self, kind: str, inverse_method: str | None = None) -> StageEfficiency:
        """The efficiency of stage ``kind``; for the inverse, that of ``inverse_method`` when
        the device has one of its own (``[inverse_method.<name>]``)."""
        if (kind == S.INVERSE and inverse_method is not None
                and inverse_method in self.inverse_methods):
            return self.inverse_methods[inverse_method]
        try:
            return self.stages[kind]
        except KeyError:
            raise ValueError(f"no compute stage kind {kind!r}; kinds: {STAGE_KINDS}") from None

    def with_stages(self, **updates: StageEfficiency) -> DeviceModel:
        merged = dict(self.stages)
        merged.update(updates)
        return replace(self, stages=merged)


# ---------------------------------------------------------------------------------------------
def load_device_model(path: str | Path) -> DeviceModel:
    """Read a device TOML strictly; every error names the file and the key."""
    root = read_toml(path, fmt=FORMAT)
    name = root.str("name")
    description = root.str("description", nonempty=False)
    source = root.str("source", nonempty=False)
    mode = root.str("mode", choices=MODES)
    peak = root.table("peak")
    rates = dict(
        fp32_tflops=peak.float("fp32_tflops", positive=True),
        tf32_tflops=peak.float("tf32_tflops", nonnegative=True),
        bf16_tflops=peak.float("bf16_tflops", nonnegative=True),
        mem_bandwidth_GBps=peak.float("mem_bandwidth_GBps", positive=True),
    )
    peak.done()
    st = root.table("stages")
    stages = {kind: _efficiency_from_table(st.table(kind)) for kind in STAGE_KINDS}
    st.done()
    methods: dict[str, StageEfficiency] = {}
    if root.has("inverse_method"):
        mt = root.table("inverse_method")
        for key in mt.keys():
            if key not in INVERSE_METHODS:
                raise mt.error(key, f"unknown inverse method; known: {', '.join(INVERSE_METHODS)}")
            methods[key] = _efficiency_from_table(mt.table(key))
        mt.done()
    measured: list[MeasuredTime] = []
    if root.has("measured"):
        for t in root.tables("measured"):
            measured.append(
                MeasuredTime(
                    workload=t.str("workload"),
                    stage=t.str("stage", choices=STAGE_KINDS),
                    layer=t.str("layer", nonempty=False),
                    batch=t.int("batch", minimum=1),
                    inverse_method=t.str("inverse_method", choices=INVERSE_METHODS),
                    time_us=t.float("time_us", nonnegative=True),
                    fingerprint=(t.str("fingerprint", nonempty=False)
                                 if t.has("fingerprint") else ""),
                )
            )
            t.done()
    capture = _optional_nonnegative(root, "capture_overhead", CAPTURE_STAGES)
    host = _optional_nonnegative(root, "layer_host_us", HOST_STEPS)
    memory_GB, memory_source = 0.0, ""
    if root.has("memory"):
        mem = root.table("memory")
        memory_GB = mem.float("capacity_GB", positive=True)
        memory_source = mem.str("source")
        mem.done()
    root.done()
    return DeviceModel(
        name=name, stages=stages, mode=mode, measured=tuple(measured), source=source,
        description=description, capture_overhead=capture, layer_host_us=host,
        inverse_methods=methods, memory_GB=memory_GB, memory_source=memory_source, **rates,
    )


def _efficiency_from_table(t: Any) -> StageEfficiency:
    eff = StageEfficiency(
        efficiency=t.float("efficiency", positive=True, maximum=1.0),
        mem_efficiency=t.float("mem_efficiency", positive=True, maximum=1.0),
        overhead_us=t.float("overhead_us", nonnegative=True),
        assumed=t.bool("assumed"),
        row_us=t.float("row_us", nonnegative=True) if t.has("row_us") else 0.0,
    )
    t.done()
    return eff


def _efficiency_to_dict(s: StageEfficiency) -> dict[str, Any]:
    out: dict[str, Any] = {"efficiency": float(s.efficiency),
                           "mem_efficiency": float(s.mem_efficiency),
                           "overhead_us": float(s.overhead_us)}
    if s.row_us:  # absent: 0
        out["row_us"] = float(s.row_us)
    out["assumed"] = s.assumed
    return out


def _optional_nonnegative(root: Any, name: str, keys: tuple[str, ...]) -> dict[str, float]:
    """An optional table of numbers >= 0 under ``keys`` (others are unknown keys)."""
    if not root.has(name):
        return {}
    table = root.table(name)
    out = {k: table.float(k, nonnegative=True) for k in keys if table.has(k)}
    table.done()
    return out


def device_model_to_dict(model: DeviceModel) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": FORMAT,
        "name": model.name,
        "description": model.description,
        "source": model.source,
        "mode": model.mode,
        "peak": model.peaks,
        "stages": {k: _efficiency_to_dict(s) for k, s in model.stages.items()},
    }
    if model.inverse_methods:
        data["inverse_method"] = {m: _efficiency_to_dict(s)
                                  for m, s in model.inverse_methods.items()}
    if model.capture_overhead:
        data["capture_overhead"] = dict(model.capture_overhead)
    if model.layer_host_us:
        data["layer_host_us"] = dict(model.layer_host_us)
    if model.memory_GB > 0:
        data["memory"] = {"capacity_GB": float(model.memory_GB), "source": model.memory_source}
    if model.measured:
        data["measured"] = [
            {
                "workload": m.workload,
                **({"fingerprint": m.fingerprint} if m.fingerprint else {}),
                "stage": m.stage, "layer": m.layer, "batch": m.batch,
                "inverse_method": m.inverse_method, "time_us": float(m.time_us),
            }
            for m in model.measured
        ]
    return data


def save_device_model(model: DeviceModel, path: str | Path) -> Path:
    header = (
        f"Device model {model.name!r} for the kfacperf simulator.",
        "time(call) = overhead_us + per phase max (roofline) or sum (additive) of",
        "FLOPs / (peak x efficiency) and bytes / (mem_bandwidth x mem_efficiency)",
        "assumed = true marks a guessed efficiency, false one fitted from a trace.",
    )
    return write_toml(path, device_model_to_dict(model), header=header)
