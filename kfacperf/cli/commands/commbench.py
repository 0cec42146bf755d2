"""Measure collectives on this machine (gloo on CPU, NCCL on GPUs), fit alpha-beta per
collective and write a cluster model.

Example: kfacperf commbench --out my-models/local-cpu.toml
(the committed preset models/clusters/local-cpu.toml is replaced only with --force)

On a shared machine, take more probes during a session and fit from all of them:
  kfacperf commbench --raw cb.json                        # collectives + one probe
  kfacperf commbench --reps 5 --raw probe1.json           # later: one more, collectives too
  kfacperf commbench --contention-only --raw probe2.json  # or the compute probe alone
  kfacperf commbench --from-raw cb.json probe1.json probe2.json --out local-cpu.toml

Across nodes (the intra tier from groups within a node, the inter tier from groups spanning
nodes), the same command on every node, --node-rank 0 on one, 1 .. N-1 on the others:
  kfacperf commbench --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 --out two.toml
  kfacperf commbench --nnodes 2 --node-rank 1 --rdzv-endpoint node0:29400 --out two.toml
It starts torchrun (--nnodes, --nproc-per-node, a c10d rendezvous at --rdzv-endpoint).  Every
node must reach HOST:PORT (the first node to arrive on HOST serves it; port 29400 if left out)
and every other node on any TCP port (gloo and NCCL connect ranks on ports the system picks;
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME choose the interface).  Only --node-rank 0 writes --out
and --raw; the nodes must all start within --timeout seconds.

--out and --raw never replace an existing file (a committed preset included) without
--force; a cluster model needs all four collectives measured, or nothing is written and the
command fails.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.bench.config import CommbenchConfig
    from kfacperf.bench.results import CommbenchResult

# per collective, every alpha-beta fit tried (as dicts), the best first
_Fits = dict[str, list[dict[str, Any]]]


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    from kfacperf.bench.results import TIMINGS

    parser.add_argument("--world-sizes", type=_csv_ints, default=None,
                        help="process counts, one launch each (default: 2, 4, 8 up to the CPU "
                             "core count); across nodes: the sizes of the groups within a node "
                             "(default: 2, 4, .. up to --nproc-per-node)")
    parser.add_argument("--sizes", default=None,
                        help="message sizes (default 4KiB,256KiB,4MiB)")
    parser.add_argument("--ops", default=None,
                        help="collectives "
                             "(default: all_reduce,reduce_scatter,all_gather,broadcast)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per point")
    # the command line spells the TIMINGS with dashes (per-call), the library with underscores
    parser.add_argument("--timing", choices=("auto", *(t.replace("_", "-") for t in TIMINGS)),
                        default="auto",
                        help="per-call: time each call alone, as the optimizer issues it; "
                             "batched: back-to-back calls (nccl-tests style); auto: per-call "
                             "on gloo, batched on NCCL")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per point")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    parser.add_argument("--name", default="local-cpu", help="name of the cluster model")
    parser.add_argument("--out", default=None,
                        help="write the cluster model TOML here "
                             "(e.g. my-models/local-cpu.toml)")
    parser.add_argument("--raw", default=None, help="also write the measured points as JSON")
    parser.add_argument("--force", action="store_true",
                        help="overwrite --out / --raw if they exist")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="ranks per node in the model (default: 64 on CPU, the GPU count on "
                             "GPUs; across nodes, the ranks per node measured)")
    parser.add_argument("--no-contention", action="store_true",
                        help="skip measuring the compute slowdown of ranks sharing cores")
    parser.add_argument("--contention-only", action="store_true",
                        help="measure only the compute slowdown of ranks sharing cores (gloo), "
                             "no collectives; write it with --raw and merge it with --from-raw")
    parser.add_argument("--from-raw", nargs="+", metavar="RAW", default=None,
                        help="measure nothing: fit from these --raw files (slowdowns averaged "
                             "over every probe, collective times the mean over every repetition)")
    parser.add_argument("--json", action="store_true", help="print the fits as JSON")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds a collective (and, across nodes, the rendezvous) may take "
                             "before the run fails (default 120)")
    nodes = parser.add_argument_group(
        "across nodes", "run the same command on every node (torchrun with a c10d rendezvous)")
    nodes.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    nodes.add_argument("--node-rank", type=int, default=0,
                       help="this node's number, 0 .. nnodes-1; node 0 writes --out and --raw")
    nodes.add_argument("--nproc-per-node", type=int, default=None,
                       help="ranks per node (default: 1 on CPU, every GPU on GPUs)")
    nodes.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="the rendezvous, the same on every node (port 29400 if left out)")
    nodes.add_argument("--rdzv-id", default="kfacperf-commbench",
                       help="the job's name at the rendezvous (default kfacperf-commbench)")
    nodes.add_argument("--multi-node", choices=("flat", "hierarchical"), default=None,
                       help="how the model runs collectives on groups spanning nodes, and so "
                            "how the inter tier is fitted (default: flat on gloo, "
                            "hierarchical on NCCL)")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse conflicting flags and outputs that would be refused anyway, before measuring
    for minutes."""
    from kfacperf.safety import check_output_file
    from kfacperf.sim.models.presets import check_model_out

    if args.contention_only and (args.no_contention or args.from_raw):
        raise ValueError("--contention-only measures only contention: it cannot go with "
                         "--no-contention or --from-raw")
    if args.contention_only and args.out:
        raise ValueError("--contention-only measures no collectives, so it cannot write a "
                         "cluster model; write --raw and fit with --from-raw")
    if args.out and args.node_rank == 0:
        check_model_out(args.out, force=args.force)
    if args.raw and args.node_rank == 0:
        check_output_file(args.raw, force=args.force, flag="--raw")


def _config(args: argparse.Namespace) -> CommbenchConfig:
    from kfacperf.bench import results
    from kfacperf.bench.config import CommbenchConfig
    from kfacperf.sim.models.cluster import OPS

    sizes = (tuple(results.parse_size(s) for s in args.sizes.split(",") if s.strip())
             if args.sizes else results.DEFAULT_SIZES)
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip()) if args.ops else OPS
    if not 0 <= args.node_rank < max(1, args.nnodes):
        raise ValueError(f"--node-rank must be in 0 .. {max(1, args.nnodes) - 1} "
                         f"(--nnodes {args.nnodes}), got {args.node_rank}")
    if args.from_raw and args.nnodes > 1:
        raise ValueError("--from-raw measures nothing: it cannot go with --nnodes")
    if not args.from_raw and not args.contention_only:
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise ValueError(f"--ops: unknown collective(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(OPS)}")
        if len(set(sizes)) < 2:
            raise ValueError(f"--sizes: give at least 2 message sizes (got {args.sizes}): "
                             "one size cannot tell a collective's latency from its bandwidth")
        if args.out and set(ops) != set(OPS):
            raise ValueError(f"--out: a cluster model needs all four collectives "
                             f"({', '.join(OPS)}) and --ops measures only {', '.join(ops)}; "
                             "leave --ops out, or write the measurements with --raw alone")
    return CommbenchConfig(
        world_sizes=args.world_sizes or None, sizes=sizes, ops=ops,
        reps=args.reps, warmup=args.warmup, backend=args.backend, timeout_s=args.timeout,
        contention=not args.no_contention, collectives=not args.contention_only,
        timing=args.timing.replace("-", "_"), nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node, rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
    )


def _measure(args: argparse.Namespace, config: CommbenchConfig,
             log: Callable[[str], None]) -> CommbenchResult:
    """The points and probes: read from --from-raw files, else measured on this machine."""
    import time

    from kfacperf.bench import commbench as cb
    from kfacperf.bench import raw as commbench_raw
    from kfacperf.errors import UserError

    if args.from_raw:
        result = commbench_raw.merge_results(_distinct_raw(args.from_raw))
        if not result.points and not result.probes:
            raise UserError(f"--from-raw {' '.join(args.from_raw)}: no measurement in "
                            "the file(s) (no collective timed, no contention probe): nothing "
                            "to fit; measure with commbench --raw FILE first")
        log(f"commbench: read {len(set(map(_resolved, args.from_raw)))} file(s): "
            f"{len(result.points)} points, "
            + ", ".join(f"{w} ranks {n} probe(s)" for w, n in result.probes.items()))
        return result
    t0 = time.perf_counter()
    try:
        result = cb.run_commbench(config, progress=log)
    except RuntimeError as exc:  # the benchmark's processes failed or timed out
        raise UserError(str(exc)) from None
    log(f"commbench: measured {len(result.points)} points in {time.perf_counter() - t0:.1f} s")
    return result


def _resolved(path: str) -> str:
    from pathlib import Path

    return str(Path(path).resolve())


def _distinct_raw(paths: list[str]) -> list[CommbenchResult]:
    """The --from-raw files read, a file named twice once; two files of the same measurement
    (a copy) are an error: merged twice, one probe would count double."""
    from kfacperf.bench import raw as commbench_raw
    from kfacperf.safety import dumps_json

    seen: dict[str, str] = {}  # the measurement as JSON -> the file it was read from
    out = []
    given = {_resolved(p): p for p in reversed(paths)}  # each file by its first name
    for path in dict.fromkeys(given[_resolved(p)] for p in paths):
        result = commbench_raw.load_raw(path)
        key = dumps_json(result.to_dict())
        if key in seen:
            raise ValueError(f"--from-raw {seen[key]} and {path} hold the same measurement; "
                             "give only one of them")
        seen[key] = path
        out.append(result)
    return out


def _fit(args: argparse.Namespace, result: CommbenchResult, *, writes: bool,
         log: Callable[[str], None]) -> _Fits:
    """Fit every measured collective; with all four, write the cluster model to --out (when
    ``writes``), else refuse --out."""
    from kfacperf.calibrate import cluster as cbf
    from kfacperf.errors import UserError
    from kfacperf.sim.models.cluster import OPS, save_cluster_model

    ops = tuple(op for op in OPS if any(p.op == op for p in result.points))  # what was measured
    fits: _Fits = {}
    if set(ops) == set(OPS):
        model, tried = cbf.fit_cluster(result, name=args.name, gpus_per_node=args.gpus_per_node,
                                       multi_node=args.multi_node)
        fits = {op: [f.__dict__ for f in fs] for op, fs in tried.items()}
        if args.out and writes:
            save_cluster_model(model, args.out)
            log(f"commbench: wrote {args.out}")
        return fits
    for op in ops:
        _, op_tried = cbf.fit_points(result.points, op)
        fits[op] = [f.__dict__ for f in op_tried]
    if args.out:
        raise UserError(f"not writing --out {args.out}: a cluster model needs all four "
                        f"collectives ({', '.join(OPS)}), and "
                        + (f"only {', '.join(ops)} were measured" if ops else
                           "no collective was measured")
                        + ("" if not args.raw else f" (the measurements are in {args.raw})"))
    return fits


def _print_fits(fits: _Fits) -> None:
    """The fits as a table, a tier column only across nodes; ``*`` marks each tier's best."""
    tiers = any(f["tier"] != "intra" for fs in fits.values() for f in fs)  # across nodes
    if fits:
        print(f"{'collective':<15} " + (f"{'tier':<6} " if tiers else "")
              + f"{'algorithm':<17} {'alpha_us':>9} {'GB/s':>8} {'rms err':>8} {'max err':>8}")
    for op, fs in fits.items():
        best_of: set[str] = set()  # tiers whose best fit (the first) was printed
        for i, f in enumerate(fs):
            mark = " " if f["tier"] in best_of else "*"
            best_of.add(f["tier"])
            print(f"{op if i == 0 else '':<15} " + (f"{f['tier']:<6} " if tiers else "")
                  + f"{f['algorithm'] + mark:<17} {f['alpha_us']:9.2f} "
                  f"{f['bandwidth_GBps']:8.3f} {f['rms_rel_error']:8.1%} {f['max_rel_error']:8.1%}"
                  + (f"  ({f['note']})" if f.get("note") else ""))


def _print_slowdowns(result: CommbenchResult) -> None:
    if not result.slowdowns:
        return
    print("compute slowdown with ranks sharing cores: "
          + ", ".join(f"{k} ranks {v:.2f}x" + (f" (mean of {result.probes[k]} probes)"
                                              if result.probes.get(k, 1) > 1 else "")
                      for k, v in sorted(result.slowdowns.items())))
    if result.stragglers:
        print("straggler (slowest rank over the mean, per synchronised step): "
              + ", ".join(f"{k} ranks {v:.1%}" for k, v in sorted(result.stragglers.items())))
    if result.comm_slowdowns:
        print("collectives right after compute, over right after a barrier: "
              + ", ".join(f"{k} ranks {v:.2f}x"
                          for k, v in sorted(result.comm_slowdowns.items())))
    for world, per in sorted(result.stage_slowdowns.items()):
        print(f"  {world} ranks, per stage kind: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in per.items()))


def run(args: argparse.Namespace) -> int:
    import sys

    from kfacperf.safety import atomic_write_text, dumps_json

    _check_args(args)
    config = _config(args)
    writes = args.node_rank == 0  # across nodes, node 0 alone writes the files

    def log(message: str) -> None:  # progress to stderr when stdout carries the JSON
        print(message, file=sys.stderr if args.json else sys.stdout, flush=True)

    result = _measure(args, config, log)
    if args.raw and writes:
        atomic_write_text(args.raw, dumps_json(result.to_dict(), indent=1) + "\n")
    fits = _fit(args, result, writes=writes, log=log)
    if args.json:
        print(dumps_json({"fits": fits, "slowdowns": result.slowdowns,
                          "stage_slowdowns": result.stage_slowdowns,
                          "stragglers": result.stragglers,
                          "comm_slowdowns": result.comm_slowdowns}, indent=1))
        return 0
    _print_fits(fits)
    _print_slowdowns(result)
    if fits:
        print("(* = best fit, used in the model)")
    return 0
