"""``python -m kfacperf.pipeline.ground_truth --out DIR``: the ground-truth run
(``scripts/gpu-ground-truth.sh`` runs it; see ``docs/gpu-ground-truth.md``)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from kfacperf import vocab as S
from kfacperf.errors import UserError
from kfacperf.pipeline.ground_truth.driver import DEFAULT_BUDGET_S, run_ground_truth
from kfacperf.pipeline.ground_truth.plan import DRY, FULL, Settings

EXAMPLES = """examples:
  python -m kfacperf.pipeline.ground_truth --out gpu-ground-truth --budget-s 460
  python -m kfacperf.pipeline.ground_truth --out /tmp/gt --plan-only   # the plan, nothing run
  python -m kfacperf.pipeline.ground_truth --out /tmp/gt --dry-run     # tiny, on a CPU
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kfacperf.pipeline.ground_truth",
        description="Ground truth on a real GPU: the profile matrix, the stage timer's "
                    "overhead and the kernel timings, in one run with a time budget.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--return", dest="returned", default=None, metavar="DIR",
                   help="also keep DIR/ground-truth.tar.gz (the whole output folder) and copies "
                        "of summary.txt and ground-truth.log current after every task: what a "
                        "device machine hands back (a few files, two folders deep at most)")
    p.add_argument("--dry-run", action="store_true", help="the same steps tiny, on a CPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"time budget in seconds (default {DEFAULT_BUDGET_S:g}; none for "
                        "--dry-run)")
    p.add_argument("--precisions", default=None,
                   help=f"comma-separated, from {','.join(S.COMPUTE_DTYPES)} (default "
                        f"{','.join(FULL.precisions)})")
    p.add_argument("--no-nsys", action="store_true",
                   help="leave out the NVTX check (under nsys or ncu)")
    p.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    settings = DRY if args.dry_run else FULL
    if args.precisions:
        names = [p.strip() for p in args.precisions.split(",") if p.strip()]
        try:
            precisions = tuple(S.check_choice("precision", p, S.COMPUTE_DTYPES) for p in names)
        except ValueError as exc:
            raise UserError(f"--precisions: {exc}") from None
        settings = replace(settings, precisions=precisions)
    if args.no_nsys:
        settings = replace(settings, nsys=False)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    budget_s = args.budget_s if args.budget_s is not None else (
        None if args.dry_run else DEFAULT_BUDGET_S)
    returned = Path(args.returned) if args.returned else None
    try:
        if returned is not None and returned.resolve() == Path(args.out).resolve():
            raise UserError(f"--return {returned} is the output folder; give a folder of its "
                            "own (it gets three files: the archive, the summary, the log)")
        outcomes = run_ground_truth(
            settings_from(args), Path(args.out), budget_s=budget_s,
            argv=sys.argv if argv is None else argv, plan_only=args.plan_only,
            returned=returned,
            log=lambda line: print(line, flush=True))
    except UserError as exc:
        print(f"ground truth: {exc}", file=sys.stderr)
        return 2
    return 0 if all(o.status != "failed" for o in outcomes) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
