"""``python -m kfacperf.bench.kernels --out DIR [--dry-run]``: every kernel timing, written to
``DIR/kernels.json`` (see :mod:`kfacperf.bench.kernels`)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kfacperf.bench.kernels.records import OUTPUT_FILE
from kfacperf.bench.kernels.run import run_all, summary_lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kfacperf.bench.kernels",
        description="Time the kernels behind the device model's inverse and factor costs "
                    "(eigh, Cholesky, K-FAC factors of ResNet-50 layers, GEMM rates); writes "
                    "DIR/kernels.json.",
        epilog="examples:\n  python -m kfacperf.bench.kernels --out gpu-ground-truth\n"
               "  python -m kfacperf.bench.kernels --out /tmp/k --dry-run   # tiny, on a CPU",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for kernels.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (runs on a CPU)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip what would end later than this many seconds from now")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, as kfacperf profile's ranks)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else None
    report = run_all(args.out, dry_run=args.dry_run, budget_s=args.budget_s, device=device)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {Path(args.out) / OUTPUT_FILE} ({report.elapsed_s:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
