"""Write one self-contained HTML report from traces and predictions.

Example: kfacperf report --trace traces/A --trace traces/B --prediction predictions/P
--out reports/NAME/index.html

A plan (kfacperf plan --out plan.json) adds its section: kfacperf report --plan plan.json

An existing --out (or --screenshot) file is replaced only with --force.
"""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", action="append", default=[], metavar="DIR", dest="traces",
                        help="a measured run (trace directory); repeat for several")
    parser.add_argument("--prediction", action="append", default=[], metavar="DIR",
                        dest="predictions",
                        help="a simulator output directory; repeat for several (the first of a "
                             "workload is its baseline, later ones are shown as what-if variants)")
    parser.add_argument("--validation", metavar="FILE", action="append", default=[],
                        help="held-out validation results (.parquet, .csv or .json, as kfacperf "
                             "validate --out writes them) for the accuracy section; repeat to "
                             "show several side by side, each labelled by its file name")
    parser.add_argument("--plan", metavar="FILE", default=None,
                        help="a plan written by kfacperf plan --out, shown as the plan section")
    parser.add_argument("--published", metavar="FILE", default=None,
                        help="published GPU cases vs prediction, as kfacperf validate --published "
                             "--out FILE.json wrote them")
    parser.add_argument("--title", default=None, help="page title (default: from the workloads)")
    parser.add_argument("--timeline-step", type=int, default=None, metavar="N",
                        help="measured step to draw as a timeline "
                             "(default: the first with the most stages)")
    parser.add_argument("--timeline-gpus", type=int, default=None, metavar="N",
                        help="GPU count of the simulated timeline (default: the largest "
                             "simulated; a count not simulated draws the nearest, and its "
                             "title says so)")
    parser.add_argument("--screenshot", default=None, metavar="PNG",
                        help="also save a PNG of the top of the page (needs chromium)")
    parser.add_argument("--out", default="reports/report/index.html", metavar="FILE",
                        help="HTML file to write (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite --out and --screenshot if they exist")


def run(args: argparse.Namespace) -> int:
    from kfacperf.errors import UserError
    from kfacperf.report.build import MAX_BYTES, build_report, headline_text
    from kfacperf.report.inputs import load_predictions, load_runs, validation_tables
    from kfacperf.report.plan import plan_result
    from kfacperf.report.published_section import published_data
    from kfacperf.safety import check_output_file

    if not (args.traces or args.predictions or args.plan or args.published or args.validation):
        raise UserError("give at least one --trace, --prediction, --validation, --plan or "
                        "--published")
    if args.timeline_gpus is not None and args.timeline_gpus < 1:
        raise UserError(f"--timeline-gpus must be >= 1, got {args.timeline_gpus}")
    check_output_file(args.out, force=args.force)
    if args.screenshot:
        check_output_file(args.screenshot, force=args.force, flag="--screenshot")
    # the files read as build_report reads them, before the (slower) traces
    validation = validation_tables(args.validation)
    plan, published = plan_result(args.plan), published_data(args.published)
    runs, predictions = load_runs(args.traces), load_predictions(args.predictions)
    out = build_report(runs, predictions, args.out, validation, title=args.title,
                       timeline_step=args.timeline_step, timeline_gpus=args.timeline_gpus,
                       plan=plan, published=published, files={
                           "validation": args.validation, "plan": [args.plan] if args.plan else [],
                           "published": [args.published] if args.published else []})
    text = headline_text(runs, predictions)
    if text:
        print(text)
    for r in runs:
        if r.summary.lacking:
            print(f"note: {r.summary.lacking}")
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    if size > MAX_BYTES:
        print(f"warning: {out} is larger than {MAX_BYTES / 2**20:.0f} MiB; "
              "fewer or smaller inputs keep it light")
    if args.screenshot:
        from kfacperf.report.browser import screenshot

        png = screenshot(out, args.screenshot)
        print(f"wrote {png} ({png.stat().st_size / 1e3:.0f} kB)")
    return 0
