"""What a trace lacks, in one line: the finished steps of a run that did not complete.

A run that dies keeps every step its ranks finished (:mod:`kfacperf.trace.parts`);
:func:`kfacperf.trace.measure.measured_events` takes the steps every rank finished, and the
commands that read a trace say what is missing with :func:`incomplete_note`.

This module never imports torch.
"""
from __future__ import annotations

from typing import Any

from kfacperf.trace.measure import measured_events, unfinished_steps


def incomplete_note(trace: Any, label: str) -> str:
    """One line on what a trace lacks: for a run that did not complete (``run["completed"]``
    false) or one with steps that only some ranks finished, how many measured steps every
    rank finished (of how many ``run["steps"]`` planned), which steps only some ranks
    finished (left out) and why the run stopped (``run["failure"]``); "" for a whole run."""
    run = trace.run
    partial = unfinished_steps(trace.events)
    if run.get("completed", False) and not partial:
        return ""
    done = int(measured_events(trace)["step"].nunique())
    planned = run.get("steps")
    text = f"{label}: " + ("the run did not complete" if not run.get("completed", False)
                           else "the trace is uneven")
    failure = " ".join(str(run.get("failure") or "").split())
    if failure:
        text += f" ({failure})"
    text += f"; {done} measured step(s) finished by every rank"
    if isinstance(planned, int) and not isinstance(planned, bool) and planned > 0:
        text += f" of {planned} planned"
    if partial:
        shown = ", ".join(map(str, partial[:5])) + (", ..." if len(partial) > 5 else "")
        text += f"; step(s) {shown} finished by only some ranks, left out"
    return text + "; the finished steps are used"
