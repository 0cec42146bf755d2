"""The NVTX check: do the stage timer's ranges reach a tool?

Under Nsight Systems (where installed): one short K-FAC run, of which only the NVTX range
summary (a small CSV) is kept.  Else under Nsight Compute (``ncu``): one short SGD run,
profiling only kernels launched inside the ``kfacperf`` domain's ``forward`` range
(``--nvtx-include``); a kernel profiled there is a range that arrived.  The tool's output
goes to the task's log either way."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from kfacperf import vocab as S
from kfacperf.pipeline.ground_truth.plan import ProfileRun, Settings
from kfacperf.profiler.nvtx_backend import DOMAIN

NVTX_TOOLS = ("nsys", "ncu")
"""The tools the check can use, in the order it prefers them."""
NSYS_REPORTS = ("nvtx_sum", "nvtxsum")
"""The NVTX summary report's name in newer and in older nsys."""
NSYS_LARGE = ("*.nsys-rep", "*.sqlite", "*.qdstrm", "*.qdrep")
"""What nsys writes that is deleted after the check, whatever became of it (the NVTX
summary CSV is what is kept)."""


def nsys_run(settings: Settings) -> ProfileRun:
    """The run profiled under nsys: K-FAC 1/1 at the first calibration batch, 1+2 steps."""
    return ProfileRun(workload=settings.workload, precision=settings.precisions[0],
                      optimizer=S.KFAC, batch=settings.calibration_batches[0], role="check",
                      steps=2, warmup=1)


def nvtx_tool() -> str | None:
    """The first of :data:`NVTX_TOOLS` on the PATH (None: neither)."""
    return next((t for t in NVTX_TOOLS if shutil.which(t) is not None), None)


def run_nvtx_check(settings: Settings, out: Path, log_path: Path, timeout_s: float | None) -> str:
    """The check with the tool :func:`nvtx_tool` finds; what it found."""
    tool = nvtx_tool()
    if tool is None:
        raise FileNotFoundError("neither nsys nor ncu is installed")
    run = run_nsys if tool == "nsys" else run_ncu
    return run(settings, out, log_path, timeout_s)


NCU_RANGE = f"{DOMAIN}@{S.FORWARD}/"
"""The push/pop range whose kernels ncu profiles: the forward pass, in kfacperf's domain
(``DOMAIN@RANGE``; the trailing ``/`` marks a push/pop range, none a start/end one)."""
NCU_KERNELS = 3


def ncu_run(settings: Settings) -> ProfileRun:
    """The run profiled under ncu: SGD at the first calibration batch, 1+1 steps."""
    return ProfileRun(workload=settings.workload, precision=settings.precisions[0],
                      optimizer=S.SGD, batch=settings.calibration_batches[0], role="check",
                      steps=1, warmup=1)


def _under(tool: str, run: ProfileRun, settings: Settings,
           out: Path) -> tuple[str, Path, list[str]]:
    """The tool's path, its working folder ``out/TOOL/`` and the ``kfacperf profile``
    command line of ``run`` (its trace in that folder) to run under it."""
    exe = shutil.which(tool)
    if exe is None:
        raise FileNotFoundError(f"{tool} is not installed")
    where = out / tool
    where.mkdir(parents=True, exist_ok=True)
    args = [*run.cli_args(settings, str((where / "trace").resolve())), "--force"]
    return exe, where, [sys.executable, "-m", "kfacperf.cli", "profile", *args]


def run_ncu(settings: Settings, out: Path, log_path: Path, timeout_s: float | None) -> str:
    """Run :func:`ncu_run` under ``ncu --nvtx --nvtx-include`` :data:`NCU_RANGE` (its
    output in ``log_path``); how many kernels it profiled inside the range (none: an
    error)."""
    ncu, where, profile = _under("ncu", ncu_run(settings), settings, out)
    cmd = [ncu, "--nvtx", "--nvtx-include", NCU_RANGE, "--launch-count", str(NCU_KERNELS),
           "--target-processes", "all", "--clock-control", "none", "--section", "LaunchStats",
           *profile]
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        try:
            done = run_tool(cmd, timeout_s=timeout_s, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
        except subprocess.TimeoutExpired as exc:
            log.write(_text(exc.output))
            raise RuntimeError(f"ncu did not finish in {timeout_s:.0f} s and was stopped with "
                               f"the run it profiled (logs/{log_path.name})") from None
        finally:
            shutil.rmtree(where, ignore_errors=True)
        log.write(done.stdout)
    profiled = sum(line.startswith("==PROF== Profiling") for line in done.stdout.splitlines())
    if done.returncode != 0 or not profiled:
        raise RuntimeError(f"ncu exited {done.returncode} and profiled {profiled} kernel(s) "
                           f"inside NVTX range {NCU_RANGE} (logs/{log_path.name})")
    return f"ncu profiled {profiled} kernel(s) inside NVTX range {NCU_RANGE}"


def run_nsys(settings: Settings, out: Path, log_path: Path, timeout_s: float | None) -> str:
    """Run :func:`nsys_run` under ``nsys profile`` (``kfacperf profile`` in a child process,
    its output in ``log_path``), export the NVTX summary into ``out/nsys/`` and delete the
    rest; says how many range names the summary has."""
    nsys, where, profile = _under("nsys", nsys_run(settings), settings, out)
    report = where / "kfac-1-1"
    cmd = [nsys, "profile", "--trace=cuda,nvtx", "--sample=none", "--cpuctxsw=none",
           "--force-overwrite=true", "-o", str(report), *profile]
    try:
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            ran = run_tool(cmd, timeout_s=timeout_s, stdout=log, stderr=subprocess.STDOUT)
            if ran.returncode != 0:
                raise subprocess.CalledProcessError(ran.returncode, cmd)
            rep = report.with_suffix(".nsys-rep")
            for name in NSYS_REPORTS:
                r = run_tool([nsys, "stats", "--report", name, "--format", "csv",
                              "--force-export=true", "--output", str(where / "nvtx"),
                              str(rep)], timeout_s=timeout_s, stdout=log,
                             stderr=subprocess.STDOUT)
                if r.returncode == 0:
                    break
    finally:  # the report (large) never stays to be packed, however the check ended
        for pattern in NSYS_LARGE:
            for p in where.glob(pattern):
                p.unlink(missing_ok=True)
        shutil.rmtree(where / "trace", ignore_errors=True)
    csvs = sorted(where.glob("nvtx*.csv"))
    if not csvs:
        raise RuntimeError("nsys stats wrote no NVTX summary")
    ranges = sum(1 for _ in csvs[0].open()) - 1
    return f"{csvs[0].name}: {ranges} NVTX range name(s)"


def run_tool(cmd: list[str], *, timeout_s: float | None,
             **kw: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(cmd, timeout=timeout_s, **kw)``, except that on a timeout (or an
    interrupt) the tool is killed with every process below it, not alone: a profiled run
    left behind would go on holding the GPU and writing into the output folder while it is
    packed.  The tool stays in this process's group, so a signal to the group (the script's
    hard stop) reaches it too."""
    with subprocess.Popen(cmd, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            _kill_tree(proc)
            exc.output, _ = proc.communicate()
            raise
        except BaseException:
            _kill_tree(proc)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_tree(proc: subprocess.Popen[Any]) -> None:
    from kfacperf.runtime.launch import descendants

    below = descendants(proc.pid)  # before the tool dies and its children are re-parented
    for pid in [proc.pid, *below]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _text(output: Any) -> str:
    if output is None:
        return ""
    return output if isinstance(output, str) else output.decode(errors="replace")
