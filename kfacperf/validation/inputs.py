"""Reading the traces a validation is given, and keeping held-out runs out of calibration."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from kfacperf.trace.arguments import one_or_many
from kfacperf.trace.schema import run_device
from kfacperf.trace.store import Trace

TraceInput: TypeAlias = "str | os.PathLike[str] | Trace"
"""One trace: its directory (or a folder of trace directories), or a loaded trace."""
TraceInputs: TypeAlias = "TraceInput | Iterable[TraceInput]"
"""One trace input alone, or several."""


def expand_trace_paths(items: TraceInputs, *, what: str = "traces") -> list[Any]:
    """Trace directories, with a folder of traces (no ``run.json`` of its own, trace
    directories inside) standing for its traces in name order.  A directory in the folder
    that holds a trace's events but no ``run.json`` (a broken trace) is an error, not skipped:
    leaving it out silently would fit or predict without it.  One directory (a ``str`` or
    path) or trace may be given alone; ``what`` names the argument in errors."""
    from kfacperf.trace.schema import EVENTS_FILE, PARTS_DIR, RUN_FILE

    out: list[Any] = []
    for item in one_or_many(items, (str, os.PathLike, Trace), what=what,
                            expected="a trace directory, a folder of them or a loaded trace"):
        if not isinstance(item, (str, os.PathLike)):
            out.append(item)
            continue
        p = Path(item)
        if p.is_dir() and not (p / RUN_FILE).exists():
            inner = sorted(c for c in p.iterdir() if (c / RUN_FILE).is_file())
            if not inner:
                raise FileNotFoundError(f"{p}: neither a trace directory (no {RUN_FILE}) nor a "
                                        "folder of trace directories")
            broken = sorted(c for c in p.iterdir() if c.is_dir() and not (c / RUN_FILE).exists()
                            and ((c / EVENTS_FILE).exists() or (c / PARTS_DIR).is_dir()))
            if broken:
                raise ValueError(f"{broken[0]}: a trace without its {RUN_FILE} in the folder "
                                 f"{p}; restore its {RUN_FILE}, move the directory out of the "
                                 "folder, or give the trace directories one by one")
            out.extend(inner)
        else:
            out.append(p)
    return out


def load_traces(items: TraceInputs, *, what: str = "traces") -> list[Trace]:
    """The traces of ``items`` (see :func:`expand_trace_paths`), loaded; a loaded trace (or
    anything with ``.events`` and ``.run``) is taken as it is."""
    from kfacperf.trace.store import load_trace

    return [it if hasattr(it, "events") else load_trace(it)
            for it in expand_trace_paths(items, what=what)]


def trace_workload_models(traces: Iterable[Trace]) -> list[str]:
    """The workload models that traces of the user's own models carry (``TRACE/workload.toml``,
    written by ``kfacperf profile --workload FILE.py:FUNC`` and :func:`kfacperf.instrument`)."""
    from kfacperf.trace.schema import WORKLOAD_FILE

    out = []
    for t in traces:
        path = getattr(t, "path", None)
        if path and (Path(path) / WORKLOAD_FILE).is_file():
            out.append(str(Path(path) / WORKLOAD_FILE))
    return out


def trace_label(trace: Trace) -> str:
    path = getattr(trace, "path", None)
    return Path(path).name if path else str(trace.run.get("workload", "run"))


def _identity(trace: Trace) -> tuple[str, str, str]:
    """What one recorded run is known by: its start time and command (empty where it has
    none: then it is never matched), and the whole ``run.json``, so that two runs of one
    process started within a second (the library's callers share one command line) stay
    two, and only a copy matches."""
    run = trace.run
    return (str(run.get("start_time", "")), str(run.get("command", "")),
            json.dumps(run, sort_keys=True, default=str))


def distinct_traces(traces: Sequence[Trace], role: str) -> list[Trace]:
    """``traces`` (given as ``role``) with each trace once, in order of first mention.

    A trace directory given twice (the same path, or once itself and once in its folder)
    counts once; two directories holding the same recorded run (a copy: same ``start_time``
    and ``command``) are an error, since pooling them would count one recording twice."""
    paths: set[Path] = set()
    ids: dict[tuple[str, str, str], Trace] = {}
    out: list[Trace] = []
    for t in traces:
        path = Path(t.path).resolve() if getattr(t, "path", None) else None
        if (path is not None and path in paths) or any(o is t for o in out):
            continue
        if all(_identity(t)) and _identity(t) in ids:
            other = ids[_identity(t)]
            raise ValueError(f"{role} traces {other.path} and {t.path} are the same recorded "
                             "run (start_time and command); give only one of them")
        if path is not None:
            paths.add(path)
        if all(_identity(t)):
            ids[_identity(t)] = t
        out.append(t)
    return out


def check_disjoint(calibration: Sequence[Trace], holdout: Sequence[Trace]) -> None:
    """A held-out run must not also be a calibration run (same directory, or a copy)."""
    cal_paths = {Path(t.path).resolve(): t for t in calibration if getattr(t, "path", None)}
    cal_ids = {_identity(t): t for t in calibration if all(_identity(t))}
    for t in holdout:
        path = Path(t.path).resolve() if getattr(t, "path", None) else None
        if path is not None and path in cal_paths:
            raise ValueError(f"{t.path} is given both for calibration and as a held-out run; "
                             "a held-out run must not be calibrated on")
        if any(_identity(t)) and _identity(t) in cal_ids:
            other = cal_ids[_identity(t)]
            raise ValueError(f"held-out run {t.path} is the same recorded run (start_time and "
                             f"command) as calibration trace {other.path}")
        if any(o is t for o in calibration):
            raise ValueError(f"{trace_label(t)}: the same trace is given for calibration "
                             "and held out")



def device_key(trace: Trace) -> str:
    """The device ``trace`` ran on (:func:`kfacperf.trace.schema.run_device`)."""
    return run_device(trace.run)
