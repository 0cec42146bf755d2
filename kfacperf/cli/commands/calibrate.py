"""Fit a device model from measured traces, or generate a workload model from a torch workload.

  kfacperf calibrate traces/A traces/B --device-name local-cpu --out my-models/local-cpu.toml
  kfacperf calibrate traces/reference/p1 --out /tmp/local-cpu.toml     # a folder of traces
  kfacperf calibrate --workload resnet50 --out my-models/resnet50.toml
  kfacperf calibrate --workload resnet50 --out models/workloads/resnet50.toml --force  # the preset
  kfacperf calibrate --published spngd-fig5 spngd-table1 --device v100-spngd \\
      --fit forward.efficiency,backward.efficiency --out my-v100.toml
  kfacperf calibrate --workload my_model.py:build --workload-option width=256 --out my.toml

Trace mode fits, per stage kind, an efficiency against the roofline of the stage's analytic
FLOPs and bytes plus a fixed per-call overhead (see kfacperf.calibrate.device), prints the fit
and its error, and writes the device TOML (with the traces' median per-layer times as
[[measured]] entries unless --no-measured; K-FAC traces also give the factor steps' capture
overhead and the host work between stages, [capture_overhead] and [layer_host_us]).  Peaks
come from --base (a device preset or TOML); by default from the datasheet preset of the
traced GPU, or nominal per-thread CPU peaks.  Each trace's workload model comes from
--workload-model, else from the trace itself (a trace of your own model holds its
workload.toml), else from models/workloads.  A [[measured]] entry names its workload model
(its name with options, and the fingerprint of a model of your own): it prices that model
only, never another FILE.py:FUNC of the same name or an edited file.  A trace with a compute
stage longer than its step (corrupt times) is refused; a trace given twice counts once.

--workload (a registry name, FILE.py:FUNC or package.module:FUNC) writes the workload model
instead: the model is built on the meta device and one forward pass is walked there, so a
model larger than this machine's memory takes seconds and no memory.

Published mode (--published) fits named terms of the device preset --device (STAGE.FIELD or
inverse_method.METHOD.FIELD; fields efficiency, mem_efficiency, overhead_us, row_us) to the
calibration cases under published/ whose setup runs on that device, by least squares on the
log of predicted over measured; held-out cases are refused.

--out never replaces an existing file (a committed preset included) without --force; the
file is written whole or not at all.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from kfacperf.cli.commands import key_value

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.calibrate.device import DeviceCalibration
    from kfacperf.calibrate.published import Term
    from kfacperf.sim.models.cluster import ClusterModel
    from kfacperf.sim.models.device import DeviceModel


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("traces", nargs="*", metavar="TRACE",
                        help="trace directories to fit (a folder of traces: all of them; a "
                             "trace given twice counts once)")
    parser.add_argument("--device-name", default=None,
                        help="name of the fitted device model "
                             "(default: from --out, else 'calibrated')")
    parser.add_argument("--base", default=None,
                        help="device preset or TOML whose peak rates the efficiencies refer to")
    parser.add_argument("--workload-model", action="append", default=[], metavar="TOML",
                        help="workload model(s) to use for the traces (default: models/workloads)")
    parser.add_argument("--mode", choices=("roofline", "additive"), default=None,
                        help="how compute and memory time combine (default: the base device's; "
                             "additive for CPU traces without --base)")
    parser.add_argument("--no-measured", action="store_true",
                        help="do not store the traces' per-layer times in the device model")
    parser.add_argument("--workload", default=None,
                        help="generate the workload model of this torch workload instead (a "
                             "name, FILE.py:FUNC or package.module:FUNC)")
    parser.add_argument("--workload-option", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="an option of --workload (VALUE read as JSON, else as a string)")
    parser.add_argument("--published", nargs="+", metavar="CASE", default=None,
                        help="fit --device to these published calibration cases instead")
    parser.add_argument("--device", default=None,
                        help="with --published: the device preset to fit (as the cases name it)")
    parser.add_argument("--start-from", default=None, metavar="PRESET",
                        help="with --published: start from this device's stage terms (marked "
                             "assumed), keeping --device's peak rates")
    parser.add_argument("--cluster", default=None, metavar="PRESET",
                        help="with --published: the cluster preset whose cluster.TIER.FIELD terms "
                             "are fitted too (written to --cluster-out)")
    parser.add_argument("--cluster-out", default=None, metavar="TOML",
                        help="with --cluster: where to write the fitted cluster model "
                             "(needed whenever --fit names a cluster.* term)")
    parser.add_argument("--fit", default=None, metavar="TERMS",
                        help="with --published: comma-separated terms, e.g. "
                             "forward.efficiency,inverse_method.cholesky.row_us")
    parser.add_argument("--out", default=None, help="where to write the TOML (a new file)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite --out if it exists (a committed preset too)")
    parser.add_argument("--json", action="store_true", help="print the fit as JSON")


def _run_workload(args: argparse.Namespace) -> int:
    from kfacperf.errors import UserError
    from kfacperf.sim.models.presets import check_model_out
    from kfacperf.sim.models.workload_file import save_workload_model
    from kfacperf.workloads.describe import DescribeError
    from kfacperf.workloads.workload_model import build_workload_model

    if args.out:
        check_model_out(args.out, force=args.force)
    try:
        model = build_workload_model(args.workload, dict(args.workload_option))
    except DescribeError as exc:  # one line naming the workload, as kfacperf profile's
        raise UserError(f"--workload {args.workload}: {exc}") from None
    if args.out:
        save_workload_model(model, args.out)
    norms = (f" and {len(model.batchnorm)} BatchNorm layers (Fisher blocks with --bn-blocks)"
             if model.batchnorm else "")
    print(f"workload {model.name}: {len(model.layers)} K-FAC layers{norms}, "
          f"{model.kfac_params:,} K-FAC parameters + {model.other_params:,} others, "
          f"{model.fwd_flops_per_example / 1e6:,.1f} "
          f"MFLOP forward per example ({model.other_fwd_flops_per_example / 1e6:,.2f} outside "
          "K-FAC layers)" + (f"; wrote {args.out}" if args.out else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    from kfacperf.errors import UserError

    if args.published is not None or args.start_from:
        if args.traces or args.workload:
            raise UserError("give --published cases alone (no TRACE directories, no --workload)")
        return _run_published(args)
    if args.workload:
        if args.traces:
            raise UserError("give either TRACE directories or --workload, not both")
        return _run_workload(args)
    if not args.traces:
        raise UserError("give TRACE directories to fit a device model, or --workload NAME")
    return _run_traces(args)


def _run_traces(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kfacperf.calibrate.device import fit_device_model
    from kfacperf.safety import dumps_json
    from kfacperf.sim.models import load_device
    from kfacperf.sim.models.device import save_device_model
    from kfacperf.sim.models.presets import check_model_out
    from kfacperf.trace.missing import incomplete_note
    from kfacperf.trace.store import load_trace
    from kfacperf.validation import expand_trace_paths
    from kfacperf.validation.inputs import distinct_traces, trace_workload_models
    from kfacperf.validation.model import WorkloadFinder

    if args.out:
        check_model_out(args.out, force=args.force)
    traces = distinct_traces([load_trace(p) for p in expand_trace_paths(args.traces)],
                             "calibration")
    lacking = [note for note in (incomplete_note(tr, str(tr.path)) for tr in traces) if note]
    for note in lacking:  # on stderr: --json keeps stdout to the JSON document
        print(f"calibrate: warning: {note}", file=sys.stderr)

    workload_of = WorkloadFinder([*args.workload_model, *trace_workload_models(traces)])

    name = args.device_name or (Path(args.out).stem if args.out else "calibrated")
    base = load_device(args.base) if args.base else None
    cal = fit_device_model(traces, workloads=workload_of, base=base, name=name,
                           include_measured=not args.no_measured, mode=args.mode)
    for path in workload_of.unused(args.workload_model):
        print(f"calibrate: warning: --workload-model {path} matched none of the traces "
              f"(their workloads: {', '.join(sorted({str(t.run.get('workload')) for t in traces}))}"
              "); it was not used", file=sys.stderr)
    if args.out:
        save_device_model(cal.device, args.out)
    if args.json:
        print(dumps_json({
            "device": cal.device.name, "traces": list(cal.traces_used),
            "notes": [*lacking, *cal.notes],
            "fits": {k: f.__dict__ for k, f in cal.fits.items()}, "out": args.out,
        }, indent=1))
        return 0
    _print_calibration(cal)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _print_calibration(cal: DeviceCalibration) -> None:
    """The device's peaks, then each stage kind's fit and its error, then the notes."""
    d = cal.device
    print(f"device {d.name}: peaks fp32 {d.fp32_tflops:g} TFLOP/s, memory "
          f"{d.mem_bandwidth_GBps:g} GB/s, {d.mode} mode; fitted from "
          f"{len(cal.traces_used)} trace(s)")
    print(f"{'stage':<15} {'efficiency':>10} {'mem eff':>8} {'overhead_us':>11} {'samples':>7} "
          f"{'rms err':>8} {'max err':>8}")
    for kind, f in cal.fits.items():
        print(f"{kind:<15} {f.efficiency:10.4f} {f.mem_efficiency:8.4f} {f.overhead_us:11.2f} "
              f"{f.samples:7d} {f.rms_rel_error:8.1%} {f.max_rel_error:8.1%}"
              + (f"  ({f.note})" if f.note else ""))
    for note in cal.notes:
        print(f"note: {note}")


def _run_published(args: argparse.Namespace) -> int:
    import sys
    from dataclasses import replace

    from kfacperf.calibrate.published import (
        carry_terms,
        describe,
        fit_device_to_published,
        fitted_source,
        parse_terms,
    )
    from kfacperf.errors import UserError
    from kfacperf.published.cases import load_cases
    from kfacperf.sim.models import load_device
    from kfacperf.sim.models.device import save_device_model
    from kfacperf.sim.models.presets import check_model_out

    if not args.device:
        raise UserError("--published and --start-from need --device PRESET")
    if args.out:
        check_model_out(args.out, force=args.force)
    if args.cluster_out:
        check_model_out(args.cluster_out, force=args.force, flag="--cluster-out")
    device = load_device(args.device)
    if args.start_from:
        device = carry_terms(device, load_device(args.start_from))
    if not args.published:  # carry the terms over, nothing to fit them to
        return _write_carried(args, device)
    if not args.fit:
        raise UserError("--published needs --fit TERM[,TERM...]")
    terms = parse_terms(args.fit)
    cluster = _cluster_to_fit(args, terms)  # before the cases: refuse a fit kept nowhere
    cases = load_cases(args.published)
    fit = fit_device_to_published(cases, device, args.device, terms, cluster=cluster,
                                  cluster_preset=args.cluster or "",
                                  progress=lambda m: print(m, file=sys.stderr))
    command = _published_command(args, with_cluster=cluster is not None)
    fitted = replace(fit.device, name=args.device_name or fit.device.name,
                     source=fitted_source(fit, cases, device.source, command))
    for line in describe(fit):
        print(line)
    if args.out:
        save_device_model(fitted, args.out)
        print(f"wrote {args.out}")
    if fit.cluster is not None and args.cluster_out:
        _save_fitted_cluster(args, fit.cluster, terms, command)
    return 0


def _write_carried(args: argparse.Namespace, device: DeviceModel) -> int:
    """--start-from without --published: write ``device`` (its terms carried over) to --out."""
    from dataclasses import replace

    from kfacperf.errors import UserError
    from kfacperf.sim.models.device import save_device_model

    if args.fit:
        raise UserError("--fit needs --published cases to fit to")
    if not args.out:  # nothing fitted, nothing written: the command would do nothing
        raise UserError("--start-from without --published writes the device with the terms "
                        "carried over: give --out FILE.toml (or --published CASE ... --fit "
                        "TERMS to fit them)")
    save_device_model(replace(device, name=args.device_name or device.name), args.out)
    print(f"wrote {args.out}")
    return 0


def _cluster_to_fit(args: argparse.Namespace, terms: list[Term]) -> ClusterModel | None:
    """The --cluster preset when a ``cluster.*`` term is fitted, else None."""
    from kfacperf.errors import UserError

    if not any(t.table == "cluster" for t in terms):
        return None
    if not args.cluster:
        raise UserError("cluster.* terms need --cluster PRESET (and --cluster-out TOML)")
    if not args.cluster_out:
        labels = ", ".join(t.label for t in terms if t.table == "cluster")
        raise UserError(f"--fit {labels} fits the cluster model, which only --cluster-out "
                        "writes: add --cluster-out FILE (a new .toml)")
    from kfacperf.sim.models import load_cluster

    return load_cluster(args.cluster)


def _published_command(args: argparse.Namespace, *, with_cluster: bool) -> str:
    """The command line that reproduces the fit, recorded in the fitted models' source."""
    return ("kfacperf calibrate --published " + " ".join(args.published)
            + f" --device {args.device}"
            + (f" --start-from {args.start_from}" if args.start_from else "")
            + (f" --cluster {args.cluster}" if with_cluster else "")
            + f" --fit {args.fit}")


def _save_fitted_cluster(args: argparse.Namespace, cluster: ClusterModel, terms: list[Term],
                         command: str) -> None:
    """Write the fitted ``cluster`` to --cluster-out, its source noting the fit."""
    from dataclasses import replace

    from kfacperf.calibrate.published import without_fit_notes
    from kfacperf.sim.models.cluster import save_cluster_model

    labels = ", ".join(t.label for t in terms if t.table == "cluster")
    note = f"{labels} fitted to published cases {', '.join(args.published)} by `{command}`"
    save_cluster_model(replace(cluster, source=f"{without_fit_notes(cluster.source)}; {note}"),
                       args.cluster_out)
    print(f"wrote {args.cluster_out}")
