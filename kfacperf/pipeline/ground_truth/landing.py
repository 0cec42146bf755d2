"""Copying what a ground-truth run handed back into the project: each trace checked and
landed whole (or listed as missing), the traces of tasks that did not finish kept apart, the
run's small side outputs, and what an earlier landing left beside them."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kfacperf.bench.kernels.records import OUTPUT_FILE as KERNELS_FILE
from kfacperf.bench.overhead import OUTPUT_FILE as OVERHEAD_FILE
from kfacperf.pipeline.ground_truth.checks import check_problems, trace_checks
from kfacperf.pipeline.ground_truth.landed import TraceResult
from kfacperf.pipeline.ground_truth.plan import (
    KERNELS,
    OVERHEAD,
    PROFILE,
)

SIDE_FILES: tuple[str, ...] = (
    "command.txt", "nvidia-smi.txt", "versions.txt", "wheels.txt", "env.json", "plan.txt",
    "summary.txt", "summary.json", OVERHEAD_FILE, KERNELS_FILE, "kernels.txt",
    "files.txt", "ground-truth.log",
)
"""The run's outputs, beside its traces, that are kept with them (all small)."""


SIDE_FOLDERS: tuple[str, ...] = ("logs", "nsys")
"""The run's folders of small text kept with its traces: each run's own log (progress, the
per-stage summary or its traceback), the NVTX check's output."""


INCOMPLETE = "incomplete"
"""Where, under ``INTO``, a trace lands whose task failed or was not reached: the steps it
finished are kept (``INTO/incomplete/PRECISION/NAME``), never used to calibrate or validate."""


def file_stats(into: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``into`` with what says whether it was rewritten since."""
    if not into.is_dir():
        return {}
    out = {}
    for p in into.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(into).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def left_from_before(into: Path, before: dict[str, tuple[int, int, int]]) -> list[str]:
    """The folders of files (a trace) or files that were in ``into`` before this landing and
    that it did not rewrite."""
    now = file_stats(into)
    left = sorted(rel for rel, st in before.items() if now.get(rel) == st
                  and rel != "finish.txt")  # rewritten last
    shown: dict[str, None] = {}
    for rel in left:
        parts = rel.split("/")
        shown[rel if len(parts) == 1 else "/".join(parts[:-1]) + "/"] = None
    return list(shown)


def say_side_outputs(folder: Path, tasks: Sequence[dict[str, Any]],
                      say: Callable[[str], None], missing: list[str]) -> None:
    """What came back of the timer overhead and the kernel timings, and what did not."""
    from kfacperf.safety import load_json_file

    for kind, file, what in ((OVERHEAD, OVERHEAD_FILE, "timer overhead"),
                             (KERNELS, KERNELS_FILE, "kernel timings")):
        task = next((t for t in tasks if t.get("kind") == kind), None)
        status = "not run" if task is None else str(task.get("status"))
        if not (folder / file).is_file():
            line = f"{what}: no {file}"
            if status == "ok":
                missing.append(f"{file} (its task says ok)")
                say(f"MISSING: {line} though its task says ok")
            else:
                say(f"{line} (task {status}"
                    + (f": {task.get('detail')}" if task and task.get("detail") else "") + ")")
            continue
        try:
            data = load_json_file(folder / file, what=what)
        except (ValueError, OSError) as exc:
            missing.append(f"{file} does not read ({exc})")
            say(f"MISSING: {what}: {file} does not read ({exc})")
            continue
        if kind == OVERHEAD:
            results = data.get("results") if isinstance(data, dict) else None
            for r in results if isinstance(results, list) else []:
                if isinstance(r, dict) and isinstance(r.get("overhead_median"), (int, float)):
                    say(f"timer overhead: {r.get('name')}: {100 * r['overhead_median']:+.2f}% "
                        + ("(meets <=1%)" if r.get("meets_target") else "(misses <=1%)"))
        elif isinstance(data, dict):
            counts = ", ".join(f"{len(data.get(g) or [])} {g}"
                               for g in ("eigh", "cholesky", "factors", "gemm"))
            say(f"kernel timings: {counts} record(s)")
            skipped = [k for k in data.get("skipped") or [] if isinstance(k, dict)]
            for k in skipped[:10]:
                say(f"kernel timings: skipped {k.get('measurement', '?')} {k.get('what', '')}: "
                    f"{k.get('reason', '?')}")
            if len(skipped) > 10:
                say(f"kernel timings: {len(skipped) - 10} more skipped (kernels.json)")


def land_traces(folder: Path, into: Path, tasks: Sequence[dict[str, Any]], *, gpu: bool,
                 say: Callable[[str], None], missing: list[str]) -> list[TraceResult]:
    from kfacperf.trace.store import load_trace

    landed = []
    for task in tasks:
        run = task.get("run")
        if task.get("kind") != PROFILE or task.get("status") != "ok" or not isinstance(run, dict):
            continue
        name, precision = str(task["name"]), str(run.get("precision"))
        source = folder / "traces" / precision / name
        if not source.is_dir():
            missing.append(f"traces/{precision}/{name}")
            say(f"{name}: summary.json says it ran, but traces/{precision}/{name} is missing")
            continue
        try:  # checked where it came back: a trace that does not load never replaces one
            trace = load_trace(source)
            checks = trace_checks(trace)
        except (ValueError, OSError) as exc:
            missing.append(f"traces/{precision}/{name} (does not load)")
            say(f"{name}: not landed, its trace does not load: {exc}")
            continue
        problems = check_problems(checks, gpu=gpu)
        unusable = _unusable(trace)
        problems += unusable
        target = into / precision / name
        _replace_tree(source, target)
        landed.append(TraceResult(name=name, precision=precision, role=str(run.get("role")),
                                  batch=batch if isinstance(batch := run.get("batch"), int) else 0,
                                  path=target, checks=checks, problems=problems,
                                  usable=not unusable))
        cov = checks["coverage"]
        say(f"{name}: {checks['timing']}, {checks['telemetry_samples']} telemetry samples, "
            f"median gap {cov['median_gap_pct']:.1f}%, double counted "
            f"{cov['worst_double_pct']:.2f}%"
            + (f"  PROBLEM: {'; '.join(problems)}" if problems else ""))
    return landed


def _unusable(trace: Any) -> list[str]:
    """Why a trace may neither calibrate nor be predicted (empty: it may)."""
    from kfacperf.trace.measure import measured_events, no_measured_steps

    why = []
    if trace.run.get("completed") is False:
        why.append("the run did not complete (" + str(trace.run.get("failure") or "completed "
                                                      "false") + "): not used to validate")
    try:
        if measured_events(trace).empty:
            why.append(no_measured_steps(trace, Path(trace.path).name)
                       + ": not used to validate")
    except (ValueError, KeyError) as exc:
        why.append(f"its measured steps do not read ({exc}): not used to validate")
    return why


def _replace_tree(source: Path, target: Path) -> None:
    """``target`` becomes a copy of the folder ``source``; an earlier ``target`` is replaced
    whole (no file of it left beside the new ones), and only once the copy is complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def land_incomplete(folder: Path, into: Path, tasks: Sequence[dict[str, Any]],
                     say: Callable[[str], None]) -> None:
    """The traces that came back of profile runs that failed or were not reached (a run
    stopped by a time limit keeps its finished steps): into ``INTO/incomplete/``, said."""
    ok = {(str((t.get("run") or {}).get("precision")), str(t.get("name"))) for t in tasks
          if t.get("kind") == PROFILE and t.get("status") == "ok"
          and isinstance(t.get("run"), dict)}
    traces = folder / "traces"
    if not traces.is_dir():
        return
    for precision in sorted(p for p in traces.iterdir() if p.is_dir()):
        for source in sorted(p for p in precision.iterdir() if p.is_dir()):
            if (precision.name, source.name) in ok:
                continue
            _replace_tree(source, into / INCOMPLETE / precision.name / source.name)
            say(f"{source.name}: its task did not finish ok; what it recorded is kept in "
                f"{INCOMPLETE}/{precision.name}/{source.name} (not validated)")
