"""Predict held-out measured runs and report the error.

  kfacperf validate --calibrate traces/reference/p1 --holdout traces/reference/p2 \\
      --cluster models/clusters/local-cpu.toml
  kfacperf validate --published                       # every published GPU case
  kfacperf validate --published spngd-fig5 --json     # one case, as JSON

Calibrates the device model from the --calibrate traces only (a folder of trace directories
stands for all of them), then simulates every --holdout run with its own settings (workload,
world size, batch per rank, strategy, grad_worker_fraction, intervals, from its run.json) and
prints, per run, the measured and predicted step time and the error, then the per-stage
errors.  Held-out recordings of one configuration (the same settings, Fisher blocks and
estimator, and workload model, e.g. name-r1, name-r2) are pooled into one run: "rec" says how
many, "spread" how far apart their step times were.  A trace given twice (itself and in its
folder, say) counts once; two copies of one recorded run are an error.  A calibration
trace's measured per-layer times price held-out runs of the same workload model only (a
user's FILE.py:FUNC of another file or an edited one is another model).
--json prints the same as JSON (ending with the median and worst step-time error);
--out writes the per-run table for `kfacperf report --validation` (.parquet, .csv or .json);
an existing file is replaced only with --force.

--published [CASE ...] instead predicts published GPU measurements (published/*.toml; all of
them without names) from the setup each states, and prints per point measured, predicted and
error, and per series the median and worst |error|; each case says whether it belongs to the
calibration set (presets were fitted to it) or is held out (never fitted).  --out FILE.json
writes it for `kfacperf report --published`.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kfacperf.validation import ValidationResult


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibrate", nargs="+", metavar="TRACE",
                        help="traces to fit the device model to (a folder of traces: all of "
                             "them; a trace given twice counts once)")
    parser.add_argument("--holdout", nargs="+", metavar="TRACE",
                        help="measured runs to predict (never used for calibration; a trace "
                             "given twice counts once)")
    parser.add_argument("--published", nargs="*", metavar="CASE", default=None,
                        help="predict published GPU measurements instead (case names under "
                             "published/, or TOML paths; none: every case)")
    parser.add_argument("--role", choices=("calibration", "held-out"), default=None,
                        help="with --published: only the cases of this role")
    parser.add_argument("--cluster", default=None,
                        help="cluster model, preset or TOML (default: the local-cpu preset)")
    parser.add_argument("--workload-model", action="append", default=[], metavar="TOML",
                        help="workload model(s) to use for the traces (default: models/workloads)")
    parser.add_argument("--stages", action="store_true",
                        help="print every stage's error, not only those of stages above 5%% of "
                             "the step")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="write the per-run table (.parquet, .csv) or everything (.json)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def check_out(path: str, *, force: bool = False) -> None:
    from pathlib import Path

    from kfacperf.safety import check_output_file

    check_output_file(path, force=force)
    if Path(path).suffix.lower() not in (".parquet", ".csv", ".json"):
        raise ValueError(f"--out {path}: use a .parquet, .csv or .json file name")


def write_out(result: ValidationResult, path: str, *, force: bool = False) -> None:
    """Write the result to ``path`` atomically (.parquet and .csv: the per-run table; .json:
    everything, a missing number as null)."""
    from pathlib import Path

    from kfacperf.safety import atomic_path, atomic_write_text, dumps_json

    check_out(path, force=force)
    suffix = Path(path).suffix.lower()
    runs = result.runs
    if suffix == ".json":
        atomic_write_text(path, dumps_json(result.to_dict(), indent=1) + "\n")
        return
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            runs.to_parquet(tmp, index=False)
        else:
            runs.to_csv(tmp, index=False)


def _run_published(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kfacperf.errors import UserError
    from kfacperf.safety import atomic_write_text, check_output_file, dumps_json
    from kfacperf.validation.published import validate_published

    if args.calibrate or args.holdout:
        raise UserError("--published predicts published cases: give it without --calibrate "
                        "and --holdout")
    if args.out:
        check_output_file(args.out, force=args.force)
        if Path(args.out).suffix.lower() != ".json":
            raise UserError(f"--out {args.out}: with --published, write a .json file")
    result = validate_published(args.published or None,
                                roles=[args.role] if args.role else None)
    data = result.to_dict()
    if args.out:
        atomic_write_text(args.out, dumps_json(data, indent=1) + "\n")
    if args.json:
        print(dumps_json(data, indent=1))
    else:
        print(result.table())
        if args.out:
            print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from kfacperf.errors import UserError
    from kfacperf.safety import dumps_json
    from kfacperf.validation import validate
    from kfacperf.validation.text import text_table

    if args.published is not None:
        return _run_published(args)
    if not args.calibrate or not args.holdout:
        raise UserError("give --calibrate TRACE... and --holdout TRACE... (or --published)")
    if args.out:
        check_out(args.out, force=args.force)
    result = validate(args.calibrate, args.holdout, cluster=args.cluster,
                      workload_search=args.workload_model)
    if args.out:
        write_out(result, args.out, force=args.force)
    if args.json:
        print(dumps_json(result.to_dict(), indent=1))
    else:
        print(text_table(result, all_stages=args.stages))
        if args.out:
            print(f"wrote {args.out}")
    return 0
