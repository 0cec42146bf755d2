"""How a profile run ends, in words: :class:`ProfileOutcome`, and for a run that failed or
was interrupted which rank stopped it and how, what each rank recorded, and the trace marked
incomplete (``completed`` false, ``failure`` saying why) with every finished step kept."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from kfacperf.runtime import launch
from kfacperf.runtime.config import ProfileConfig
from kfacperf.trace.schema import PARTS_DIR, RUN_FILE
from kfacperf.trace.store import Trace, load_trace, read_run, write_run
from kfacperf.vocab import STEP


@dataclass(frozen=True, kw_only=True)
class ProfileOutcome:
    """``ok``: the run completed.  ``trace``: what was recorded (None on ranks other than 0
    under torchrun).  ``message``: why it failed (or, when ``ok``, a warning).
    ``interrupted``: the signal that stopped the run (``"SIGINT"``, ``"SIGTERM"``), or ""."""

    ok: bool
    trace: Trace | None
    message: str = ""
    interrupted: str = ""

    @property
    def exit_status(self) -> int:
        """0, 1 for a failed run, 128 + N after signal N."""
        if self.interrupted:
            return 128 + int(signal.Signals[self.interrupted])
        return 0 if self.ok else 1


def cause_text(sup: launch.Supervision) -> str:
    if sup.interrupted:
        return f"interrupted by {sup.interrupted}"
    c = sup.cause
    if c is None:
        return "the run failed"
    return c.how if c.rank < 0 else f"rank {c.rank} {c.how}"


def mark_incomplete(out: Path, why: str) -> None:
    """Say in run.json why the run did not complete (it stays ``completed: false``)."""
    try:
        run = read_run(out / RUN_FILE)
    except (OSError, ValueError):
        return
    if not run.get("completed"):
        run["failure"] = why
        write_run(out, run)


def steps_recorded(out: Path) -> tuple[Trace | None, str]:
    """The partial trace and, in words, how many steps each rank recorded."""
    try:
        trace = load_trace(out, partial=True)
    except (OSError, ValueError) as exc:
        return None, f"no readable trace in {out}: {exc}"
    ev = trace.events
    done = ev[ev["stage"] == STEP].groupby("rank")["step"].nunique()
    world = int(trace.run.get("world_size") or 0)
    counts = [int(done.get(r, 0)) for r in range(world)]
    if counts and len(set(counts)) == 1:
        return trace, f"{counts[0]} finished step(s) of each rank"
    return trace, "finished steps " + ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts))


def interrupted_outcome(config: ProfileConfig, out: Path, signame: str) -> ProfileOutcome:
    """One line: what stopped the run, and what the trace keeps."""
    mark_incomplete(out, f"interrupted by {signame}")
    trace, steps = steps_recorded(out)
    message = (f"interrupted by {signame}: stopped all {config.nproc} rank(s) of this node; "
               f"the trace in {out} keeps {steps} and is marked incomplete (completed=false)")
    return ProfileOutcome(ok=False, trace=trace, message=message, interrupted=signame)


def finished_trace(config: ProfileConfig, out: Path) -> Trace | None:
    """The trace, if it is complete although torchrun failed: marked completed by rank 0 (after
    it gathered every rank's parts) and every rank recorded every step."""
    try:
        trace = load_trace(out)
    except (OSError, ValueError):
        return None
    if not trace.completed:
        return None
    ev = trace.events
    counts = ev[ev["stage"] == STEP].groupby("rank")["step"].nunique()
    world = int(trace.run.get("world_size") or 0)
    if world < 1 or len(counts) != world or (counts < config.total_steps).any():
        return None
    return trace


def rank_stopped(out: Path, rank: int, why: str, *, interrupted: str = "") -> ProfileOutcome:
    """This rank's end under the user's torchrun: rank 0 says ``why`` in run.json."""
    from kfacperf.runtime.recording import error_path

    if rank == 0:
        mark_incomplete(out, why)
    report = error_path(out, rank)
    where = f" (traceback: {report})" if report.exists() and not interrupted else ""
    return ProfileOutcome(ok=False, trace=None, interrupted=interrupted, message=(
        f"{why}{where}; the trace in {out} keeps every finished step and is marked "
        "incomplete (completed=false)"))


def failed_in_process(config: ProfileConfig, out: Path, exc: Exception) -> ProfileOutcome:
    from kfacperf.runtime.recording import exception_summary

    cause = launch.RankEnd(rank=0, status=1, how=f"failed: {exception_summary(exc)}")
    return failed_outcome(config, out, launch.Supervision(ok=False, cause=cause))


def a_step_finished(out: Path) -> bool:
    """Whether rank 0 recorded a finished step (its part gets rows at each step's end): an
    error after that came from the run, not from checking the settings or the model."""
    from kfacperf.trace.parts import event_part_path, read_stream

    path = event_part_path(out / PARTS_DIR, 0)
    if not path.exists():
        return False
    table, _ = read_stream(path)
    return table is not None and table.num_rows > 0


def culprit(sup: launch.Supervision, out: Path) -> str:
    """Which rank stopped the run, and how, in one line.  Ranks often end within the same
    moment, so the one named is a rank that failed on its own (killed, crashed, or an error
    of its own) before a rank that gave up waiting for a peer, and a stopped rank before
    the peers that waited for it."""
    from kfacperf.runtime.recording import error_path, read_error_summary

    cause = sup.cause
    if cause is None or cause.rank < 0:
        return cause_text(sup)

    def report(rank: int) -> str:
        path = error_path(out, rank)
        return read_error_summary(path) if path.exists() else ""

    def waited(rank: int) -> bool:  # gave up waiting for a peer
        return report(rank).startswith(("CollectiveError", "Stalled"))

    def text(end: launch.RankEnd) -> str:
        why = report(end.rank)  # an in-process rank's ``how`` already says it
        return f"rank {end.rank} {end.how}" + (f": {why}" if why and why not in end.how else "")

    if cause.status is None:  # stopped past the timeout
        return text(cause)
    ends = sup.ends or (cause,)
    own = [e for e in ends if e.status not in (None, 0) and not waited(e.rank)]
    if own:
        return text(own[0])
    stopped = [e for e in ends if e.how == "was stopped"]
    if stopped:
        return (f"rank {stopped[0].rank} stopped responding (its process was stopped); "
                f"{text(cause)}")
    return text(cause)


def failed_outcome(config: ProfileConfig, out: Path, sup: launch.Supervision) -> ProfileOutcome:
    """Say which rank stopped the run and how, what each rank recorded, and what the trace
    keeps; mark the trace incomplete."""
    from kfacperf.runtime.recording import error_path, read_error_summary

    cause = culprit(sup, out)
    mark_incomplete(out, cause)
    lines = [f"the run failed: {cause}."]
    ends = {e.rank: e for e in sup.ends}
    trace, recorded = steps_recorded(out)
    done = None
    if trace is None:
        lines.append(f"  {recorded}")
    else:
        ev = trace.events
        done = ev[ev["stage"] == STEP].groupby("rank")["step"].agg(["count", "max"])
    world = int(trace.run.get("world_size") or 0) if trace is not None else len(ends)
    for rank in range(world):
        n = int(done.loc[rank, "count"]) if done is not None and rank in done.index else 0
        last = (f"last finished step {int(done.loc[rank, 'max'])}" if n and done is not None
                else "no finished step")
        parts = [f"  rank {rank}: {n}/{config.total_steps} steps recorded, {last}"]
        if rank in ends:
            parts.append(ends[rank].how)
        report = error_path(out, rank)
        if report.exists():
            parts.append(f"{read_error_summary(report)} [{report}]")
        lines.append("; ".join(parts))
    if trace is not None:
        silent = [r for r in range(world) if done is None or r not in done.index]
        usable = ("it can be loaded and summarized as it is" if not silent else
                  f"rank(s) {', '.join(map(str, silent))} recorded no step, so the commands "
                  "refuse it as a whole run (kfacperf.trace.store.load_trace(path, "
                  "partial=True) reads what is there)")
        lines.append(f"the trace in {out} keeps every finished step and is marked incomplete "
                     f"(completed=false); {usable}.")
    return ProfileOutcome(ok=False, trace=trace, message="\n".join(lines))
