"""Plan training on a cluster: time to solution and the best strategy per GPU count.

Example::

    kfacperf plan --workload resnet50 --device v100 --cluster abci-v100 --gpus 64-4096 \\
        --convergence mlperf-v0.7-lars-resnet50 spngd-resnet50

For each GPU count the plan searches SGD and K-FAC (spngd; kaisa with every grad-worker
fraction from 1/P to 1) over factor/inverse intervals, factor communication precision,
symmetric packing, bucket size and batch per GPU; drops what does not fit in the device's
memory; and prints the fastest SGD and K-FAC configuration side by side, then the Pareto
front of time to solution against GPU-hours.  Steps to the target come from convergence
models (``models/convergence/``, or a TOML file of your own; one per optimizer); an
optimizer without one is an error.  Progress goes to stderr.

More::

    kfacperf plan --workload resnet50 --device h100 --cluster dgx-h100-ndr --gpus 8,64,512 \\
        --convergence mlperf-v0.7-lars-resnet50 chainerkfac-resnet50 \\
        --batch-per-gpu 32,64,128 --intervals 1/1,10/100 --json --out plan.json
    kfacperf report --plan plan.json --out reports/plan/index.html
"""
from __future__ import annotations

import argparse
import sys


def _ints(flag: str, text: str) -> list[int]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {part!r} is not a whole number") from None
        if value < 1:
            raise ValueError(f"{flag} {text!r}: values must be >= 1, got {value}")
        out.append(value)
    return out


def _floats(flag: str, text: str) -> list[float]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {part!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{flag} {text!r}: values must be > 0, got {part}")
        out.append(value)
    return out


def parse_intervals(text: str) -> list[tuple[int, int]]:
    """``1/1,10/100`` -> [(1, 1), (10, 100)] (:func:`kfacperf.plan.space.parse_intervals`)."""
    from kfacperf.plan.space import parse_intervals as parse

    return parse(text, "--intervals")


def configure(parser: argparse.ArgumentParser) -> None:
    from kfacperf import vocab as S
    from kfacperf.plan import DEFAULT_MEMORY_FRACTION
    from kfacperf.plan.space import DEFAULT_INTERVALS

    m = parser.add_argument_group("models (preset name or TOML path)")
    m.add_argument("--workload", required=True, help="workload model, e.g. resnet50")
    m.add_argument("--device", required=True, help="device model, e.g. v100")
    m.add_argument("--cluster", required=True, help="cluster model, e.g. abci-v100")
    m.add_argument("--convergence", nargs="+", action="extend", default=[], metavar="NAME",
                   help="convergence models, one per optimizer (sgd, kfac); default: the only "
                        "preset for the workload")
    s = parser.add_argument_group("search")
    s.add_argument("--gpus", required=True,
                   help="GPU counts: 8,64,512; 8-4096 (8 doubled up to 4096); "
                        "8,16,...,1024 (a geometric progression); a range or progression "
                        "must reach its end exactly: 8-1000 and 8,16,...,1000 are errors")
    s.add_argument("--strategies", default=",".join(S.SIM_STRATEGIES),
                   help="strategies to search (default: %(default)s)")
    s.add_argument("--batch-per-gpu", default="32",
                   help="examples per GPU, comma-separated (default: %(default)s)")
    s.add_argument("--intervals", default=",".join(f"{f}/{i}" for f, i in DEFAULT_INTERVALS),
                   help="factor/inverse interval pairs (default: %(default)s; the convergence "
                        "model's own pair is added, staler ones are dropped)")
    s.add_argument("--comm-dtypes", default=",".join(S.COMM_DTYPES),
                   help="factor communication precisions (default: %(default)s)")
    s.add_argument("--symmetric", choices=("both", "on", "off"), default="both",
                   help="symmetric (upper-triangle) packing of factors (default: both)")
    s.add_argument("--bucket-mb", default="25",
                   help="gradient and factor bucket sizes in MB (default: %(default)s)")
    s.add_argument("--no-extrapolate", action="store_true",
                   help="only global batches inside the convergence data")
    r = parser.add_argument_group("device and run")
    r.add_argument("--memory-gb", type=float, default=None,
                   help="memory per GPU in GB (default: the device model's)")
    r.add_argument("--memory-fraction", type=float, default=DEFAULT_MEMORY_FRACTION,
                   help="share of it a configuration may use (default: %(default)s)")
    r.add_argument("--dtype", choices=S.COMPUTE_DTYPES, default="fp32",
                   help="forward/backward precision (default: fp32; bf16 for mixed precision)")
    r.add_argument("--inverse-method", choices=S.INVERSE_METHODS, default=S.EIGEN)
    o = parser.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the plan as JSON")
    o.add_argument("--out", help="also write the plan as JSON to this file (for kfacperf report)")
    o.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    o.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    from kfacperf.errors import UserError
    from kfacperf.plan import plan
    from kfacperf.plan.result import save_plan
    from kfacperf.plan.text import format_plan
    from kfacperf.safety import check_output_file, dumps_json
    from kfacperf.sim.gpu_counts import parse_gpu_counts

    if args.out:
        check_output_file(args.out, force=args.force)
    if args.memory_gb is not None and not (0 < args.memory_gb < float("inf")):
        raise UserError(f"--memory-gb must be > 0, got {args.memory_gb}")
    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = plan(
        args.workload, args.device, args.cluster, gpus=parse_gpu_counts(args.gpus),
        convergence=args.convergence, strategies=strategies,
        batch_per_gpu=_ints("--batch-per-gpu", args.batch_per_gpu),
        intervals=parse_intervals(args.intervals),
        comm_dtypes=[x.strip() for x in args.comm_dtypes.split(",") if x.strip()],
        symmetric={"both": (False, True), "on": (True,), "off": (False,)}[args.symmetric],
        bucket_mb=_floats("--bucket-mb", args.bucket_mb), memory_gb=args.memory_gb,
        memory_fraction=args.memory_fraction, extrapolate=not args.no_extrapolate,
        progress=progress, dtype=args.dtype, inverse_method=args.inverse_method,
    )
    if args.out:
        save_plan(result, args.out, force=args.force)
    if args.json:
        print(dumps_json(result.to_dict(), indent=1))
    else:
        print(format_plan(result))
        if args.out:
            print(f"\nplan written to {args.out} (kfacperf report --plan {args.out})")
    return 0
