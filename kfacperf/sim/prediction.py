"""A prediction on disk: the simulator's output directory.

::

    prediction.json      inputs: workload, device, cluster, strategies, gpus, batch per GPU,
                         intervals, what-if overrides, the kinds of step simulated
    summary.parquet      one row per (strategy, gpus)            (SUMMARY_COLUMNS)
    stage_times.parquet  per-step mean time of each (stage, layer) on the slowest rank
    events.parquet       the event table of DESIGN.md plus ``strategy`` and ``gpus``
    classes.parquet      which ranks each simulated (representative) rank stands for

In ``events``, ``rank`` is the representative rank of a symmetry class and ``step`` is the
step number of the first step of its kind in a cycle (0 = inverse step, 1 = plain step,
``factor_interval`` = factor-only step), laid end to end from time 0.

This module never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfacperf import vocab as S
from kfacperf.trace.measure import KindTimes
from kfacperf.trace.schema import EVENT_COLUMNS
from kfacperf.vocab import STAGE_NAMES

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

FORMAT = "kfacperf-prediction-1"
META_FILE = "prediction.json"
SUMMARY_FILE = "summary.parquet"
STAGE_TIMES_FILE = "stage_times.parquet"
EVENTS_FILE = "events.parquet"
CLASSES_FILE = "classes.parquet"

SUMMARY_COLUMNS: tuple[str, ...] = (
    "strategy", "gpus", "step_us", "compute_us", "comm_us", "exposed_comm_us", "kfac_overhead",
    "scaling_efficiency", "factor_bytes_per_gpu", "inverse_bytes_per_gpu", "batch_per_gpu",
)
"""The summary's required columns (``factor_bytes_per_gpu``: every layer's batch statistics
plus the running averages, ``inverse_bytes_per_gpu``: the inverse state, both on the GPU
holding the most, as :mod:`kfacperf.sim.graphs.memory` defines them); it also has
``inverse_step_us``, ``factor_step_us``, ``plain_step_us`` (the step time of each kind of
step, NaN where the cycle has none), ``grad_worker_fraction`` and ``classes`` (symmetry
classes simulated)."""
SUMMARY_EXTRA: tuple[str, ...] = (
    "inverse_step_us", "factor_step_us", "plain_step_us", "grad_worker_fraction", "classes",
)
STAGE_TIME_COLUMNS: tuple[str, ...] = ("strategy", "gpus", "stage", "layer", "time_us")
PREDICTION_EVENT_COLUMNS: tuple[str, ...] = EVENT_COLUMNS + ("strategy", "gpus")
CLASS_COLUMNS: tuple[str, ...] = ("strategy", "gpus", "step", "rank", "ranks")


@dataclass
class Prediction:
    """A simulator output in memory (see the module docstring for the tables)."""

    meta: dict[str, Any]
    summary: pd.DataFrame
    stage_times: pd.DataFrame
    events: pd.DataFrame
    classes: pd.DataFrame | None = field(default=None)

    def table(self) -> str:
        """The summary as a fixed-width text table (what ``kfacperf simulate`` prints)."""
        return format_summary(self.summary)


def _fmt_ms(us: float) -> str:
    return "-" if us != us else f"{us / 1e3:.3f}"


def _fmt_ratio(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


def _fmt_mib(b: float) -> str:
    return "-" if b != b else f"{b / 2**20:.1f}"


def format_summary(summary: pd.DataFrame) -> str:
    """Fixed-width text of a prediction summary: times in ms, memory in MiB."""
    head = ("strategy", "gpus", "step ms", "compute ms", "comm ms", "exposed ms", "vs sgd",
            "scaling", "factors MiB", "inverses MiB")
    rows = [head]
    for r in summary.itertuples(index=False):
        rows.append((
            str(r.strategy), str(int(r.gpus)), _fmt_ms(r.step_us), _fmt_ms(r.compute_us),
            _fmt_ms(r.comm_us), _fmt_ms(r.exposed_comm_us), _fmt_ratio(r.kfac_overhead),
            _fmt_ratio(r.scaling_efficiency), _fmt_mib(r.factor_bytes_per_gpu),
            _fmt_mib(r.inverse_bytes_per_gpu),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(SUMMARY_LEGEND)
    return "\n".join(lines)


SUMMARY_LEGEND = (
    "compute, comm: busy times of the rank that ends the step last; exposed: its communication "
    "not hidden\nby compute; vs sgd: the step over SGD's at that count; scaling: the one-GPU "
    "step over this one;\nMiB: K-FAC state of the GPU holding the most (factors: a factor "
    "step's statistics and the running averages)")
"""What :func:`format_summary`'s columns mean, printed under them."""


def _require(df: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; "
                         f"has {', '.join(map(str, df.columns))}")


PREDICTION_FILES: tuple[str, ...] = (
    META_FILE, SUMMARY_FILE, STAGE_TIMES_FILE, EVENTS_FILE, CLASSES_FILE)


def _holds_trace(path: Path) -> str | None:
    from kfacperf.trace.schema import PARTS_DIR, RUN_FILE

    if (path / RUN_FILE).exists() or (path / PARTS_DIR).exists():
        return (f"holds a measured trace ({RUN_FILE}); a prediction never replaces a trace, "
                "choose another directory")
    return None


def check_prediction_out(path: str | Path, *, force: bool, flag: str = "--out") -> Path:
    """Check that a prediction may be written into directory ``path``: new or empty, or,
    with ``force``, an earlier prediction; never a directory holding a measured trace."""
    from kfacperf.safety import check_output_dir

    return check_output_dir(
        path, force=force, flag=flag, refuse=_holds_trace,
        replaceable=lambda p: all(c.name in PREDICTION_FILES for c in p.iterdir()))


def write_prediction(pred: Prediction, path: str | Path, *, force: bool = False) -> Path:
    """Write ``pred`` into directory ``path``: a new or empty directory, or with ``force``
    an earlier prediction (see :func:`check_prediction_out`).  Each file is written
    atomically."""
    from kfacperf.safety import atomic_path, atomic_write_text, dumps_json

    out = check_prediction_out(path, force=force)
    _require(pred.summary, SUMMARY_COLUMNS, out / SUMMARY_FILE)
    _require(pred.stage_times, STAGE_TIME_COLUMNS, out / STAGE_TIMES_FILE)
    _require(pred.events, PREDICTION_EVENT_COLUMNS, out / EVENTS_FILE)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(pred.meta)
    meta.setdefault("format", FORMAT)
    tables = [(SUMMARY_FILE, pred.summary), (STAGE_TIMES_FILE, pred.stage_times),
              (EVENTS_FILE, pred.events)]
    if pred.classes is not None:
        tables.append((CLASSES_FILE, pred.classes))
    else:
        (out / CLASSES_FILE).unlink(missing_ok=True)
    for name, df in tables:
        with atomic_path(out / name) as tmp:
            df.to_parquet(tmp, index=False, compression="zstd")
    # the metadata last: a directory with prediction.json is a whole prediction
    atomic_write_text(out / META_FILE, dumps_json(meta, indent=2, default=str) + "\n")
    return out


def load_prediction(path: str | Path) -> Prediction:
    """Read a prediction directory, checking its files and columns."""
    from kfacperf.safety import check_pyarrow_version, load_json_file, regular_file

    check_pyarrow_version()
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"prediction directory not found: {root}")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"not a prediction (no {META_FILE}): {root}")
    meta = load_json_file(meta_path, what="prediction file")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format must be {FORMAT!r}, got "
                         f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    tables = {}
    for name, cols in ((SUMMARY_FILE, SUMMARY_COLUMNS), (STAGE_TIMES_FILE, STAGE_TIME_COLUMNS),
                       (EVENTS_FILE, PREDICTION_EVENT_COLUMNS)):
        p = root / name
        if not p.exists():
            raise FileNotFoundError(f"prediction file missing: {p}")
        df = _read_table(regular_file(p, what="prediction file"))
        _require(df, cols, p)
        tables[name] = df
    bad = set(tables[EVENTS_FILE]["stage"].astype(str).unique()) - set(STAGE_NAMES)
    if bad:
        raise ValueError(f"{root / EVENTS_FILE}: unknown stage(s) {sorted(bad)}")
    classes = None
    if (root / CLASSES_FILE).exists():
        classes = _read_table(regular_file(root / CLASSES_FILE, what="prediction file"))
        _require(classes, CLASS_COLUMNS, root / CLASSES_FILE)
    return Prediction(meta=meta, summary=tables[SUMMARY_FILE],
                      stage_times=tables[STAGE_TIMES_FILE], events=tables[EVENTS_FILE],
                      classes=classes)


def _read_table(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: cannot read as Parquet ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None


def kind_times(pred: Any, strategy: str, gpus: int) -> KindTimes:
    """The predicted step, stage and (stage, layer) times of each kind of step of one
    (strategy, GPU count), as :mod:`kfacperf.trace.measure` defines them for a trace.

    ``pred`` is a :class:`Prediction` or anything with its ``meta``, ``summary``, ``events``
    and ``classes``.  The kinds are those of the cycle of the prediction's intervals.  Step:
    the summary's ``<kind>_step_us`` (``step_us`` where it has none).  Stage: the mean over
    every rank of its time in the stage, each representative rank of the events weighted by
    the ranks it stands for (``classes``; without it, each counts once).  A simulated compute
    stage nests nothing and a simulated collective's row lasts its cost, so the rows'
    durations are those times.  A kind without events has no stage times.
    """
    import math

    from kfacperf.sim.summary import cycle

    summary, events, classes = pred.summary, pred.events, pred.classes
    label = str(strategy)
    row = summary[(summary["strategy"].astype(str) == label)
                  & (summary["gpus"].astype(int) == int(gpus))]
    if row.empty:
        raise ValueError(f"prediction has no row for strategy {label!r} at {gpus} GPU(s)")
    row = row.iloc[0]
    meta = pred.meta
    nested = meta.get("intervals") if isinstance(meta.get("intervals"), dict) else {}
    fi = int(meta.get("factor_interval") or nested.get("factor") or 1)
    ii = int(meta.get("inverse_interval") or nested.get("inverse") or 1)

    def at_point(table: Any) -> Any:
        if table is None or table.empty:
            return None
        return table[(table["strategy"].astype(str) == label)
                     & (table["gpus"].astype(int) == int(gpus))]

    ev, cl = at_point(events), at_point(classes)
    weight = {} if cl is None else {
        (int(s), int(r)): float(n) for s, r, n in zip(cl["step"], cl["rank"], cl["ranks"])}
    step_us: dict[str, float] = {}
    stage_us: dict[str, dict[str, float]] = {}
    layer_us: dict[str, dict[tuple[str, str], float]] = {}
    for cs in cycle(fi, ii, kfac=label.partition(":")[0] != S.SGD):
        kind = cs.kind.name
        value = row.get(f"{kind}_step_us")
        step_us[kind] = float(value) if value is not None and math.isfinite(value) \
            else float(row["step_us"])
        sel = None if ev is None else ev[(ev["step"] == cs.step)
                                         & (ev["stage"].astype(str) != S.STEP)]
        if sel is None or sel.empty:
            continue
        w = {int(r): weight.get((cs.step, int(r)), 1.0) for r in set(sel["rank"])}
        world = float(gpus) if weight else float(len(w))
        sums = sel.groupby([sel["rank"].astype(int), sel["stage"].astype(str),
                            sel["layer"].astype(str)])["dur_us"].sum()
        stages: dict[str, float] = {}
        layers: dict[tuple[str, str], float] = {}
        for (rank, st, layer), t in sums.items():
            share = float(t) * w[int(rank)] / world
            stages[st] = stages.get(st, 0.0) + share
            if layer:
                layers[(st, layer)] = layers.get((st, layer), 0.0) + share
        stage_us[kind], layer_us[kind] = stages, layers
    return KindTimes(step_us=step_us, stage_us=stage_us, layer_us=layer_us)
