"""Predict step time: workload x device x cluster x strategy x GPU counts.

Example::

    kfacperf simulate --workload resnet50 --device h100 --cluster dgx-h100-ndr \\
        --strategy sgd,spngd,kaisa --gpus 1-4096 --batch-per-gpu 32 \\
        --factor-interval 10 --inverse-interval 100 --out predictions/resnet50-h100

Models are preset names (``models/<kind>/<name>.toml``) or paths to TOML files.  GPU counts:
``1,8,64``; ``1-4096`` (1 doubled up to 4096: the powers of two); ``1,2,4,...,4096`` (a
geometric progression).  Both must reach their end exactly: ``1,2,4,...,48`` and ``3-100``
are errors naming the neighbours (32 and 64; 96 and 192).
Strategies: ``sgd``, ``spngd``, ``kaisa`` (f from --grad-worker-fraction), ``kaisa:0.5``,
``kaisa:1/8``, ``kaisa:mem-opt`` (f = 1/P at every P), ``kaisa:comm-opt``.  What-if flags
override single values of the models.

SP-NGD's Fisher variants (emp/1mc x unitBN/fullBN; see docs/fisher-blocks.md)::

    kfacperf simulate --workload resnet50 --device v100 --cluster abci-v100 --strategy spngd \\
        --gpus 1-1024 --factor-interval 1 --inverse-interval 1 --inverse-method cholesky \\
        --bn-blocks unit --fisher mc

Limits: at most 1,048,576 GPUs; a prediction that is not finite (or over a year per step)
is an error, never a result.  --out must be a new or empty directory; an earlier prediction
there is replaced only with --force, and a directory holding a measured trace never.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from kfacperf import vocab
from kfacperf.cli.commands import positive_int


def parse_gpus(text: str) -> list[int]:
    """GPU counts from ``1,2,8``, ``1-4096`` (powers of two) or ``1,2,4,...,64``
    (:func:`kfacperf.sim.gpu_counts.parse_gpu_counts`)."""
    from kfacperf.sim.gpu_counts import parse_gpu_counts

    return parse_gpu_counts(text, flag="--gpus")


def configure(parser: argparse.ArgumentParser) -> None:
    from kfacperf.sim.models.cluster import V_FORMS
    from kfacperf.vocab import (
        COMM_DTYPES,
        COMPUTE_DTYPES,
        CONV_FACTORS,
        INVERSE_METHODS,
        PLACEMENTS,
    )

    m = parser.add_argument_group("models (preset name or TOML path)")
    m.add_argument("--workload", required=True, help="workload model, e.g. resnet50")
    m.add_argument("--device", required=True, help="device model, e.g. h100")
    m.add_argument("--cluster", required=True, help="cluster model, e.g. dgx-h100-ndr")
    r = parser.add_argument_group("run")
    r.add_argument("--strategy", default="sgd,spngd,kaisa",
                   help="comma-separated strategies (default: sgd,spngd,kaisa)")
    r.add_argument("--gpus", default="1-4096",
                   help="GPU counts: 1,8,64; 1-4096 (1 doubled up to 4096); 1,2,4,...,4096 "
                        "(a geometric progression); a range or progression must reach its "
                        "end exactly: 3-100 and 1,2,4,...,48 are errors (default: 1-4096)")
    r.add_argument("--batch-per-gpu", type=int, default=32, help="examples per GPU (default 32)")
    r.add_argument("--factor-interval", type=int, default=1,
                   help="steps between factor updates (default: 1)")
    r.add_argument("--inverse-interval", type=int, default=1,
                   help="steps between inverse updates, a multiple of --factor-interval "
                        "(default: 1)")
    r.add_argument("--grad-worker-fraction", type=float, default=1.0,
                   help="KAISA's f for a plain 'kaisa' (default 1 = COMM-OPT)")
    r.add_argument("--inverse-method", choices=INVERSE_METHODS, default="eigen",
                   help="how K-FAC inverts its factors (default: eigen)")
    r.add_argument("--bucket-mb", type=float, default=25.0,
                   help="gradient (DDP) and factor bucket size in MB (default 25)")
    r.add_argument("--bn-blocks", choices=vocab.BN_BLOCKS, default=vocab.BN_NONE,
                   help="BatchNorm layers as Fisher blocks: none (default), unit (2x2 per "
                        "channel, SP-NGD's unitBN) or full (2Cx2C, fullBN)")
    r.add_argument("--fisher", choices=vocab.FISHER_TYPES, default=vocab.FISHER_EMP,
                   help="emp (default) or mc: one extra backward on factor steps (SP-NGD's "
                        "1mc)")
    w = parser.add_argument_group("what-if overrides")
    w.add_argument("--bandwidth-scale", type=float, help="multiply every link bandwidth")
    w.add_argument("--latency-scale", type=float,
                   help="multiply every link latency: the tiers' alpha_us, or on an NCCL "
                        "cluster NCCL's own latency constants (default 1)")
    w.add_argument("--compute-scale", type=float, help="divide every compute time")
    w.add_argument("--comm-dtype", choices=COMM_DTYPES,
                   help="precision of factor communication")
    w.add_argument("--symmetric-factors", action="store_true",
                   help="send factors as upper triangles")
    w.add_argument("--dtype", choices=COMPUTE_DTYPES,
                   help="forward/backward compute precision")
    w.add_argument("--kfac-dtype", choices=COMPUTE_DTYPES,
                   help="factor statistics and preconditioning precision (mixed-precision "
                        "factors: bf16, which is fp16 on a V100)")
    w.add_argument("--precond-comm-dtype", choices=COMM_DTYPES,
                   help="precision of the preconditioned gradients sent back")
    w.add_argument("--placement", choices=PLACEMENTS,
                   help="SP-NGD's owners: balanced by cost (default) or contiguous runs of the "
                        "layers sorted by name (SP-NGD's Chainer code)")
    w.add_argument("--conv-factors", choices=CONV_FACTORS,
                   help="how conv A factors are computed: displacement Grams (default, this "
                        "project's optimizer) or unfolded patches (im2col)")
    w.add_argument("--statistics-fraction", type=float, metavar="F",
                   help="share of the layers whose statistics a factor step refreshes, in "
                        "(0, 1] (stale statistics; default 1)")
    w.add_argument("--v-form", choices=V_FORMS,
                   help="cost form of reduce-scatter-v / all-gather-v")
    w.add_argument("--threads-per-rank", type=positive_int, metavar="N",
                   help="CPU threads per rank, >= 1, as in the traces the device model was "
                        "calibrated from (its times are for that many threads): here it only "
                        "sets how far ranks x threads oversubscribe a node's cores, which "
                        "slows every rank (CPU clusters; default: 1)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", help="write the prediction directory here (new or empty)")
    o.add_argument("--force", action="store_true",
                   help="replace an earlier prediction in --out (never a measured trace)")
    o.add_argument("--json", action="store_true", help="print the summary as JSON")
    o.add_argument("--no-events", action="store_true",
                   help="skip the per-class event table (smaller, faster)")
    o.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (a sweep longer than a few seconds "
                        "prints one every few seconds)")


MAX_SCALE = 1e6
"""What-if scales (--bandwidth-scale, ...) lie between 1/MAX_SCALE and MAX_SCALE."""


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"inverse_method": args.inverse_method}
    if args.bn_blocks != vocab.BN_NONE:
        out["bn_blocks"] = args.bn_blocks
    if args.fisher != vocab.FISHER_EMP:
        out["fisher"] = args.fisher
    pairs = (("bandwidth_scale", "bandwidth_scale"), ("latency_scale", "alpha_scale"),
             ("compute_scale", "compute_scale"), ("comm_dtype", "comm_dtype"),
             ("dtype", "dtype"), ("v_form", "v_form"), ("threads_per_rank", "threads_per_rank"),
             ("kfac_dtype", "kfac_dtype"), ("precond_comm_dtype", "precond_dtype"),
             ("statistics_fraction", "statistics_fraction"), ("placement", "placement"),
             ("conv_factors", "conv_factors"))
    for flag, option in pairs:
        value = getattr(args, flag)
        if value is not None:
            if flag == "statistics_fraction":
                if not (math.isfinite(value) and 0 < value <= 1):
                    raise ValueError(f"--statistics-fraction must be in (0, 1], got {value}")
            elif isinstance(value, float) and not (math.isfinite(value) and
                                                   1 / MAX_SCALE <= value <= MAX_SCALE):
                raise ValueError(f"--{flag.replace('_', '-')} must be a number from "
                                 f"{1 / MAX_SCALE:g} to {MAX_SCALE:g}, got {value}")
            out[option] = value
    if args.symmetric_factors:
        out["symmetric_factors"] = True
    return out


def rerunnable_command(args: argparse.Namespace) -> str:
    """The ``kfacperf simulate`` command that gives this prediction again, as a shell reads
    it: every option set, an on/off flag as the flag alone (``--no-events``, not
    ``--no-events True``), values quoted where a shell needs it."""
    import shlex

    words = ["kfacperf", "simulate"]
    for key, value in sorted(vars(args).items()):
        if key.startswith("_") or key in ("command", "force") or value in (None, False):
            continue
        words.append(f"--{key.replace('_', '-')}")
        if value is not True:
            words.append(shlex.quote(str(value)))
    return " ".join(words)


def memory_note(args: argparse.Namespace) -> str | None:
    """:func:`~kfacperf.plan.memory.overflow_note` for the command's workload and device."""
    from kfacperf.plan.memory import overflow_note
    from kfacperf.sim.models import load_device, load_workload

    return overflow_note(load_workload(args.workload), load_device(args.device),
                         batch_per_gpu=args.batch_per_gpu, dtype=args.dtype or "fp32")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from kfacperf.safety import dumps_json, json_records
    from kfacperf.sim.graphs.strategies.common import MAX_BUCKET_MB
    from kfacperf.sim.prediction import check_prediction_out, write_prediction
    from kfacperf.sim.sweep import simulate

    gpus = parse_gpus(args.gpus)
    strategies = [s for s in (x.strip() for x in args.strategy.split(",")) if s]
    if not strategies:
        raise ValueError("--strategy: no strategy given")
    if args.bucket_mb is not None and not 0 < args.bucket_mb <= MAX_BUCKET_MB:
        raise ValueError(f"--bucket-mb must be > 0 and at most {MAX_BUCKET_MB:g}, "
                         f"got {args.bucket_mb}")
    if args.out:
        check_prediction_out(args.out, force=args.force)  # before the work, not after
    pred = simulate(
        args.workload, args.device, args.cluster, strategies, gpus=gpus,
        batch_per_gpu=args.batch_per_gpu, factor_interval=args.factor_interval,
        inverse_interval=args.inverse_interval, grad_worker_fraction=args.grad_worker_fraction,
        factor_bucket_mb=args.bucket_mb, ddp_bucket_mb=args.bucket_mb,
        events=not args.no_events, progress=None if args.quiet else _progress,
        **_overrides(args),
    )
    pred.meta["command"] = rerunnable_command(args)
    note = memory_note(args)
    if note:
        print(note, file=sys.stderr)
    if args.out:
        write_prediction(pred, args.out, force=args.force)
    if args.json:
        print(dumps_json(json_records(pred.summary), indent=2))
    else:
        m = pred.meta
        print(f"{m['workload']} on {m['device']} / {m['cluster']}, batch {args.batch_per_gpu} "
              f"per GPU, factor/inverse interval {args.factor_interval}/"
              f"{args.inverse_interval}")
        print(pred.table())
        if args.out:
            print(f"prediction written to {args.out}")
    return 0
