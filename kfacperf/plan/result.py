"""A plan's answer: the best configuration per GPU count and strategy, and its Pareto front.

Stored as JSON (``kfacperf plan --out plan.json``, read back by :func:`load_plan` for the
report)::

    {"format": "kfacperf-plan-1", "inputs": {...}, "convergence": {"sgd": {...}, ...},
     "space": {...}, "stats": {...}, "best": [choice, ...], "missing": [...],
     "pareto": [choice, ...]}

A choice is one configuration with its predicted step time, steps to the target, time to
solution (seconds), GPU-hours and memory per GPU (bytes, by term).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from kfacperf import vocab as S
from kfacperf.plan.convergence import OPTIMIZERS, ConvergenceModel, optimizer_of

FORMAT = "kfacperf-plan-1"
OPTIMIZER_NAMES = {S.SGD: "SGD", S.KFAC: "K-FAC"}


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One configuration at one GPU count, with what the plan predicts for it.

    ``comm_dtype``, ``symmetric`` and ``bucket_mb`` are None where they change nothing (SGD
    has no factors; one GPU communicates nothing); intervals are None for SGD.
    """

    gpus: int
    strategy: str
    label: str
    grad_workers: int | None
    batch_per_gpu: int
    global_batch: int
    factor_interval: int | None
    inverse_interval: int | None
    comm_dtype: str | None
    symmetric: bool | None
    bucket_mb: float | None
    step_us: float
    kind_step_us: dict[str, float]
    steps: float
    epochs: float | None
    extrapolated: bool
    time_s: float
    gpu_hours: float
    memory: dict[str, int]
    convergence: str

    @property
    def optimizer(self) -> str:
        return optimizer_of(self.strategy)

    @property
    def intervals(self) -> str:
        return ("-" if self.factor_interval is None
                else f"{self.factor_interval}/{self.inverse_interval}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Choice:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
        for key in ("gpus", "batch_per_gpu", "global_batch"):
            if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 1:
                raise ValueError(f"{where}: {key} must be a positive integer, got {data[key]!r}")
        for key in ("step_us", "steps", "time_s", "gpu_hours"):
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise ValueError(f"{where}: {key} must be a positive number, got {v!r}")
        choice = cls(**dict(data))
        optimizer_of(choice.strategy)  # a known strategy
        return choice


def pareto_front(choices: Sequence[Choice]) -> list[Choice]:
    """The choices no other beats on both time to solution and GPU-hours, fastest first."""
    front: list[Choice] = []
    best_hours = math.inf
    for c in sorted(choices, key=lambda c: (c.time_s, c.gpu_hours)):
        if c.gpu_hours < best_hours:
            front.append(c)
            best_hours = c.gpu_hours
    return front


def convergence_info(model: ConvergenceModel) -> dict[str, Any]:
    lo, hi = model.batch_range
    return {"name": model.name, "optimizer": model.optimizer, "workload": model.workload,
            "target": model.target, "description": model.description, "path": model.path,
            "batch_range": [lo, hi], "points": len(model.points)}


@dataclass(frozen=True, kw_only=True)
class PlanResult:
    """Everything ``kfacperf plan`` prints, as data."""

    inputs: dict[str, Any]
    convergence: dict[str, dict[str, Any]]
    space: dict[str, Any]
    stats: dict[str, Any]
    choices: tuple[Choice, ...]
    missing: tuple[dict[str, Any], ...] = ()

    @property
    def gpus(self) -> list[int]:
        return sorted({int(g) for g in self.space.get("gpus", [])}
                      | {c.gpus for c in self.choices})

    def best(self, gpus: int, optimizer: str) -> Choice | None:
        """The fastest choice at ``gpus`` among ``optimizer``'s strategies (``sgd`` or
        ``kfac``); None where nothing fit (or the optimizer was not planned).  A GPU count
        the plan did not search, or anything but an optimizer, is a ``ValueError``."""
        if optimizer not in OPTIMIZERS:
            known = " or ".join(OPTIMIZERS)
            if optimizer in S.PROFILE_STRATEGIES:
                raise ValueError(
                    f"best() takes an optimizer ({known}), not the strategy {optimizer!r}: "
                    f"strategies {', '.join(OPTIMIZERS[S.KFAC])} map to {S.KFAC}, so "
                    f"best({gpus!r}, {S.optimizer_of(optimizer)!r}) is the best of them")
            raise ValueError(f"unknown optimizer {optimizer!r}: use {known} (the strategies "
                             f"{', '.join(OPTIMIZERS[S.KFAC])} map to {S.KFAC})")
        planned = self.gpus
        if isinstance(gpus, bool) or gpus not in planned:
            raise ValueError(f"{gpus!r} GPUs were not planned; planned GPU counts: "
                             f"{', '.join(map(str, planned)) or 'none'}")
        mine = [c for c in self.choices if c.gpus == gpus and c.optimizer == optimizer]
        return min(mine, key=lambda c: c.time_s) if mine else None

    def pareto(self) -> list[Choice]:
        return pareto_front(self.choices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "inputs": self.inputs, "convergence": self.convergence,
            "space": self.space, "stats": self.stats,
            "best": [c.to_dict() for c in self.choices], "missing": list(self.missing),
            "pareto": [c.to_dict() for c in self.pareto()],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> PlanResult:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object written by kfacperf plan")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: format {data.get('format')!r} is not {FORMAT!r} "
                             "(write one with kfacperf plan --out FILE)")
        for key in ("inputs", "convergence", "space", "stats", "best"):
            if key not in data:
                raise ValueError(f"{where}: missing key {key!r}")
        for key in ("inputs", "convergence", "space", "stats"):
            if not isinstance(data[key], dict):
                raise ValueError(f"{where}: {key!r} must be an object")
        if not isinstance(data["best"], list):
            raise ValueError(f"{where}: 'best' must be a list of configurations")
        choices = tuple(Choice.from_dict(c, f"{where}: best[{i}]") if isinstance(c, dict) else
                        _not_object(where, i) for i, c in enumerate(data["best"]))
        missing = data.get("missing", [])
        if not isinstance(missing, list):
            raise ValueError(f"{where}: 'missing' must be a list")
        return cls(inputs=data["inputs"], convergence=data["convergence"], space=data["space"],
                   stats=data["stats"], choices=choices, missing=tuple(missing))


def _not_object(where: str, i: int) -> Choice:
    raise ValueError(f"{where}: best[{i}] must be an object")


def save_plan(result: PlanResult, path: str | os.PathLike[str], *, force: bool = False
              ) -> Path:
    """Write the plan as JSON, atomically (a missing number as null).  An existing file is
    replaced only with ``force`` (:func:`kfacperf.safety.check_output_file`)."""
    from kfacperf.safety import atomic_write_text, check_output_file, dumps_json

    out = check_output_file(path, force=force)
    return atomic_write_text(out, dumps_json(result.to_dict(), indent=1) + "\n")


def load_plan(path: str | os.PathLike[str]) -> PlanResult:
    """A plan written by ``kfacperf plan --out`` (errors name the file)."""
    from kfacperf.safety import load_json_file

    return PlanResult.from_dict(load_json_file(path, what="plan file"), str(path))
