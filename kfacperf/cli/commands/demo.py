"""Run the whole pipeline on this machine: profile SGD and K-FAC with 1 and 2 processes,
measure collectives, calibrate from the 1-process runs, predict the 2-process runs, simulate
ResNet-50 on cluster presets up to 4,096 GPUs, and write one HTML report.

Examples: `kfacperf demo` (under 3 minutes on a 2-core machine); `kfacperf demo --quick` (a
tiny run, under a minute); `kfacperf demo --workload my_model.py:build --quick` (your own
model, see `kfacperf profile --help`).

--out must be new, empty or an earlier demo's directory (the demo replaces its own files);
one holding other files needs --force.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TypedDict

from kfacperf.cli.commands import key_value


class DemoOptions(TypedDict, total=False):
    """The :class:`~kfacperf.pipeline.DemoConfig` settings this command's flags can give."""

    out: str
    workload: str
    workload_options: Mapping[str, object]
    strategies: tuple[str, ...]
    steps: int
    warmup: int
    batch_size: int


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default=None,
                        help="workload profiled here (default: resnet20), or your own model "
                             "as FILE.py:FUNC or package.module:FUNC")
    parser.add_argument("--workload-option", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="workload option, e.g. hidden=[256,128] "
                        "(repeatable)")
    parser.add_argument("--strategies", default=None,
                        help="K-FAC strategies profiled next to SGD: spngd, kaisa or "
                             "spngd,kaisa (default: spngd)")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps per run (default 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps per run (default 3; 1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="examples per rank per step (default 32)")
    parser.add_argument("--out", default="reports/demo",
                        help="output directory: index.html, and traces/, models/, "
                             "predictions/, logs/ beside it (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="write into --out even if it holds files of something else")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run: few steps, small commbench sweep, five GPU counts")
    parser.add_argument("--verbose", action="store_true",
                        help="show each phase's own output instead of logging it")
    parser.add_argument("--json", action="store_true",
                        help="print the headline numbers as JSON at the end")


def run(args: argparse.Namespace) -> int:
    import sys

    from kfacperf.pipeline import DemoConfig, DemoPhaseError, quick_config, run_demo
    from kfacperf.safety import dumps_json

    settings: DemoOptions = {"out": args.out}
    if args.workload is not None:
        settings["workload"] = args.workload
    if args.workload_option:
        settings["workload_options"] = dict(args.workload_option)
    if args.strategies is not None:
        settings["strategies"] = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.warmup is not None:
        settings["warmup"] = args.warmup
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    config = quick_config(**settings) if args.quick else DemoConfig(**settings)
    try:
        result = run_demo(config, stream=sys.stdout, verbose=args.verbose, force=args.force)
    except DemoPhaseError as exc:
        print(f"kfacperf demo: {exc}", file=sys.stderr)
        return 1
    print()
    print(result.text())
    if args.json:
        print(dumps_json(result.to_dict(), indent=1))
    return 0
