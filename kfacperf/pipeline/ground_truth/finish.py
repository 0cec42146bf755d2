"""After the ground-truth run: its outputs into the project, checked, calibrated, validated.

:func:`finish` takes what a run handed back (``ground-truth.tar.gz``, or its output folder)
and, in one go, does what ``docs/gpu-ground-truth.md`` lists under "Afterwards":

1. checks every trace it ran (:mod:`~kfacperf.pipeline.ground_truth.checks`: the clock,
   telemetry of power, clocks, memory and utilisation, the compute stages adding up to the
   step), into ``checks.json``;
2. copies the traces into ``INTO/PRECISION/NAME/`` and the run's other small outputs
   (kernel timings, timer overhead, summary, environment, versions, ...) into ``INTO/``;
3. per precision, calibrates a device model on the calibration-size runs only (batch 32 and
   128 per GPU) and predicts the validation-size runs (64 and 256), exactly as
   ``kfacperf validate`` does: ``INTO/DEVICE-PRECISION.toml`` (the fitted model) and
   ``INTO/validation-PRECISION.json`` (for ``kfacperf report --validation``);
4. fits the eigendecomposition's terms to the kernel timings and prices the inverse step
   of every run whose measured steps invert with them, beside what the run measured
   (:mod:`~kfacperf.pipeline.ground_truth.inverse_check`): ``INTO/kernel-inverse.json``;
5. folds the fitted terms (bf16's where it validated) and the Cholesky inverse's terms from
   the kernel timings into the traced GPU's preset
   (:mod:`~kfacperf.pipeline.ground_truth.preset`): ``INTO/DEVICE-preset.toml``, the
   proposed successor of ``models/devices/DEVICE.toml``;
6. writes what it printed into ``INTO/finish.txt`` and the validation per precision as a
   Markdown table, the shape of the README's, into ``INTO/accuracy.md``.

Which runs calibrate and which are held out is what the run's ``summary.json`` says of each
(its plan's role), never chosen here.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from kfacperf.bench.kernels.records import OUTPUT_FILE as KERNELS_FILE
from kfacperf.errors import UserError
from kfacperf.pipeline.ground_truth.archive import ARCHIVE_NAME, unpack_salvaging
from kfacperf.pipeline.ground_truth.inverse_check import kernel_inverse_check
from kfacperf.pipeline.ground_truth.landed import Finished
from kfacperf.pipeline.ground_truth.landing import (
    SIDE_FILES,
    SIDE_FOLDERS,
    file_stats,
    land_incomplete,
    land_traces,
    left_from_before,
    say_side_outputs,
)
from kfacperf.pipeline.ground_truth.plan import (
    CALIBRATION,
    VALIDATION,
)
from kfacperf.pipeline.ground_truth.preset_landing import fold_preset
from kfacperf.pipeline.ground_truth.report import STATUSES

GPU_CLUSTER = "dgx-h100-ndr"
CPU_CLUSTER = "local-cpu"
"""The cluster a one-process validation runs on: only its device matters (no collective)."""


def finish(source: Path, into: Path, *, force: bool = False, cluster: str | None = None,
           device_name: str | None = None, log: Callable[[str], None] = print) -> Finished:
    """Land the ground-truth run in ``source`` (its archive or output folder) in ``into``;
    see the module docstring.  ``cluster`` None: :data:`GPU_CLUSTER` for a GPU run,
    :data:`CPU_CLUSTER` for a dry run; ``device_name`` None: the preset of the traced GPU
    (``h200``), ``dry-run`` for a dry run."""
    from kfacperf.safety import check_output_dir

    source, into = Path(source), Path(into)
    if (source.is_dir() and not (source / "summary.json").is_file()
            and (source / ARCHIVE_NAME).is_file()):
        source = source / ARCHIVE_NAME  # the return folder, as the device call handed it back
    check_output_dir(into, force=force, flag="--into")
    if source.is_dir():
        return _finish_folder(source, into, cluster=cluster, device_name=device_name, log=log)
    if not source.is_file():
        raise UserError(f"{source}: no such archive or folder")
    with tempfile.TemporaryDirectory(prefix="kfacperf-ground-truth-") as tmp:
        try:
            _, damage = unpack_salvaging(source, Path(tmp))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return _finish_folder(Path(tmp), into, cluster=cluster, device_name=device_name,
                              log=log, shown=source, damage=damage)


def _finish_folder(folder: Path, into: Path, *, cluster: str | None,
                   device_name: str | None, log: Callable[[str], None],
                   shown: Path | None = None, damage: str = "") -> Finished:
    from kfacperf.safety import atomic_write_text, dumps_json, load_json_file

    summary_path, env_path = folder / "summary.json", folder / "env.json"
    if not summary_path.is_file():
        raise UserError(f"{shown or folder}: no summary.json (" + (
            f"the archive is {damage}" if damage else
            "the run finished no task; its ground-truth.log says why") + ")")
    try:
        summary = load_json_file(summary_path, what="summary")
        env = load_json_file(env_path, what="environment") if env_path.is_file() else {}
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    if not isinstance(summary, dict) or not isinstance(env, dict):
        raise UserError(f"{folder}: summary.json and env.json must each hold an object")
    gpu = ((env.get("settings") or {}).get("device") or "cuda") == "cuda"
    done = Finished(into=into, gpu=gpu)

    def say(line: str) -> None:
        done.lines.append(line)
        log(line)

    before = file_stats(into)
    tasks = [t for t in summary.get("tasks") or [] if isinstance(t, dict)]
    say(f"ground truth from {shown or folder}: {len(tasks)} task(s), "
        + ", ".join(f"{sum(t.get('status') == s for t in tasks)} {s}" for s in STATUSES)
        + ("" if summary.get("finished") else
           f"; not reached: {', '.join(map(str, summary.get('not_reached') or [])) or '?'}"))
    if damage:
        done.missing.append(f"the archive is {damage}")
        say(f"MISSING: the archive is {damage}")
    for t in tasks:
        if t.get("status") != "ok":
            say(f"{t.get('name')}: {t.get('status')} ({t.get('detail') or 'no reason given'})")
    into.mkdir(parents=True, exist_ok=True)
    done.traces = land_traces(folder, into, tasks, gpu=gpu, say=say, missing=done.missing)
    land_incomplete(folder, into, tasks, say)
    for name in SIDE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, into / name)
    if (folder / "logs" / "errors.log").is_file():
        shutil.copyfile(folder / "logs" / "errors.log", into / "errors.log")
    for name in SIDE_FOLDERS:
        if (folder / name).is_dir():
            shutil.copytree(folder / name, into / name, dirs_exist_ok=True)
    say_side_outputs(folder, tasks, say, done.missing)
    atomic_write_text(into / "checks.json", dumps_json(
        {t.name: {**t.checks, "problems": t.problems} for t in done.traces}, indent=1) + "\n")
    _validate_each_precision(done, cluster=cluster or (GPU_CLUSTER if gpu else CPU_CLUSTER),
                             device_name=device_name or _device_name(done),
                             say=say)
    if done.validations:
        atomic_write_text(into / "accuracy.md", accuracy_markdown(done) + "\n")
    say("")
    try:
        inverse = kernel_inverse_check(into / KERNELS_FILE,
                                       [t.path for t in done.traces if t.usable], say)
    except (ValueError, OSError) as exc:  # a cross-check: never the end of the landing
        inverse = None
        say(f"inverse from kernel timings: not compared ({exc})")
    if inverse is None and not (into / KERNELS_FILE).is_file():
        say("inverse from kernel timings: not compared (no kernels.json)")
    if inverse is not None:
        atomic_write_text(into / "kernel-inverse.json", dumps_json(inverse, indent=1) + "\n")
    say("")
    fold_preset(done, device_name or _device_name(done), say)
    left = left_from_before(into, before)
    if left:
        say("")
        say(f"left from before in {into} (not rewritten by this landing; remove what does not "
            f"belong to this run): {', '.join(left[:20])}"
            + (f" and {len(left) - 20} more" if len(left) > 20 else ""))
    if done.missing:
        say("")
        say("MISSING (the landing is incomplete): " + "; ".join(done.missing))
    atomic_write_text(into / "finish.txt", "\n".join(done.lines) + "\n")
    return done


def accuracy_markdown(done: Finished) -> str:
    """The validation per precision as a Markdown table, the shape of the README's accuracy
    tables (what the README's GPU rows are taken from)."""
    lines = ["| precision | held-out runs | median \\|error\\| | worst | worst stage "
             "(>5% of the step) | targets |", "|---|---|---|---|---|---|"]
    for precision, result in done.validations.items():
        checked = result.checked_stages()
        stage = "-"
        if len(checked):
            worst = checked.loc[checked["error_pct"].abs().idxmax()]
            stage = f"{worst['stage']} {worst['error_pct']:+.1f} % ({worst['run']})"
        misses = result.target_misses()
        lines.append(f"| {precision} | {len(result.runs)} | "
                     f"{result.median_abs_error_pct:.1f} % | {result.worst_abs_error_pct:.1f} % "
                     f"| {stage} | "
                     + ("met" if not misses else "missed: " + "; ".join(misses)).replace(
                         "|", "\\|") + " |")
    return "\n".join(lines)


def _device_name(done: Finished) -> str:
    """The preset the traced GPU maps to (``h200``; ``h100-sxm5`` where the run landed on an
    H100), ``dry-run`` for a CPU's outputs."""
    from kfacperf.calibrate.device import gpu_preset_for
    from kfacperf.trace.store import load_trace

    if not done.gpu or not done.traces:
        return "dry-run"
    preset, other_part = gpu_preset_for(load_trace(done.traces[0].path).run)
    return "gpu" if preset is None or other_part else preset  # never another part's preset


def _validate_each_precision(done: Finished, *, cluster: str, device_name: str,
                             say: Callable[[str], None]) -> None:
    from kfacperf.safety import atomic_write_text, dumps_json
    from kfacperf.sim.models.device import save_device_model
    from kfacperf.validation import validate
    from kfacperf.validation.text import text_table

    for precision in dict.fromkeys(t.precision for t in done.traces):
        mine = [t for t in done.traces if t.precision == precision and t.usable]
        cal = [t.path for t in mine if t.role == CALIBRATION]
        held = [t.path for t in mine if t.role == VALIDATION]
        say("")
        if not cal or not held:
            say(f"{precision}: not validated ({len(cal)} calibration and {len(held)} held-out "
                "run(s) landed; both are needed)")
            continue
        name = f"{device_name}-{precision}"
        try:
            result = validate(cal, held, cluster=cluster, device_name=name)
        except (ValueError, UserError) as exc:
            say(f"{precision}: validation failed: {exc}")
            continue
        done.validations[precision] = result
        device_file = save_device_model(result.calibration.device, done.into / f"{name}.toml")
        done.device_files[precision] = device_file
        atomic_write_text(done.into / f"validation-{precision}.json",
                          dumps_json(result.to_dict(), indent=1) + "\n")
        misses = result.target_misses()
        say(f"{precision}: calibrated on {len(cal)} run(s), predicting {len(held)} held-out "
            f"run(s) -> {device_file.name}, validation-{precision}.json")
        say(text_table(result))
        say(f"{precision}: targets " + ("met" if not misses else "missed: " + "; ".join(misses)))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kfacperf.pipeline.ground_truth.finish SOURCE --into DIR``; exit 0 when every
    precision met the validation targets and no trace has a problem, 1 otherwise, 2 on bad
    input."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m kfacperf.pipeline.ground_truth.finish",
        description="Land a ground-truth run (ground-truth.tar.gz as a device machine handed "
                    "it back, or the run's output folder): check its traces, copy them and its "
                    "other outputs into --into, calibrate a device model per precision on the "
                    "calibration-size runs and validate on the held-out ones.",
        epilog="example:\n  python -m kfacperf.pipeline.ground_truth.finish "
               "ground-truth.tar.gz --into traces/h200",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="ground-truth.tar.gz or the run's output folder")
    p.add_argument("--into", type=Path, required=True,
                   help="where the traces and results land (new or empty; else --force)")
    p.add_argument("--cluster", default=None,
                   help=f"cluster preset or TOML for the predictions (default {GPU_CLUSTER} "
                        f"for a GPU run, {CPU_CLUSTER} for a dry run)")
    p.add_argument("--device-name", default=None,
                   help="the fitted models are named DEVICE-PRECISION (default: the preset of "
                        "the traced GPU, h200 on an H200; dry-run for a dry run's outputs)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --into")
    args = p.parse_args(argv)
    try:
        done = finish(args.source, args.into, force=args.force, cluster=args.cluster,
                      device_name=args.device_name, log=lambda line: print(line, flush=True))
    except UserError as exc:
        print(f"finish: {exc}", file=sys.stderr)
        return 2
    problems = sum(bool(t.problems) for t in done.traces)
    print(f"\nwrote {done.into}: {len(done.traces)} trace(s), {problems} with a problem; "
          f"{len(done.validations)} precision(s) validated, targets "
          + ("met" if done.meets_targets else "not all met"))
    if done.missing:
        print(f"incomplete: {'; '.join(done.missing)}")
    return 0 if done.meets_targets and not problems and not done.missing else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
