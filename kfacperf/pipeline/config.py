"""What ``kfacperf demo`` is asked to do (:class:`DemoConfig`) and where it writes.

This module never imports torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfacperf import vocab as S
from kfacperf.workloads import reference as workload_ref

KIB = 1024
MIB = 1024 * KIB

KFAC_STRATEGIES: tuple[str, ...] = S.KFAC_STRATEGIES
"""K-FAC strategies the demo can profile next to the SGD baseline."""

SCALE_STRATEGIES: tuple[str, ...] = S.SIM_STRATEGIES
"""Strategies simulated on the cluster presets."""


@dataclass(frozen=True, kw_only=True)
class ClusterTarget:
    """A cluster preset and the datasheet device it is built from."""

    cluster: str
    device: str


DEFAULT_CLUSTERS: tuple[ClusterTarget, ...] = (
    ClusterTarget(cluster="dgx-h100-ndr", device="h100"),
    ClusterTarget(cluster="abci-v100", device="v100"),
)

DEFAULT_SCALE_GPUS: tuple[int, ...] = tuple(2 ** i for i in range(13))  # 1 .. 4096

DEFAULT_PLAN = ClusterTarget(cluster="abci-v100", device="v100")
"""Where the demo plans ``scale_workload``: SP-NGD's own cluster, for its convergence data."""
DEFAULT_PLAN_GPUS: tuple[int, ...] = tuple(2 ** i for i in range(3, 11))  # 8 .. 1024
DEFAULT_PLAN_CONVERGENCE: tuple[str, ...] = ("mlperf-v0.7-lars-resnet50", "spngd-resnet50")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Settings of one demo run.

    The local part profiles ``sgd`` and each of ``strategies`` with 1 process (the
    calibration runs) and with each of ``predict_nprocs`` processes (the runs predicted from
    that calibration), one torch thread per rank.  The scale part simulates
    ``scale_workload`` on each of ``clusters`` at ``scale_gpus``, and the plan searches the
    best SGD and K-FAC configuration of ``scale_workload`` on ``plan`` at ``plan_gpus`` (time
    to the targets of ``plan_convergence``).  ``batch_size`` is per rank
    (None: the workload's default).  The defaults (CIFAR ResNet-20, batch 32, 20 measured
    steps per run) are sized to finish within about 3 minutes on an idle 2-core machine.
    """

    workload: str = "resnet20"
    workload_options: Mapping[str, Any] = field(default_factory=dict)
    strategies: tuple[str, ...] = (S.SPNGD,)
    predict_nprocs: tuple[int, ...] = (2,)
    steps: int = 20
    warmup: int = 3
    batch_size: int | None = 32
    out: str = "reports/demo"
    timeout_s: float = 120.0
    commbench_sizes: tuple[int, ...] = (4 * KIB, 256 * KIB, 4 * MIB)
    commbench_reps: int = 5
    commbench_warmup: int = 2
    scale_workload: str = "resnet50"
    scale_batch_per_gpu: int = 32
    scale_factor_interval: int = 10
    scale_inverse_interval: int = 100
    scale_gpus: tuple[int, ...] = DEFAULT_SCALE_GPUS
    clusters: tuple[ClusterTarget, ...] = DEFAULT_CLUSTERS
    whatif_bandwidth: tuple[float, ...] = (0.5, 2.0)
    """Bandwidth scales simulated as what-ifs on the first cluster (none: skip)."""
    plan: ClusterTarget | None = DEFAULT_PLAN
    """The cluster ``kfacperf plan`` searches for ``scale_workload`` at the end (None: skip)."""
    plan_gpus: tuple[int, ...] = DEFAULT_PLAN_GPUS
    plan_convergence: tuple[str, ...] = DEFAULT_PLAN_CONVERGENCE

    def __post_init__(self) -> None:
        def positive_int(key: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"demo: {key} must be a positive integer, got {value!r}")

        if not isinstance(self.workload, str) or not self.workload:
            raise ValueError(f"demo: workload must be a name, got {self.workload!r}")
        if workload_ref.is_reference(self.workload):  # the user's own model: FILE.py:FUNC
            object.__setattr__(self, "workload", workload_ref.absolute(self.workload))
        if not self.strategies:
            raise ValueError("demo: give at least one K-FAC strategy "
                             f"({', '.join(KFAC_STRATEGIES)})")
        bad = [s for s in self.strategies if s not in KFAC_STRATEGIES]
        if bad:
            raise ValueError(f"demo: unknown strategy {bad[0]!r}; the demo profiles sgd and "
                             f"one or more of {', '.join(KFAC_STRATEGIES)}")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"demo: strategy given twice in {list(self.strategies)}")
        for key in ("steps", "commbench_reps", "scale_batch_per_gpu", "scale_factor_interval",
                    "scale_inverse_interval"):
            positive_int(key, getattr(self, key))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"demo: warmup must be a non-negative integer, got {self.warmup!r}")
        if self.commbench_warmup < 0:
            raise ValueError(f"demo: commbench_warmup must be >= 0, got {self.commbench_warmup}")
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        if not self.predict_nprocs:
            raise ValueError("demo: predict_nprocs needs at least one process count")
        for n in self.predict_nprocs:
            positive_int("predict_nprocs", n)
            if n < 2:
                raise ValueError(f"demo: predict_nprocs are multi-process runs (>= 2), got {n}")
        try:
            S.check_intervals(self.scale_factor_interval, self.scale_inverse_interval,
                              names=("scale_factor_interval", "scale_inverse_interval"))
        except ValueError as exc:
            raise ValueError(f"demo: {exc}") from None
        if not self.scale_gpus:
            raise ValueError("demo: scale_gpus needs at least one GPU count")
        for g in self.scale_gpus:
            positive_int("scale_gpus", g)
        if not self.clusters:
            raise ValueError("demo: give at least one cluster preset")
        if not self.commbench_sizes or any(s < 1 for s in self.commbench_sizes):
            raise ValueError(f"demo: commbench sizes must be >= 1 byte, got "
                             f"{list(self.commbench_sizes)}")
        if len(set(self.commbench_sizes)) < 2:
            raise ValueError("demo: commbench needs two or more message sizes to fit "
                             "latency and bandwidth")
        for s in self.whatif_bandwidth:
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
                raise ValueError(f"demo: what-if bandwidth scales must be > 0, got {s!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"demo: timeout_s must be > 0, got {self.timeout_s!r}")
        if self.plan is not None:
            if not self.plan_gpus:
                raise ValueError("demo: plan_gpus needs at least one GPU count")
            for g in self.plan_gpus:
                positive_int("plan_gpus", g)

    @property
    def nprocs(self) -> tuple[int, ...]:
        """Every process count profiled: 1 (calibration) first."""
        return (1, *sorted(set(self.predict_nprocs)))

    @property
    def profiled_strategies(self) -> tuple[str, ...]:
        return (S.SGD, *self.strategies)

    @property
    def paths(self) -> DemoPaths:
        return DemoPaths(root=Path(self.out))


def quick_config(**overrides: Any) -> DemoConfig:
    """A tiny run (a few steps, a small communication sweep, five GPU counts, a plan at two)."""
    settings: dict[str, Any] = dict(
        steps=3, warmup=1, commbench_sizes=(4 * KIB, 256 * KIB, 1 * MIB), commbench_reps=2,
        commbench_warmup=1, scale_gpus=(1, 8, 64, 512, 4096), whatif_bandwidth=(),
        plan_gpus=(64, 1024),
    )
    settings.update(overrides)
    return DemoConfig(**settings)


@dataclass(frozen=True, kw_only=True)
class DemoPaths:
    """The demo's files: the page at the top, its inputs in sub-directories beside it."""

    root: Path

    @property
    def report(self) -> Path:
        return self.root / "index.html"

    @property
    def traces(self) -> Path:
        return self.root / "traces"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def results(self) -> Path:
        """The headline numbers as JSON."""
        return self.root / "demo.json"

    @property
    def plan(self) -> Path:
        """The plan (``kfacperf report --plan`` reads it)."""
        return self.root / "plan.json"

    @property
    def validation(self) -> Path:
        """The held-out runs' measured and predicted step times (``report --validation``)."""
        return self.root / "validation.json"

    def trace(self, workload: str, strategy: str, nproc: int) -> Path:
        return self.traces / f"{workload_ref.label(workload)}-{strategy}-p{nproc}"

    def device_model(self) -> Path:
        return self.models / "devices" / "local-cpu.toml"

    def cluster_model(self) -> Path:
        return self.models / "clusters" / "local-cpu.toml"

    def workload_models(self) -> Path:
        return self.models / "workloads"

    def local_prediction(self, workload: str) -> Path:
        return self.predictions / f"{workload_ref.label(workload)}-local"

    def scale_prediction(self, workload: str, cluster: str, suffix: str = "") -> Path:
        return self.predictions / f"{workload}-{cluster}{suffix}"
