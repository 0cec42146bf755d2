"""Run a workload with an optimizer and strategy on 1..N processes and write a trace.

  kfacperf profile --workload resnet20 --strategy spngd --nproc 2 --steps 20
  kfacperf profile --workload resnet20 --strategy spngd --bn-blocks unit --fisher mc
  kfacperf profile --workload my_model.py:build --workload-option width=256 --nproc 2
  kfacperf profile --workload mypackage.models:build --optimizer sgd --batch-size 64

Starts the ranks itself (pass --nnodes/--node-rank/--rdzv-endpoint and run the same command
on every node for a multi-node job, started through torchrun), or runs as one rank when
started under torchrun.  Writes TRACE_DIR/run.json + events.parquet (+ telemetry.parquet on
a GPU) and prints the per-stage summary.  --batch-size is per rank.

The second example is SP-NGD's 1mc + unitBN: BatchNorm layers as 2x2-per-channel Fisher
blocks, the statistics from one extra backward of sampled labels (a second ``backward`` row,
layer ``mc_fisher``, on factor steps).

Your own model: --workload FILE.py:FUNC or package.module:FUNC names a function that
FUNC(**options) (options from --workload-option) calls; it returns a kfacperf Workload, or
(model, make_batch) or (model, make_batch, loss_fn) with make_batch(batch_size, generator)
-> (inputs, targets); the loss is cross-entropy unless given.  The trace then holds the
model's workload model too (TRACE_DIR/workload.toml), for calibrate, validate and simulate.

Faults: a rank that fails, is killed, or is stopped for longer than --timeout stops the run
within seconds, with an error naming the rank; a rank that finishes no step within twice
--timeout (at most --timeout + 10 s) ends itself.  Ctrl-C or SIGTERM stops every rank.
Either way the trace keeps every finished step and is marked incomplete.  On one node the
ranks' rendezvous listens on the loopback interface only; a multi-node run's rendezvous
listens on the network (use a trusted one).  --out must be new or empty; --force replaces
the trace files in it.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from kfacperf import vocab
from kfacperf import vocab as S
from kfacperf.cli.commands import key_value

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.runtime.config import ProfileConfig


def _kl_clip(text: str) -> float | None:
    if text.lower() == "none":
        return None
    return float(text)


def configure(parser: argparse.ArgumentParser) -> None:
    from kfacperf.runtime.config import DEVICES
    from kfacperf.runtime.precision import DEFAULT_PRECISION
    from kfacperf.vocab import (
        COMM_DTYPES,
        COMPUTE_DTYPES,
        INVERSE_METHODS,
        OPTIMIZERS,
        PROFILE_STRATEGIES,
    )

    g = parser.add_argument_group("run")
    g.add_argument("--workload", required=True,
                   help="workload name (e.g. resnet20, mlp), or your own model as FILE.py:FUNC "
                        "or package.module:FUNC")
    g.add_argument("--workload-option", type=key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="workload option, e.g. image_size=64 (repeatable; "
                   "VALUE read as JSON, else as a string)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=S.KFAC,
                   help="(default: %(default)s)")
    g.add_argument("--strategy", choices=PROFILE_STRATEGIES, default=None,
                   help="K-FAC distribution strategy (default: spngd; sgd for --optimizer sgd)")
    g.add_argument("--nproc", type=int, default=1,
                   help="processes (ranks) on this node (default: %(default)s)")
    g.add_argument("--steps", type=int, default=30,
                   help="measured steps, after warm-up (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=5, help="warm-up steps (recorded, left out "
                   "of summaries; default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="examples per rank per step (default: the workload's: 128 for mlp and "
                        "resnet20/32, 32 for resnet50, bert-* and transformer, 8 for gpt2-xl; "
                        "for your own model, its Workload's, else 32)")
    g.add_argument("--out", default=None, help="trace directory (default: "
                   "traces/WORKLOAD-OPTIMIZER-STRATEGY-pNPROC)")
    g.add_argument("--force", action="store_true",
                   help="replace the trace in a non-empty --out (only trace files are removed)")
    g.add_argument("--threads-per-rank", type=int, default=1,
                   help="torch threads per rank (default: %(default)s)")
    g.add_argument("--isolate", action="store_true", help="synchronise around every stage "
                   "(and barrier every step) so each stage is measured alone")
    g.add_argument("--default-heap", action="store_true",
                   help="leave the C library's memory policy alone (by default glibc keeps "
                        "freed memory, so measured steps do not time page faults of memory "
                        "given back and taken again; see kfacperf.runtime.heap)")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a rank waits for a peer before the run fails with an error "
                        "naming the rank (a dead, stopped or hung rank); with 2 or more "
                        "processes a step must also finish within it plus min(it, 10 s) "
                        "(default: 60)")
    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA when available, else CPU (default: %(default)s)")
    g.add_argument("--precision", choices=COMPUTE_DTYPES, default=DEFAULT_PRECISION,
                   help="fp32: IEEE float32 (TF32 off on a GPU); tf32: float32 with TF32 "
                        "matmuls and convolutions; bf16: forward under bfloat16 autocast "
                        "(see kfacperf.runtime.precision; default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--telemetry-interval", type=float, default=0.1,
                   help="seconds between NVML samples (GPU only; default: %(default)s)")
    g.add_argument("--baseline", default=None, metavar="TRACE",
                   help="an SGD trace: also print the K-FAC overhead over it")
    k = parser.add_argument_group("optimizer")
    k.add_argument("--lr", type=float, default=0.1,
                   help="learning rate, >= 0 (default: %(default)s)")
    k.add_argument("--momentum", type=float, default=0.9, help="(default: %(default)s)")
    k.add_argument("--weight-decay", type=float, default=0.0, help="(default: %(default)s)")
    k.add_argument("--damping", type=float, default=1e-3,
                   help="K-FAC damping, > 0 (default: %(default)s)")
    k.add_argument("--factor-interval", type=int, default=1,
                   help="steps between factor updates (default: %(default)s)")
    k.add_argument("--inverse-interval", type=int, default=1,
                   help="steps between inverse updates, a multiple of --factor-interval "
                        "(default: %(default)s)")
    k.add_argument("--inverse-method", choices=INVERSE_METHODS, default="eigen",
                   help="(default: %(default)s)")
    k.add_argument("--factor-decay", type=float, default=0.95,
                   help="running-average weight of the old factors, in [0, 1) "
                        "(default: %(default)s)")
    k.add_argument("--kl-clip", type=_kl_clip, default=1e-3,
                   help="a float > 0, or none (default: %(default)s)")
    k.add_argument("--grad-worker-fraction", type=float, default=1.0,
                   help="KAISA f, in (0, 1] (default: %(default)s)")
    k.add_argument("--fused", action="store_true",
                   help="SP-NGD: one fused all-reduce (--strategy spngd only)")
    k.add_argument("--comm-dtype", choices=COMM_DTYPES, default="fp32",
                   help="(default: %(default)s)")
    k.add_argument("--symmetric", action="store_true", help="upper-triangle factor packing")
    k.add_argument("--bucket-cap-mb", type=float, default=25.0,
                   help="gradient and factor bucket size in MB, > 0 (default: %(default)s)")
    k.add_argument("--bn-blocks", choices=vocab.BN_BLOCKS, default=vocab.BN_NONE,
                   help="BatchNorm layers as Fisher blocks: none (left to SGD), unit (2x2 per "
                        "channel, SP-NGD's unitBN) or full (2Cx2C, fullBN)")
    k.add_argument("--fisher", choices=vocab.FISHER_TYPES, default=vocab.FISHER_EMP,
                   help="emp: statistics from the true labels' backward; mc: from one extra "
                        "backward of labels sampled from the model (SP-NGD's 1mc)")
    k.add_argument("--sequence-first", action="store_true",
                   help="the model's linear layers take [T, N, F] inputs (examples second, "
                        "e.g. nn.Transformer's default): K-FAC counts the examples there")
    m = parser.add_argument_group("multi-node (passed to torchrun)")
    m.add_argument("--nnodes", default="1")
    m.add_argument("--node-rank", type=int, default=0)
    m.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT")
    m.add_argument("--rdzv-id", default="kfacperf")


def build_config(args: argparse.Namespace) -> ProfileConfig:
    from kfacperf.runtime.config import ProfileConfig, command_line
    from kfacperf.workloads import reference as workload_ref

    strategy = args.strategy or S.default_strategy(args.optimizer)
    label = workload_ref.label(args.workload)
    out = (args.out if args.out is not None
           else f"traces/{label}-{args.optimizer}-{strategy}-p{args.nproc}")
    return ProfileConfig(
        workload=args.workload, out=out, optimizer=args.optimizer, strategy=args.strategy,
        workload_options=dict(args.workload_option), steps=args.steps, warmup=args.warmup,
        batch_size=args.batch_size, nproc=args.nproc, threads_per_rank=args.threads_per_rank,
        isolate=args.isolate, keep_heap=not args.default_heap, timeout_s=args.timeout,
        device=args.device, seed=args.seed,
        precision=args.precision,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        damping=args.damping, factor_interval=args.factor_interval,
        inverse_interval=args.inverse_interval, inverse_method=args.inverse_method,
        factor_decay=args.factor_decay, kl_clip=args.kl_clip,
        grad_worker_fraction=args.grad_worker_fraction, fused=args.fused,
        comm_dtype=args.comm_dtype, symmetric=args.symmetric, bucket_cap_mb=args.bucket_cap_mb,
        bn_blocks=args.bn_blocks, fisher=args.fisher, batch_first=not args.sequence_first,
        telemetry_interval_s=args.telemetry_interval, nnodes=str(args.nnodes),
        node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
        command=command_line(),
    )


def run(args: argparse.Namespace) -> int:
    from kfacperf.runtime.runner import cpu_oversubscription, profile
    from kfacperf.trace.store import load_trace
    from kfacperf.trace.summary import check_baseline, summarize

    config = build_config(args)
    crowded = cpu_oversubscription(config)
    if crowded:
        print(f"kfacperf profile: warning: {crowded}", file=sys.stderr)
    baseline = load_trace(args.baseline) if args.baseline else None
    if baseline is not None:  # before any process starts, as far as the flags tell
        from kfacperf.workloads import get_workload

        nodes = str(config.nnodes)
        batch = config.batch_size or get_workload(
            config.workload, **config.workload_options).default_batch_size
        check_baseline(baseline, {
            "workload": config.workload, "batch_per_rank": batch,
            "world_size": config.nproc * int(nodes) if nodes.isdigit() else None},
            what="--workload/--nproc/--batch-size")
    outcome = profile(config, force=args.force)
    if outcome.interrupted:
        print(f"kfacperf profile: {outcome.message}", file=sys.stderr)
        return outcome.exit_status
    if not outcome.ok:
        print(f"kfacperf profile: error: {outcome.message}", file=sys.stderr)
        return 1
    if outcome.message:
        print(f"kfacperf profile: warning: {outcome.message}", file=sys.stderr)
    if outcome.trace is None:  # a rank other than 0, or another node
        return 0
    print(f"\ntrace: {config.out}  ({config.resolved_strategy}, "
          f"{outcome.trace.run.get('world_size')}"
          f" rank(s), batch {outcome.trace.run.get('batch_per_rank')} per rank)")
    print(summarize(outcome.trace, baseline=baseline).table())
    return 0
