"""Export a trace as Chrome / Perfetto JSON (pid = rank, tid = lane).

Open the file in https://ui.perfetto.dev or chrome://tracing.  With --per-rank, OUT is a
directory receiving one rank<R>.json per rank (the layout Holistic Trace Analysis loads).
An existing output is replaced only with --force, and never a file of the trace itself
(its run.json, events.parquet, telemetry.parquet, workload.toml or parts/), nor the trace
directory.
"""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chrome", required=True, metavar="TRACE",
                        help="trace directory to export")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="output file (default: TRACE/trace.json; with --per-rank a "
                             "directory, default TRACE/chrome)")
    parser.add_argument("--per-rank", action="store_true", help="one file per rank")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing output (never a file of the trace itself)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kfacperf.safety import check_output_dir, check_output_file
    from kfacperf.trace.chrome import check_export_out, export_chrome
    from kfacperf.trace.store import load_trace

    trace = load_trace(args.chrome)
    default = Path(args.chrome) / ("chrome" if args.per_rank else "trace.json")
    out = Path(args.out) if args.out else default
    check_export_out(trace.path, out, per_rank=args.per_rank)  # never the trace itself
    if args.per_rank:
        check_output_dir(out, force=args.force, replaceable=lambda d: all(
            c.name.startswith("rank") and c.suffix == ".json" for c in d.iterdir()))
    else:
        check_output_file(out, force=args.force)
    files = export_chrome(trace, out, per_rank=args.per_rank)
    if args.per_rank:  # --force: no rank file of an earlier export stays beside these
        written = {Path(f).name for f in files}
        for stale in out.glob("rank*.json"):
            if stale.name not in written:
                stale.unlink()
    n = len(trace.events)
    note = "" if trace.completed else " (incomplete run)"
    for f in files:
        print(f)
    print(f"{n} events from {trace.path}{note} -> {len(files)} file(s); open in "
          "https://ui.perfetto.dev or chrome://tracing")
    return 0
