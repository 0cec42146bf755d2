"""Chrome / Perfetto JSON export of a trace.

One complete event (``ph: "X"``) per row: ``pid`` = rank, ``tid`` = lane, ``ts``/``dur`` in
µs, ``args`` = step, layer, bytes, flops.  Perfetto cannot draw partially overlapping events
on one track, and asynchronous communications of a rank do overlap each other, so the comm
lane is split into as many tracks as it needs ("comm", "comm 2", ...), each row going to the
first track where it nests or is alone (the compute lane likewise, though its stages nest).
``M`` metadata events name processes and threads; telemetry becomes counter (``ph: "C"``)
events; ``distributedInfo`` carries the world size (and the rank, in a per-rank file), which
Holistic Trace Analysis reads.

This module never imports torch.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from kfacperf.errors import UserError
from kfacperf.trace.schema import PARTS_DIR, TRACE_FILES
from kfacperf.trace.store import Trace
from kfacperf.vocab import COMM, COMPUTE

COMPUTE_TID = 0  # first compute track; further ones (rarely needed) are 1, 2, ...
COMM_TID = 1000  # first comm track; further ones are 1001, 1002, ...
_TELEMETRY_COUNTERS = {
    "sm_clock_mhz": "SM clock (MHz)", "mem_clock_mhz": "memory clock (MHz)",
    "mem_used_mib": "memory used (MiB)", "power_w": "power (W)",
    "gpu_util_pct": "GPU utilisation (%)", "mem_util_pct": "memory utilisation (%)",
    "temperature_c": "temperature (C)",
}


def _assign_tracks(starts: list[float], ends: list[float]) -> list[int]:
    """Track index per interval such that intervals on one track nest or do not touch."""
    order = sorted(range(len(starts)), key=lambda i: (starts[i], -ends[i]))
    stacks: list[list[float]] = []  # per track, the ends of the open intervals
    track = [0] * len(starts)
    for i in order:
        s, e = starts[i], ends[i]
        for t, stack in enumerate(stacks):
            while stack and stack[-1] <= s:
                stack.pop()
            if not stack or e <= stack[-1]:  # free, or nests inside the innermost open one
                stack.append(e)
                track[i] = t
                break
        else:
            stacks.append([e])
            track[i] = len(stacks) - 1
    return track


def chrome_trace(trace: Trace, *, rank: int | None = None) -> dict[str, Any]:
    """The Chrome JSON object of ``trace`` (all ranks, or only ``rank``: a ``ValueError``,
    naming the trace's ranks, where it has no events of that rank)."""
    ev = trace.events
    if rank is not None:
        ranks = sorted(int(x) for x in ev["rank"].unique())
        if isinstance(rank, bool) or rank not in ranks:
            have = ", ".join(map(str, ranks)) if ranks else "none"
            raise ValueError(f"rank {rank!r}: {trace.path} has no events of it; its ranks "
                             f"with events: {have}")
        ev = ev[ev["rank"] == rank]
    world = int(trace.run.get("world_size") or (int(ev["rank"].max()) + 1 if len(ev) else 1))
    out: list[dict[str, Any]] = []
    for r in sorted(int(x) for x in ev["rank"].unique()):
        g = ev[ev["rank"] == r]
        out.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0,
                    "args": {"name": f"rank {r}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0,
                    "args": {"sort_index": r}})
        tids: dict[Any, int] = {}
        for lane, base in ((COMPUTE, COMPUTE_TID), (COMM, COMM_TID)):
            rows = g[g["lane"] == lane]
            tracks = _assign_tracks(rows["start_us"].tolist(),
                                    (rows["start_us"] + rows["dur_us"]).tolist())
            tids.update((idx, base + t) for idx, t in zip(rows.index, tracks))
            for t in sorted(set(tracks)):
                out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": base + t,
                            "args": {"name": lane if t == 0 else f"{lane} {t + 1}"}})
        for row in g.itertuples():
            stage, layer = str(row.stage), str(row.layer)
            out.append({
                "name": f"{stage} {layer}" if layer else stage,
                "cat": str(row.lane),
                "ph": "X",
                "ts": float(row.start_us),
                "dur": float(row.dur_us),
                "pid": r,
                "tid": tids[row.Index],
                "args": {"step": int(row.step), "stage": stage, "layer": layer,
                         "bytes": int(row.bytes), "flops": float(row.flops)},
            })
    tel = trace.telemetry
    if tel is not None and len(tel):
        if rank is not None:
            tel = tel[tel["rank"] == rank]
        for row in tel.itertuples():
            for col, label in _TELEMETRY_COUNTERS.items():
                v = getattr(row, col)
                if not math.isnan(v):
                    out.append({"ph": "C", "name": label, "pid": int(row.rank),
                                "ts": float(row.t_us), "args": {"value": float(v)}})
    info: dict[str, Any] = {"world_size": world}
    if rank is not None:
        info["rank"] = rank
    backend = trace.run.get("backend")
    if backend:
        info["backend"] = backend
    return {
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "distributedInfo": info,
        "traceName": str(trace.path),
        "otherData": {k: v for k, v in trace.run.items() if isinstance(v, (str, int, float, bool))},
    }


def check_export_out(trace_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                     per_rank: bool = False, flag: str = "--out") -> None:
    """Refuse an export ``out`` that would replace part of the trace it is made from, with
    or without --force: the trace directory itself, its ``run.json``, ``events.parquet``,
    ``telemetry.parquet``, ``workload.toml`` (or a link to one) or anything under ``parts/``.
    A new file beside them (the default ``TRACE/trace.json``, ``TRACE/chrome/``) is fine."""
    root = Path(trace_dir).resolve()
    target = Path(out).resolve()  # follows a symbolic link to where it would write
    fix = ("give another directory (the default is TRACE/chrome)" if per_rank else
           "give another file name (the default is TRACE/trace.json)")
    if target == root:
        raise UserError(f"{flag} {out} is the trace directory being exported; {fix}")
    parts = root / PARTS_DIR
    if target == parts or parts in target.parents:
        raise UserError(f"{flag} {out} is inside the trace's {PARTS_DIR}/ folder; {fix}")
    if per_rank:
        return
    for name in TRACE_FILES:
        mine = root / name
        same = target == mine
        if not same and target.exists() and mine.exists():
            try:
                same = target.samefile(mine)  # a hard link to the trace's file
            except OSError:
                same = False
        if same:
            raise UserError(f"{flag} {out} is the trace's own {name}; an export never "
                            f"replaces it (not even with --force); {fix}")


def export_chrome(
    trace: Trace, out: str | os.PathLike[str], *, per_rank: bool = False
) -> list[Path]:
    """Write ``trace`` as Chrome JSON to ``out``; with ``per_rank``, ``out`` is a directory
    receiving ``rank<R>.json`` per rank (the layout Holistic Trace Analysis loads).  An
    ``out`` that is part of the trace itself is refused (:func:`check_export_out`)."""
    from kfacperf.safety import atomic_write_text, dumps_json

    check_export_out(trace.path, out, per_rank=per_rank)
    target = Path(out)
    if not per_rank:  # JSON as the format defines it: a missing number is null, never NaN
        return [atomic_write_text(target, dumps_json(chrome_trace(trace)))]
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for r in sorted(int(x) for x in trace.events["rank"].unique()):
        written.append(atomic_write_text(target / f"rank{r}.json",
                                         dumps_json(chrome_trace(trace, rank=r))))
    return written
