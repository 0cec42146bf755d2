"""``run_demo``: the whole pipeline on this machine.

1. profile SGD and each K-FAC strategy with 1 process and with 2 (``predict_nprocs``)
   processes, one torch thread per rank, on the CPU (gloo);
2. ``commbench``: measure collectives with 2 ranks and fit a cluster model of this machine;
3. calibrate a device model from the 1-process traces only;
4. predict every local run from that calibration (the 1-process runs are its own data, the
   multi-process runs are held out) and compare with what was measured;
5. simulate ``scale_workload`` (ResNet-50) on cluster presets with their datasheet devices,
   up to 4,096 GPUs, for sgd, spngd and kaisa (plus bandwidth what-ifs on the first);
6. plan ``scale_workload`` on one of them: the fastest SGD and K-FAC configuration per GPU
   count by time to a target quality (:func:`kfacperf.plan.plan`);
7. write one HTML page with the traces, the predictions, the held-out accuracy and the plan.

Everything goes under ``config.out``: ``index.html``, ``traces/``, ``models/``,
``predictions/``, ``logs/`` (each phase's output), ``demo.json`` (the headline numbers),
``validation.json`` (held-out runs, readable by ``kfacperf report --validation``) and
``plan.json`` (the plan, readable by ``kfacperf report --plan``).
"""
from __future__ import annotations

import json
import os
import shlex
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from kfacperf import vocab as S
from kfacperf.pipeline.config import DemoConfig, DemoPaths
from kfacperf.pipeline.headline import (
    DemoResult,
    held_out_headlines,
    run_headlines,
    scale_headlines,
)
from kfacperf.pipeline.phases import DemoStepFailed, PhaseRunner
from kfacperf.pipeline.scale_phases import plan_on_cluster, simulate_all
from kfacperf.safety import atomic_write_text, dumps_json
from kfacperf.workloads import reference as workload_ref

DEMO_ENTRIES = ("index.html", "traces", "models", "predictions", "logs", "demo.json",
                "validation.json", "plan.json")
"""What the demo writes into its output directory: an earlier demo's files are replaced."""


def check_out(root: Path, *, force: bool = False) -> None:
    """Refuse an output directory that is, or lies inside, the committed ``models/``, and,
    without ``force``, one holding anything but an earlier demo's files."""
    from kfacperf.safety import check_output_dir
    from kfacperf.sim.models.presets import models_dir

    committed = models_dir().resolve()
    target = root.resolve()
    if target == committed or committed in target.parents:
        raise ValueError(f"demo: --out {root} is inside the committed models ({committed}); "
                         "choose another directory")
    if target.exists() and not target.is_dir():
        raise ValueError(f"demo: --out {root} exists and is not a directory")
    if target.is_dir() and all(c.name in DEMO_ENTRIES for c in target.iterdir()):
        return  # new, empty, or an earlier demo: the demo replaces its own files
    check_output_dir(root, force=force)


def _profile_command(config: DemoConfig, strategy: str, nproc: int, out: Path) -> str:
    """The ``kfacperf profile`` command equivalent to one demo run (stored in run.json)."""
    args = ["kfacperf", "profile", "--workload", config.workload]
    for k, v in config.workload_options.items():
        args += ["--workload-option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    args += ["--optimizer", S.optimizer_of(strategy), "--strategy", strategy,
             "--nproc", str(nproc), "--steps", str(config.steps), "--warmup",
             str(config.warmup), "--threads-per-rank", "1", "--device", "cpu"]
    if config.batch_size is not None:
        args += ["--batch-size", str(config.batch_size)]
    return " ".join(shlex.quote(a) for a in args + ["--out", str(out)]) + "  # run by kfacperf demo"


def _profile(config: DemoConfig, paths: DemoPaths, strategy: str, nproc: int) -> Any:
    from kfacperf.runtime.config import ProfileConfig
    from kfacperf.runtime.runner import profile

    out = paths.trace(config.workload, strategy, nproc)
    cfg = ProfileConfig(
        workload=config.workload, out=str(out),
        optimizer=S.optimizer_of(strategy), strategy=strategy,
        workload_options=dict(config.workload_options), steps=config.steps,
        warmup=config.warmup, batch_size=config.batch_size, nproc=nproc, threads_per_rank=1,
        timeout_s=config.timeout_s, device="cpu",
        command=_profile_command(config, strategy, nproc, out),
    )
    outcome = profile(cfg, force=True)
    if not outcome.ok or outcome.trace is None or outcome.interrupted:
        # interrupted: Ctrl-C or SIGTERM stops the demo even when the trace was complete
        raise DemoStepFailed(outcome.message or f"the profile of {out} did not complete")
    return outcome.trace


def _profiled(config: DemoConfig, paths: DemoPaths, strategy: str, nproc: int
              ) -> tuple[Any, float]:
    """A profile run and its measured step time (the trace summary's)."""
    from kfacperf.trace.summary import summarize

    trace = _profile(config, paths, strategy, nproc)
    return trace, summarize(trace).step_us


def _commbench(config: DemoConfig, paths: DemoPaths) -> Any:
    from kfacperf.bench import commbench as cb
    from kfacperf.bench.config import CommbenchConfig
    from kfacperf.calibrate import cluster as cbf
    from kfacperf.sim.models.cluster import save_cluster_model

    cbc = CommbenchConfig(
        world_sizes=tuple(sorted(set(config.predict_nprocs))), sizes=config.commbench_sizes,
        reps=config.commbench_reps, warmup=config.commbench_warmup, backend="gloo",
        timeout_s=config.timeout_s, contention=True,
    )
    result = cb.run_commbench(cbc, progress=lambda m: print(m, flush=True))
    model, _ = cbf.fit_cluster(result, name="local-cpu")
    save_cluster_model(model, paths.cluster_model())
    atomic_write_text(paths.cluster_model().parent / "commbench.json",
                      dumps_json(result.to_dict(), indent=1) + "\n")
    return model


def _workload_models(config: DemoConfig, paths: DemoPaths) -> Path:
    """A folder to search for the profiled workload's simulator model: a committed model is
    used when one matches the workload's options, else one is generated into it."""
    from kfacperf.sim.models import save_workload_model

    folder = paths.workload_models()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _workload_model(config, folder)
    except ValueError:
        from kfacperf.workloads.workload_model import build_workload_model

        model = build_workload_model(config.workload, dict(config.workload_options))
        save_workload_model(model, folder / f"{workload_ref.label(config.workload)}.toml")
    return folder


def _workload_model(config: DemoConfig, folder: Path) -> Any:
    """The workload model of the profiled workload, among ``folder`` and the presets (a
    factory reference's must have been made from the same file)."""
    from kfacperf.sim.models import workload_for_run

    fingerprint = ""
    if workload_ref.is_reference(config.workload):
        from kfacperf.workloads.user import factory_fingerprint

        fingerprint = factory_fingerprint(config.workload)
    return workload_for_run(config.workload, dict(config.workload_options), search=[folder],
                            fingerprint=fingerprint)


def _calibrate(config: DemoConfig, paths: DemoPaths, traces: list[Any], cluster: Any) -> Any:
    """Fit the device model to the 1-process traces only (kfacperf.validation.calibrate)."""
    from kfacperf.sim.models.device import save_device_model
    from kfacperf.validation import calibrate

    folder = _workload_models(config, paths)
    cal = calibrate(traces, cluster=cluster, workload_search=[str(folder)],
                    device_name="local-cpu")
    save_device_model(cal.device, paths.device_model())
    return cal


def _predict(config: DemoConfig, paths: DemoPaths, calibration_traces: list[Any],
             held_out: list[Any], cal: Any) -> tuple[Any, Any]:
    """Predict the held-out runs from the calibration runs (:func:`kfacperf.validation.validate`,
    which refits on them alone), and simulate every local run's setting for the report."""
    from kfacperf.sim.prediction import write_prediction
    from kfacperf.sim.sweep import simulate
    from kfacperf.validation import validate

    folder = paths.workload_models()
    result = validate(calibration_traces, held_out, cluster=cal.cluster,
                      workload_search=[str(folder)], device_name="local-cpu")
    run = calibration_traces[-1].run  # a K-FAC run: its intervals and options
    workload = _workload_model(config, folder)
    cap = float(run.get("bucket_cap_mb") or 25.0)
    pred = simulate(
        workload, cal.device, cal.cluster, list(config.profiled_strategies),
        gpus=list(config.nprocs), batch_per_gpu=int(run["batch_per_rank"]),
        factor_interval=int(run["factor_interval"]), inverse_interval=int(run["inverse_interval"]),
        grad_worker_fraction=float(run.get("grad_worker_fraction") or 1.0),
        factor_bucket_mb=cap, ddp_bucket_mb=cap,
        inverse_method=str(run.get("inverse_method") or "eigen"),
        comm_dtype=str(run.get("comm_dtype") or "fp32"),
        symmetric_factors=bool(run.get("symmetric", False)),
        threads_per_rank=int(run.get("threads_per_rank") or 1),
    )
    pred.meta["workload"] = config.workload
    pred.meta["models"] = {"workload": workload.name, "device": str(paths.device_model()),
                           "cluster": str(paths.cluster_model())}
    pred.meta["command"] = "kfacperf demo (local runs predicted from the 1-process calibration)"
    write_prediction(pred, paths.local_prediction(config.workload), force=True)
    return result, pred


def _load_average() -> tuple[float, ...] | None:
    try:
        return tuple(os.getloadavg())
    except (AttributeError, OSError):  # pragma: no cover - not on this platform
        return None


COMMITTED_TRACES = Path(__file__).resolve().parents[2] / "traces"
"""The project's measured traces: the GPU validations committed there (traces/h200/...) go
into the demo's accuracy section beside this machine's."""


def _accuracy_table(runs: Any) -> Any:
    """The held-out runs for the report's accuracy section, with readable extra columns."""
    import math

    table = runs[["run", "measured_step_us", "predicted_step_us", "error_pct"]].copy()
    table["strategy"] = runs["strategy"]
    table["ranks"] = runs["world_size"]
    table["worst stage (>5% of the step)"] = [
        f"{st} {err:+.1f}%" if st and math.isfinite(err) else "-"
        for st, err in zip(runs["worst_stage"], runs["worst_stage_error_pct"].astype(float))]
    return table


def _check_inputs(config: DemoConfig) -> Any:
    """Load every model and preset the demo names, so a typo fails before minutes of
    profiling rather than after; returns the profiled workload."""
    from kfacperf.sim.models import load_cluster, load_device, load_workload
    from kfacperf.workloads import get_workload

    workload_obj = get_workload(config.workload, **dict(config.workload_options))
    load_workload(config.scale_workload)
    for t in config.clusters + ((config.plan,) if config.plan is not None else ()):
        load_cluster(t.cluster)
        load_device(t.device)
    if config.plan is not None:
        from kfacperf.plan import load_convergence

        for name in config.plan_convergence:
            load_convergence(name)
    return workload_obj


RunKey = tuple[str, int]
"""A profiled run: (strategy, processes)."""


def _profile_all(runner: PhaseRunner, config: DemoConfig, paths: DemoPaths,
                 runs: list[RunKey]
                 ) -> tuple[dict[RunKey, Any], dict[RunKey, tuple[str, str, float]]]:
    """Profile every (strategy, processes) pair: the traces, and per pair (trace name, path,
    measured step in µs)."""
    traces: dict[RunKey, Any] = {}
    measured: dict[RunKey, tuple[str, str, float]] = {}
    for strategy, nproc in runs:
        name = f"profile {strategy}, {nproc} process{'es' if nproc > 1 else ''}"
        trace, step_us = runner.run(
            name, partial(_profiled, config, paths, strategy, nproc),
            note=lambda r: f"step {r[1] / 1e3:,.1f} ms")
        traces[(strategy, nproc)] = trace
        measured[(strategy, nproc)] = (Path(trace.path).name, str(trace.path), step_us)
    return traces, measured


def _report(config: DemoConfig, paths: DemoPaths, traces: dict[RunKey, Any],
            predictions: list[tuple[Path, Any]], validation: Any, planned: Any) -> Path:
    """The demo's page: its traces and predictions, this machine's held-out accuracy beside
    the committed GPU validations, and the plan."""
    from kfacperf.report.build import build_report
    from kfacperf.report.inputs import committed_validations

    title = (f"kfacperf demo: {config.workload} measured and predicted here, "
             f"{config.scale_workload} on " + ", ".join(t.cluster for t in config.clusters))
    return build_report([Path(t.path) for t in traces.values()],
                        [paths.local_prediction(config.workload)]
                        + [p for p, _ in predictions],
                        paths.report,
                        {"this machine: held-out runs": _accuracy_table(validation.runs),
                         **committed_validations(COMMITTED_TRACES)},
                        title=title, plan=planned)


def run_demo(config: DemoConfig, *, stream: TextIO | None = None,
             verbose: bool = False, force: bool = False) -> DemoResult:
    """Run the pipeline described in the module docstring; progress lines go to ``stream``.
    The output directory must be new, empty or an earlier demo's (whose files are replaced);
    ``force`` lets it hold other files too (they are left alone).

    Raises :class:`ValueError` for bad settings (before anything runs) and
    :class:`~kfacperf.pipeline.phases.DemoPhaseError` naming the phase that failed (files of
    the finished phases are kept).
    """
    paths = config.paths
    check_out(paths.root, force=force)
    workload_obj = _check_inputs(config)
    load_avg = _load_average()
    for d in (paths.traces, paths.logs, paths.predictions, paths.models):
        d.mkdir(parents=True, exist_ok=True)

    runs = [(s, n) for n in config.nprocs for s in config.profiled_strategies]
    total = len(runs) + 4 + len(config.clusters) + (config.plan is not None)
    runner = PhaseRunner(total=total, log_dir=paths.logs, stream=stream, verbose=verbose)
    batch = config.batch_size or workload_obj.default_batch_size
    steps = f"{config.steps} step{'s' if config.steps != 1 else ''}"
    runner.say(f"kfacperf demo: {config.workload}, batch {batch} per rank, {steps} "
               f"(+{config.warmup} warm-up) per run; files in {paths.root}"
               + (f"; load average {load_avg[0]:.2f}" if load_avg else ""))
    traces, measured = _profile_all(runner, config, paths, runs)

    worlds = ", ".join(map(str, sorted(set(config.predict_nprocs))))
    cluster = runner.run(f"commbench (gloo, {worlds} ranks)", lambda: _commbench(config, paths),
                         note=lambda c: f"-> {paths.cluster_model()}")
    single = [traces[(s, 1)] for s in config.profiled_strategies]
    held = [traces[(s, n)] for s, n in runs if n != 1]
    cal = runner.run(
        "calibrate device (1-process traces)",
        lambda: _calibrate(config, paths, single, cluster),
        note=lambda c: "fit rms error " + ", ".join(
            f"{k} {f.rms_rel_error:.0%}" for k, f in c.fit.fits.items()))
    validation, _ = runner.run(
        f"predict the {worlds}-process runs",
        lambda: _predict(config, paths, single, held, cal),
        note=lambda r: f"|error| median {r[0].median_abs_error_pct:.1f}%, worst "
                       f"{r[0].worst_abs_error_pct:.1f}%")
    atomic_write_text(paths.validation, dumps_json(validation.to_dict(), indent=1) + "\n")
    names = {Path(t.path).name: key for key, t in traces.items()}
    held_rows = held_out_headlines(validation.runs, {n: k[0] for n, k in names.items()},
                                   {n: k[1] for n, k in names.items()})

    scale_preds, whatifs = simulate_all(runner, config, paths)
    planned = None
    if config.plan is not None:
        planned = runner.run(
            f"plan {config.scale_workload} on {config.plan.cluster}",
            lambda: plan_on_cluster(config, paths),
            note=lambda r: f"{r.stats['configurations']:,} configurations at "
                           f"{len(config.plan_gpus)} GPU counts -> {paths.plan}")

    page = runner.run(
        "report", lambda: _report(config, paths, traces, scale_preds + whatifs, validation,
                                  planned),
        note=lambda p: f"{p} ({p.stat().st_size / 1e6:.1f} MB)")
    scale = scale_headlines([(str(p), pred.meta, pred.summary) for p, pred in scale_preds])
    base_run = traces[(S.SGD, 1)].run
    kfac_run = traces[(config.strategies[0], 1)].run
    result = DemoResult(
        report=page, root=paths.root, workload=config.workload,
        batch_per_rank=int(base_run["batch_per_rank"]),
        intervals=(int(kfac_run["factor_interval"]), int(kfac_run["inverse_interval"])),
        steps=config.steps, runs=run_headlines(measured), held_out=held_rows, scale=scale,
        phases=tuple(runner.done), wall_s=runner.elapsed(), load_average=load_avg,
        plan=planned, plan_path=paths.plan if planned is not None else None,
    )
    atomic_write_text(paths.results, dumps_json(result.to_dict(), indent=1) + "\n")
    return result
