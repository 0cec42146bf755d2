"""The report's last section: every input file and the command that wrote it, so each
number on the page can be traced to the trace, prediction or result file it came from."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from kfacperf.report.inputs import PredictionData, RunData
from kfacperf.report.page import Section, fmt_plain, table

# What wrote each kind of result file (they do not record their own command line).
_WRITERS = {
    "validation": "kfacperf validate --out",
    "plan": "kfacperf plan --out",
    "published": "kfacperf validate --published --out",
}


def given_files(value: Any) -> list[str]:
    """The files among what was given for a validation, plan or published input: a path,
    or paths in a list or in a dict by label; tables and results in memory name none."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [os.fspath(v) for v in value if isinstance(v, (str, os.PathLike))]
    return []


def _run_source(run: RunData) -> str:
    command = fmt_plain(run.run.get("command"))
    if run.run.get("completed") is False:
        why = run.run.get("failure")
        command += " (did not complete" + (f": {why})" if why else ")")
    return command


def sources_section(runs: Sequence[RunData], predictions: Sequence[PredictionData],
                    files: Mapping[str, Sequence[str]]) -> Section:
    """One row per input: what it is, its path, the command that wrote it.  ``files`` are
    the validation, plan and published files by kind (:func:`given_files`)."""
    sec = Section(key="sources", title="Sources",
                  intro="Where the numbers above come from: each measured run by its trace "
                        "directory and the kfacperf profile command recorded in its run.json, "
                        "each prediction by its directory and the kfacperf simulate command "
                        "in its prediction.json, and the result files read.")
    rows = [{"input": f"measured run {r.name}", "path": str(r.path), "command": _run_source(r)}
            for r in runs]
    rows += [{"input": f"prediction {p.name}", "path": str(p.path),
              "command": fmt_plain(p.meta.get("command"))} for p in predictions]
    rows += [{"input": kind, "path": path, "command": _WRITERS.get(kind, "")}
             for kind, paths in files.items() for path in paths]
    if not rows:
        sec.note = "The inputs were given as data, not files."
        return sec
    sec.add_html(table(pd.DataFrame(rows), [
        ("input", "input", fmt_plain), ("path", "path", fmt_plain),
        ("command", "written by", fmt_plain)], wrap=("path", "command")))
    return sec
