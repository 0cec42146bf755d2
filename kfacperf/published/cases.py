"""Published measurements as data: one strict TOML file per source under ``published/``.

A case is what a paper or repository measured, with the setup it was measured in, so that the
simulator can predict it from the setup alone (:mod:`kfacperf.published.predict`)::

    format = "kfacperf-published-1"
    name = "spngd-fig5"
    title = "..."                      # one line
    citation = "..."                   # authors, title, venue, figure or table
    role = "calibration"               # or "held-out": predicted and reported, never fitted
    read = "figure"                    # printed | figure | derived: how the numbers were read
    quantity = "step_s"                # step_s | images_per_s | stage_ms

    [setup]                            # simulate()'s arguments (strategy, batch_per_gpu, ...)
    workload = "resnet50"
    ...
    [assumed]                          # setup values the source does not give, and why
    comm_dtype = "..."

    [[series]]                         # one curve or one table row
    name = "emp_unitBN"
    setup = { fisher = "emp" }         # optional overrides of [setup]
    gpus = [1, 2, 4]
    values = [0.571, 0.508, 0.368]
    # stage_ms series instead: gpus = [64], stages = ["forward+backward", ...], values = [...]

``step_s`` values are seconds per training step; ``images_per_s`` the throughput of all the
GPUs together (compared as the step time ``batch_per_gpu x gpus / throughput``); ``stage_ms``
the time of named stages in one step (``a+b`` sums stages of the vocabulary).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfacperf import vocab as S
from kfacperf.safety import regular_file
from kfacperf.sim.models.toml_io import Table, read_toml

FORMAT = "kfacperf-published-1"
ROLES: tuple[str, ...] = ("calibration", "held-out")
READS: tuple[str, ...] = ("printed", "figure", "derived")
QUANTITIES: tuple[str, ...] = ("step_s", "images_per_s", "stage_ms")

SETUP_KEYS: dict[str, type] = {
    "workload": str, "device": str, "cluster": str, "strategy": str,
    "batch_per_gpu": int, "factor_interval": int, "inverse_interval": int,
    "factor_bucket_mb": float, "ddp_bucket_mb": float,
    "dtype": str, "kfac_dtype": str, "inverse_method": str, "comm_dtype": str,
    "precond_dtype": str, "symmetric_factors": bool, "v_form": str,
    "statistics_fraction": float, "placement": str, "conv_factors": str, "fisher": str,
    "bn_blocks": str,
}
"""What a setup may say: :func:`kfacperf.sim.sweep.simulate`'s arguments and its options."""
REQUIRED_SETUP: tuple[str, ...] = ("workload", "device", "cluster", "strategy", "batch_per_gpu")


@dataclass(frozen=True, kw_only=True)
class Series:
    """One curve (values per GPU count) or one breakdown (values per stage at one count)."""

    name: str
    setup: Mapping[str, Any]
    gpus: tuple[int, ...]
    values: tuple[float, ...]
    stages: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PublishedCase:
    name: str
    title: str
    citation: str
    role: str
    read: str
    quantity: str
    setup: Mapping[str, Any]
    assumed: Mapping[str, str]
    series: tuple[Series, ...]
    path: str = ""
    notes: tuple[str, ...] = field(default=())

    def setup_of(self, series: Series) -> dict[str, Any]:
        """The case's setup with the series' overrides."""
        return {**self.setup, **series.setup}


def published_dir() -> Path:
    """The folder of case files: the repository's ``published/`` unless
    ``KFACPERF_PUBLISHED`` names another."""
    env = os.environ.get("KFACPERF_PUBLISHED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "published"


def list_cases() -> list[str]:
    folder = published_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def resolve_case(name_or_path: str) -> Path:
    """A case name (a file stem under ``published/``) or a path to a case TOML."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or os.sep in text:
        return regular_file(text, what="published case file",
                            hint="give a case .toml file (e.g. published/spngd-fig5.toml) or "
                                 "a case name (e.g. spngd-fig5)")
    path = published_dir() / f"{text}.toml"
    if not path.is_file():
        raise ValueError(f"unknown published case {text!r}; cases: "
                         f"{', '.join(list_cases()) or '(none)'}; or give a path to a .toml file")
    return path


def load_case(name_or_path: str) -> PublishedCase:
    """Read one case strictly (every error names the file and the key)."""
    path = resolve_case(name_or_path)
    root = read_toml(path, fmt=FORMAT)
    case = PublishedCase(
        name=root.str("name"), title=root.str("title"), citation=root.str("citation"),
        role=root.str("role", choices=ROLES), read=root.str("read", choices=READS),
        quantity=root.str("quantity", choices=QUANTITIES),
        setup=_setup(root.table("setup"), required=REQUIRED_SETUP),
        assumed=_assumed(root), series=(), path=str(path),
        notes=tuple(root.str_list("notes")) if root.has("notes") else (),
    )
    series = tuple(_series(t, case.quantity) for t in root.tables("series"))
    root.done()
    if not series:
        raise ValueError(f"{path}: a case needs at least one [[series]]")
    names = [s.name for s in series]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: series {dup[0]!r} given twice")
    unknown = sorted(set(case.assumed) - set(SETUP_KEYS))
    if unknown:
        raise ValueError(f"{path}: [assumed] names {unknown[0]!r}, not a setup key")
    return PublishedCase(**{**case.__dict__, "series": series})


def load_cases(names: list[str] | None = None) -> list[PublishedCase]:
    """The named cases, or every case under ``published/``.  A case file named twice (by its
    name and by its path, say) counts once; two files of one case ``name`` are an error:
    counted twice, a case would weigh double in a fit and be reported twice."""
    chosen = names or list_cases()
    if not chosen:
        raise ValueError(f"no published cases in {published_dir()}")
    out: dict[str, PublishedCase] = {}
    paths: set[Path] = set()
    for n in chosen:
        path = resolve_case(n).resolve()
        if path in paths:
            continue
        paths.add(path)
        case = load_case(n)
        if case.name in out:
            raise ValueError(f"{out[case.name].path} and {case.path} are both case "
                             f"{case.name!r}; give only one of them")
        out[case.name] = case
    return list(out.values())


def held_out_names() -> set[str]:
    """The names of the committed cases under ``published/`` that are held out: a copy of
    one that calls itself ``calibration`` is still held out."""
    return {c.name for c in (load_case(n) for n in list_cases()) if c.role != "calibration"}


def _setup(t: Table, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in t.keys():
        kind = SETUP_KEYS.get(key)
        if kind is None:
            raise t.error(key, f"unknown setup key; known: {', '.join(SETUP_KEYS)}")
        if kind is bool:
            out[key] = t.bool(key)
        elif kind is int:
            out[key] = t.int(key, minimum=1)
        elif kind is float:
            out[key] = t.float(key, positive=True)
        else:
            out[key] = t.str(key)
    for key in required:
        if key not in out:
            raise t.error(key, "missing (a case's setup names the workload, device, cluster, "
                               "strategy and batch per GPU)")
    t.done()
    return out


def _assumed(root: Table) -> dict[str, str]:
    if not root.has("assumed"):
        return {}
    t = root.table("assumed")
    out = {k: t.str(k) for k in t.keys()}
    t.done()
    return out


def _series(t: Table, quantity: str) -> Series:
    name = t.str("name")
    setup = _setup(t.table("setup")) if t.has("setup") else {}
    gpus = tuple(t.int_list("gpus", minimum=1))
    raw = t.raw("values")
    if not isinstance(raw, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise t.error("values", f"expected an array of numbers, got {raw!r}")
    values = tuple(float(v) for v in raw)
    stages: tuple[str, ...] = ()
    if quantity == "stage_ms":
        stages = tuple(t.str_list("stages"))
        for stage in stages:
            for part in stage.split("+"):
                S.check_stage(part)
        if len(gpus) != 1:
            raise t.error("gpus", "a stage_ms series is measured at one GPU count")
        want = len(stages)
    else:
        want = len(gpus)
    if len(values) != want or any(not (v > 0 and v < float("inf")) for v in values):
        raise t.error("values", f"expected {want} positive finite numbers, got {list(values)}")
    t.done()
    return Series(name=name, setup=setup, gpus=gpus, values=values, stages=stages)
