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

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfacperf import vocab as S
from kfacperf.bench.kernels.records import OUTPUT_FILE as KERNELS_FILE
from kfacperf.bench.overhead import OUTPUT_FILE as OVERHEAD_FILE
from kfacperf.errors import UserError
from kfacperf.pipeline.ground_truth.archive import ARCHIVE_NAME, unpack_salvaging
from kfacperf.pipeline.ground_truth.checks import check_problems, trace_checks
from kfacperf.pipeline.ground_truth.inverse_check import kernel_inverse_check
from kfacperf.pipeline.ground_truth.plan import (
    CALIBRATION,
    KERNELS,
    OVERHEAD,
    PROFILE,
    VALIDATION,
)
from kfacperf.pipeline.ground_truth.report import STATUSES

SIDE_FILES: tuple[str, ...] = (
    "command.txt", "nvidia-smi.txt", "versions.txt", "wheels.txt", "env.json", "plan.txt",
    "summary.txt", "summary.json", OVERHEAD_FILE, KERNELS_FILE, "kernels.txt",
    "files.txt", "ground-truth.log",
)
"""The run's outputs, beside its traces, that are kept with them (all small)."""

SIDE_FOLDERS: tuple[str, ...] = ("logs", "nsys")
"""The run's folders of small text kept with its traces: each run's own log (progress, the
per-stage summary or its traceback), the NVTX check's output."""

INCOMPLETE = "incomplete"
"""Where, under ``INTO``, a trace lands whose task failed or was not reached: the steps it
finished are kept (``INTO/incomplete/PRECISION/NAME``), never used to calibrate or validate."""

GPU_CLUSTER = "dgx-h100-ndr"
CPU_CLUSTER = "local-cpu"
"""The cluster a one-process validation runs on: only its device matters (no collective)."""


@dataclass(frozen=True, kw_only=True)
class TraceResult:
    """One profile run of the ground truth as it landed."""

    name: str
    precision: str
    role: str
    batch: int
    path: Path
    checks: dict[str, Any]
    problems: list[str]
    usable: bool = True
    """Whether its measured steps may calibrate or be predicted (False: the run did not
    complete, or it has no measured step)."""


@dataclass(kw_only=True)
class Finished:
    """What :func:`finish` did."""

    into: Path
    gpu: bool
    traces: list[TraceResult] = field(default_factory=list)
    validations: dict[str, Any] = field(default_factory=dict)  # precision -> ValidationResult
    device_files: dict[str, Path] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """What the run says it produced but did not come back whole (a cut archive, a trace
    missing or unreadable, an output file missing): each makes the landing incomplete."""

    @property
    def meets_targets(self) -> bool:
        """Every precision validated, each within the step and stage targets."""
        return bool(self.validations) and all(
            not v.target_misses() for v in self.validations.values())


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

    before = _file_stats(into)
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
    done.traces = _land_traces(folder, into, tasks, gpu=gpu, say=say, missing=done.missing)
    _land_incomplete(folder, into, tasks, say)
    for name in SIDE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, into / name)
    if (folder / "logs" / "errors.log").is_file():
        shutil.copyfile(folder / "logs" / "errors.log", into / "errors.log")
    for name in SIDE_FOLDERS:
        if (folder / name).is_dir():
            shutil.copytree(folder / name, into / name, dirs_exist_ok=True)
    _say_side_outputs(folder, tasks, say, done.missing)
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
    _fold_preset(done, device_name or _device_name(done), say)
    left = _left_from_before(into, before)
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


def _file_stats(into: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``into`` with what says whether it was rewritten since."""
    if not into.is_dir():
        return {}
    out = {}
    for p in into.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(into).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _left_from_before(into: Path, before: dict[str, tuple[int, int, int]]) -> list[str]:
    """The folders of files (a trace) or files that were in ``into`` before this landing and
    that it did not rewrite."""
    now = _file_stats(into)
    left = sorted(rel for rel, st in before.items() if now.get(rel) == st
                  and rel != "finish.txt")  # rewritten last
    shown: dict[str, None] = {}
    for rel in left:
        parts = rel.split("/")
        shown[rel if len(parts) == 1 else "/".join(parts[:-1]) + "/"] = None
    return list(shown)


def _say_side_outputs(folder: Path, tasks: Sequence[dict[str, Any]],
                      say: Callable[[str], None], missing: list[str]) -> None:
    """What came back of the timer overhead and the kernel timings, and what did not."""
    from kfacperf.safety import load_json_file

    for kind, file, what in ((OVERHEAD, OVERHEAD_FILE, "timer overhead"),
                             (KERNELS, KERNELS_FILE, "kernel timings")):
        task = next((t for t in tasks if t.get("kind") == kind), None)
        status = "not run" if task is None else str(task.get("status"))
        if not (folder / file).is_file():
            line = f"{what}: no {file}"
            if status == "ok":
                missing.append(f"{file} (its task says ok)")
                say(f"MISSING: {line} though its task says ok")
            else:
                say(f"{line} (task {status}"
                    + (f": {task.get('detail')}" if task and task.get("detail") else "") + ")")
            continue
        try:
            data = load_json_file(folder / file, what=what)
        except (ValueError, OSError) as exc:
            missing.append(f"{file} does not read ({exc})")
            say(f"MISSING: {what}: {file} does not read ({exc})")
            continue
        if kind == OVERHEAD:
            results = data.get("results") if isinstance(data, dict) else None
            for r in results if isinstance(results, list) else []:
                if isinstance(r, dict) and isinstance(r.get("overhead_median"), (int, float)):
                    say(f"timer overhead: {r.get('name')}: {100 * r['overhead_median']:+.2f}% "
                        + ("(meets <=1%)" if r.get("meets_target") else "(misses <=1%)"))
        elif isinstance(data, dict):
            counts = ", ".join(f"{len(data.get(g) or [])} {g}"
                               for g in ("eigh", "cholesky", "factors", "gemm"))
            say(f"kernel timings: {counts} record(s)")
            skipped = [k for k in data.get("skipped") or [] if isinstance(k, dict)]
            for k in skipped[:10]:
                say(f"kernel timings: skipped {k.get('measurement', '?')} {k.get('what', '')}: "
                    f"{k.get('reason', '?')}")
            if len(skipped) > 10:
                say(f"kernel timings: {len(skipped) - 10} more skipped (kernels.json)")


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


def _land_traces(folder: Path, into: Path, tasks: Sequence[dict[str, Any]], *, gpu: bool,
                 say: Callable[[str], None], missing: list[str]) -> list[TraceResult]:
    from kfacperf.trace.store import load_trace

    landed = []
    for task in tasks:
        run = task.get("run")
        if task.get("kind") != PROFILE or task.get("status") != "ok" or not isinstance(run, dict):
            continue
        name, precision = str(task["name"]), str(run.get("precision"))
        source = folder / "traces" / precision / name
        if not source.is_dir():
            missing.append(f"traces/{precision}/{name}")
            say(f"{name}: summary.json says it ran, but traces/{precision}/{name} is missing")
            continue
        try:  # checked where it came back: a trace that does not load never replaces one
            trace = load_trace(source)
            checks = trace_checks(trace)
        except (ValueError, OSError) as exc:
            missing.append(f"traces/{precision}/{name} (does not load)")
            say(f"{name}: not landed, its trace does not load: {exc}")
            continue
        problems = check_problems(checks, gpu=gpu)
        unusable = _unusable(trace)
        problems += unusable
        target = into / precision / name
        _replace_tree(source, target)
        landed.append(TraceResult(name=name, precision=precision, role=str(run.get("role")),
                                  batch=batch if isinstance(batch := run.get("batch"), int) else 0,
                                  path=target, checks=checks, problems=problems,
                                  usable=not unusable))
        cov = checks["coverage"]
        say(f"{name}: {checks['timing']}, {checks['telemetry_samples']} telemetry samples, "
            f"median gap {cov['median_gap_pct']:.1f}%, double counted "
            f"{cov['worst_double_pct']:.2f}%"
            + (f"  PROBLEM: {'; '.join(problems)}" if problems else ""))
    return landed


def _unusable(trace: Any) -> list[str]:
    """Why a trace may neither calibrate nor be predicted (empty: it may)."""
    from kfacperf.trace.measure import measured_events, no_measured_steps

    why = []
    if trace.run.get("completed") is False:
        why.append("the run did not complete (" + str(trace.run.get("failure") or "completed "
                                                      "false") + "): not used to validate")
    try:
        if measured_events(trace).empty:
            why.append(no_measured_steps(trace, Path(trace.path).name)
                       + ": not used to validate")
    except (ValueError, KeyError) as exc:
        why.append(f"its measured steps do not read ({exc}): not used to validate")
    return why


def _replace_tree(source: Path, target: Path) -> None:
    """``target`` becomes a copy of the folder ``source``; an earlier ``target`` is replaced
    whole (no file of it left beside the new ones), and only once the copy is complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _land_incomplete(folder: Path, into: Path, tasks: Sequence[dict[str, Any]],
                     say: Callable[[str], None]) -> None:
    """The traces that came back of profile runs that failed or were not reached (a run
    stopped by a time limit keeps its finished steps): into ``INTO/incomplete/``, said."""
    ok = {(str((t.get("run") or {}).get("precision")), str(t.get("name"))) for t in tasks
          if t.get("kind") == PROFILE and t.get("status") == "ok"
          and isinstance(t.get("run"), dict)}
    traces = folder / "traces"
    if not traces.is_dir():
        return
    for precision in sorted(p for p in traces.iterdir() if p.is_dir()):
        for source in sorted(p for p in precision.iterdir() if p.is_dir()):
            if (precision.name, source.name) in ok:
                continue
            _replace_tree(source, into / INCOMPLETE / precision.name / source.name)
            say(f"{source.name}: its task did not finish ok; what it recorded is kept in "
                f"{INCOMPLETE}/{precision.name}/{source.name} (not validated)")


def _device_name(done: Finished) -> str:
    """The preset the traced GPU maps to (``h200``; ``h100-sxm5`` where the run landed on an
    H100), ``dry-run`` for a CPU's outputs."""
    from kfacperf.calibrate.device import base_device_for
    from kfacperf.trace.store import load_trace

    if not done.gpu or not done.traces:
        return "dry-run"
    name = base_device_for(load_trace(done.traces[0].path).run).name
    return "gpu" if name == "cpu-nominal" else name


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


def _shown(path: Path) -> str:
    """``path`` as a committed file may name it: relative to the working folder where it lies
    below it, else from the landing folder's name on (never an absolute path)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        parts = path.parts
        return str(Path(*parts[-2:])) if len(parts) >= 2 else path.name


PRESET_PRECISIONS: tuple[str, ...] = (S.BF16, S.TF32, S.FP32)
"""Whose fitted terms go into the preset, the first that validated: the precision users
train in first."""


def _reported_memory(done: Finished) -> tuple[float, str] | None:
    """The memory total the traced GPU reported (MiB) and the run.json it is in, from the
    first trace that recorded one."""
    from kfacperf.trace.schema import RUN_FILE
    from kfacperf.trace.store import read_run

    for t in done.traces:
        try:
            device = read_run(t.path / RUN_FILE).get("device") or {}
        except (OSError, ValueError):
            continue
        mib = device.get("memory_total_mib")
        if isinstance(mib, (int, float)) and mib > 0:
            return float(mib), f"{_shown(t.path)}/{RUN_FILE}"
    return None


def _fold_preset(done: Finished, device_name: str, say: Callable[[str], None]) -> None:
    """Write ``DEVICE-preset.toml``: the preset of the traced GPU with the fitted terms."""
    from kfacperf.calibrate.kernels import fit_inverse_kernels
    from kfacperf.pipeline.ground_truth.preset import (
        carry_to_sibling,
        fold_into_preset,
        sibling_presets,
        with_reported_memory,
    )
    from kfacperf.safety import load_json_file
    from kfacperf.sim.models import load_device
    from kfacperf.sim.models.device import load_device_model, save_device_model

    precision = next((p for p in PRESET_PRECISIONS if p in done.device_files), None)
    if not done.gpu or precision is None:
        say("preset: not folded (" + ("a dry run's outputs" if not done.gpu
                                      else "no precision was validated") + ")")
        return
    try:
        preset = load_device(device_name)
    except ValueError as exc:
        say(f"preset: not folded ({exc})")
        return
    fits = []
    kernels = done.into / KERNELS_FILE
    if kernels.is_file():
        try:
            fits.append(fit_inverse_kernels(load_json_file(kernels, what="kernel timings"),
                                            preset, method=S.CHOLESKY, dtype=S.FP64))
        except (ValueError, OSError) as exc:
            say(f"preset: cholesky terms kept as they were ({exc})")
    batches = sorted({t.batch for t in done.traces
                      if t.precision == precision and t.role == CALIBRATION and t.batch > 0})
    fitted_from = (f"the {precision} calibration traces in {_shown(done.into / precision)}"
                   + (f" (batch {' and '.join(map(str, batches))} per GPU)" if batches else ""))
    try:
        folded = fold_into_preset(preset, load_device_model(done.device_files[precision]),
                                  fitted_from=fitted_from, kernel_fits=fits,
                                  kernels_from=_shown(kernels))
    except ValueError as exc:
        say(f"preset: not folded ({exc})")
        return
    reported = _reported_memory(done)
    if reported is not None:
        mib, where = reported
        folded = with_reported_memory(folded, mib, where=where)
        say(f"preset: memory {folded.memory_GB:g} GB, the {mib:,.0f} MiB the GPU reported "
            f"(was {preset.memory_GB:g} GB from the datasheet)")
    path = save_device_model(folded, done.into / f"{preset.name}-preset.toml")
    say(f"preset: {path.name}, models/devices/{preset.name}.toml with the {precision} fit and "
        + (f"the {', '.join(f.method for f in fits)} kernel terms; " if fits else
           "no kernel terms (see above); ")
        + "review, then copy it over the preset")
    for sibling in sibling_presets(folded):
        path = save_device_model(
            carry_to_sibling(folded, sibling, measured_on=_shown(done.into / precision)),
            done.into / f"{sibling.name}-preset.toml")
        say(f"preset: {path.name}, models/devices/{sibling.name}.toml with the terms measured "
            f"on {preset.name} carried over (the same compute peaks; still assumed there)")


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
