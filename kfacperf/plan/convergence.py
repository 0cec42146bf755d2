"""Convergence models: steps to a target quality as a function of the global batch.

A convergence model is a strict TOML file under ``models/convergence/`` (or any path), one per
workload, optimizer and source::

    format = "kfacperf-convergence-1"
    name = "spngd-resnet50"
    workload = "resnet50"        # the workload model's name it applies to
    optimizer = "kfac"           # "sgd" (first-order: SGD, LARS) or "kfac" (spngd, kaisa)
    target = "top-1 74.8-75.4% on ImageNet-1k validation"
    description = "..."          # optional
    examples_per_epoch = 1281167 # optional; needed where a point gives epochs

    [[points]]
    global_batch = 32768
    steps = 1760                 # or: epochs = 45.0
    top1_pct = 75.4              # optional: the quality that run reached
    factor_interval = 12         # kfac only: the statistics interval the steps were measured
    inverse_interval = 12        # with (1 = every step); may be set once at the top instead
    source = "SP-NGD (Osawa et al., TPAMI 2020), Table 1"

Every point names its ``source`` (a publication, or "written by the user: ...").  A model
needs two points or more, at distinct batches.

**Interpolation.**  Between two measured batches, ``log(steps)`` is linear in ``log(batch)``
(a power law through the two points: steps halve when the batch doubles in the regime of
perfect scaling, and less so beyond it).  Outside the measured range the nearest segment's
power law is extended, and the estimate is marked *extrapolated*; nothing leaves the range
silently.

**Statistics intervals.**  K-FAC's steps depend on how stale its statistics are, and no data
here says by how much.  So a K-FAC model also says, per point, the factor and inverse
intervals its steps were measured with, and a plan may use those or fresher ones only.
Between two points the smaller (fresher) of their intervals holds; outside the range, the
nearest point's.
"""
from __future__ import annotations

import bisect
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kfacperf import vocab as S
from kfacperf.sim.models.presets import list_presets, resolve
from kfacperf.sim.models.toml_io import Table, read_toml

FORMAT = "kfacperf-convergence-1"
_LOG_MAX_FLOAT = math.log(sys.float_info.max)
OPTIMIZERS: dict[str, tuple[str, ...]] = {S.SGD: (S.SGD,), S.KFAC: S.KFAC_STRATEGIES}
"""Each optimizer family and the distribution strategies whose steps it describes: K-FAC's
update is the same whichever strategy distributes it."""


def optimizer_of(strategy: str) -> str:
    """The optimizer family (``sgd`` or ``kfac``) of a strategy the simulator models."""
    return S.optimizer_of(strategy, S.SIM_STRATEGIES)


@dataclass(frozen=True, kw_only=True)
class ConvergencePoint:
    """One measured run: steps to the target at ``global_batch``, and where it comes from."""

    global_batch: int
    steps: float
    source: str
    top1_pct: float | None = None
    factor_interval: int | None = None
    inverse_interval: int | None = None


@dataclass(frozen=True, kw_only=True)
class StepsEstimate:
    """Steps to the target at one global batch, and how the estimate was made."""

    global_batch: int
    steps: float
    extrapolated: bool
    max_factor_interval: int | None  # K-FAC: the stalest statistics the data covers there
    max_inverse_interval: int | None
    basis: tuple[int, ...]  # the measured batches the estimate rests on

    @property
    def usable(self) -> bool:
        """Whether the steps are a count a plan can use: at least one, and finite (a power
        law extended far beyond its points can give a fraction of a step, or overflow)."""
        return 1.0 <= self.steps < math.inf

    def allows(self, factor_interval: int, inverse_interval: int) -> bool:
        """Whether statistics refreshed at these intervals are covered by the data."""
        if self.max_factor_interval is None or self.max_inverse_interval is None:
            return True
        return (factor_interval <= self.max_factor_interval
                and inverse_interval <= self.max_inverse_interval)


@dataclass(frozen=True, kw_only=True)
class ConvergenceModel:
    """Steps to ``target`` against the global batch for ``optimizer`` on ``workload``."""

    name: str
    workload: str
    optimizer: str
    target: str
    points: tuple[ConvergencePoint, ...]
    description: str = ""
    examples_per_epoch: int | None = None
    path: str = ""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"convergence model {self.name!r}: optimizer {self.optimizer!r} "
                             f"is not one of {', '.join(OPTIMIZERS)}")
        if len(self.points) < 2:
            raise ValueError(f"convergence model {self.name!r}: needs two points or more "
                             f"(a power law between them), got {len(self.points)}")
        pts = tuple(sorted(self.points, key=lambda p: p.global_batch))
        batches = [p.global_batch for p in pts]
        if len(set(batches)) != len(batches):
            raise ValueError(f"convergence model {self.name!r}: two points at the same global "
                             f"batch ({batches})")
        for p in pts:
            if p.global_batch < 1 or not (math.isfinite(p.steps) and p.steps > 0):
                raise ValueError(f"convergence model {self.name!r}: point at batch "
                                 f"{p.global_batch}: batch and steps must be > 0")
            kfac = p.factor_interval is not None and p.inverse_interval is not None
            if self.optimizer == S.KFAC and not kfac:
                raise ValueError(f"convergence model {self.name!r}: point at batch "
                                 f"{p.global_batch} lacks the statistics intervals its steps "
                                 "were measured with (factor_interval, inverse_interval)")
        object.__setattr__(self, "points", pts)

    @property
    def batch_range(self) -> tuple[int, int]:
        return self.points[0].global_batch, self.points[-1].global_batch

    @property
    def strategies(self) -> tuple[str, ...]:
        return OPTIMIZERS[self.optimizer]

    def at(self, global_batch: int) -> StepsEstimate:
        """Steps to the target at ``global_batch`` (see the module docstring)."""
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
            raise ValueError(f"global batch must be a positive integer, got {global_batch!r}")
        pts = self.points
        batches = [p.global_batch for p in pts]
        i = bisect.bisect_left(batches, global_batch)
        if i < len(pts) and batches[i] == global_batch:
            p = pts[i]
            return self._estimate(global_batch, p.steps, False, (p,))
        lo, hi = (0, 1) if i == 0 else (len(pts) - 2, len(pts) - 1) if i == len(pts) else (i - 1, i)
        a, b = pts[lo], pts[hi]
        slope = math.log(b.steps / a.steps) / math.log(b.global_batch / a.global_batch)
        log_steps = math.log(a.steps) + slope * math.log(global_batch / a.global_batch)
        # far outside the data a steep power law leaves the floats: inf, for usable() to refuse
        steps = math.exp(log_steps) if log_steps < _LOG_MAX_FLOAT else math.inf
        inside = 0 < i < len(pts)
        limits = (a, b) if inside else (pts[0],) if i == 0 else (pts[-1],)
        return self._estimate(global_batch, steps, not inside, limits,
                              basis=(a.global_batch, b.global_batch))

    def _estimate(self, batch: int, steps: float, extrapolated: bool,
                  limits: tuple[ConvergencePoint, ...], basis: tuple[int, ...] = ()
                  ) -> StepsEstimate:
        fi = [p.factor_interval for p in limits if p.factor_interval is not None]
        ii = [p.inverse_interval for p in limits if p.inverse_interval is not None]
        return StepsEstimate(
            global_batch=batch, steps=steps, extrapolated=extrapolated,
            max_factor_interval=min(fi) if fi else None,
            max_inverse_interval=min(ii) if ii else None,
            basis=basis or tuple(p.global_batch for p in limits),
        )

    def epochs(self, global_batch: int, steps: float) -> float | None:
        """``steps`` at ``global_batch`` in epochs (None without ``examples_per_epoch``)."""
        if not self.examples_per_epoch:
            return None
        return steps * global_batch / self.examples_per_epoch


# ---------------------------------------------------------------------------------------------
def _interval(t: Table, key: str, default: int | None) -> int | None:
    return t.int(key, minimum=1) if t.has(key) else default


def _point(t: Table, examples: int | None, defaults: tuple[int | None, int | None],
           optimizer: str) -> ConvergencePoint:
    batch = t.int("global_batch", minimum=1)
    if t.has("steps") == t.has("epochs"):
        raise t.error("steps", "give exactly one of 'steps' and 'epochs'")
    if t.has("steps"):
        steps = t.float("steps", positive=True)
    else:
        if not examples:
            raise t.error("epochs", "epochs need 'examples_per_epoch' at the top of the file")
        steps = t.float("epochs", positive=True) * examples / batch
    top1 = t.float("top1_pct", positive=True, maximum=100.0) if t.has("top1_pct") else None
    fi = _interval(t, "factor_interval", defaults[0])
    ii = _interval(t, "inverse_interval", defaults[1])
    if optimizer != S.KFAC and (t.has("factor_interval") or t.has("inverse_interval")):
        raise t.error("factor_interval", "statistics intervals belong to K-FAC models only")
    if fi is not None and ii is not None and ii % fi:
        raise t.error("inverse_interval", f"must be a multiple of factor_interval ({fi})")
    point = ConvergencePoint(global_batch=batch, steps=steps, source=t.str("source"),
                             top1_pct=top1, factor_interval=fi, inverse_interval=ii)
    t.done()
    return point


def load_convergence_model(path: str | Path) -> ConvergenceModel:
    """Read a convergence TOML strictly; every error names the file and the key."""
    root = read_toml(path, fmt=FORMAT)
    name = root.str("name")
    optimizer = root.str("optimizer", choices=OPTIMIZERS)
    examples = root.int("examples_per_epoch", minimum=1) if root.has("examples_per_epoch") \
        else None
    defaults = (_interval(root, "factor_interval", None), _interval(root, "inverse_interval", None))
    if optimizer != S.KFAC and any(d is not None for d in defaults):
        raise root.error("factor_interval", "statistics intervals belong to K-FAC models only")
    tables = root.tables("points")
    points = [_point(t, examples, defaults, optimizer) for t in tables]
    workload, target = root.str("workload"), root.str("target")
    description = root.str("description", nonempty=False) if root.has("description") else ""
    root.done()
    try:
        return ConvergenceModel(name=name, workload=workload, optimizer=optimizer,
                                target=target, description=description,
                                examples_per_epoch=examples, path=str(path),
                                points=tuple(points))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_convergence(name_or_path: str | os.PathLike[str]) -> ConvergenceModel:
    """A convergence model from a preset name (``models/convergence/<name>.toml``) or a path."""
    return load_convergence_model(resolve("convergence", name_or_path))


def convergence_for(workload: str, optimizer: str,
                    given: list[ConvergenceModel]) -> ConvergenceModel:
    """The model for ``workload`` and ``optimizer``: the one given for that optimizer, else the
    only preset that matches.  No match, or several presets and none given, is an error."""
    mine = [m for m in given if m.optimizer == optimizer]
    if len(mine) > 1:
        raise ValueError(f"two convergence models for {optimizer}: "
                         f"{', '.join(m.name for m in mine)}; give one")
    if mine:
        if mine[0].workload != workload:
            raise ValueError(f"convergence model {mine[0].name!r} is for workload "
                             f"{mine[0].workload!r}, not {workload!r}")
        return mine[0]
    matches = [m for m in (load_convergence(n) for n in list_presets("convergence"))
               if m.workload == workload and m.optimizer == optimizer]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(
            f"no convergence data for {optimizer} on {workload!r}: the steps to a target are "
            f"not known, and kfacperf does not guess them; write a model (format "
            f"{FORMAT!r}, see models/convergence/) and pass it with --convergence FILE, or "
            f"plan other strategies")
    raise ValueError(f"several convergence presets for {optimizer} on {workload!r}: "
                     f"{', '.join(m.name for m in matches)}; choose one with --convergence")
