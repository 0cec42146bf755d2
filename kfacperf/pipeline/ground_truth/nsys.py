"""The NVTX check: do the stage timer's ranges reach a tool?

Under Nsight Systems (where installed): one short K-FAC run, of which only the NVTX range
summary (a small CSV) is kept.  Else under Nsight Compute (``ncu``): one short SGD run,
profiling only kernels launched inside the ``kfacperf`` domain's ``forward`` range
(``--nvtx-include``); a kernel profiled there is a range that arrived.  The tool's output
goes to the task's log either way."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from kfacperf import vocab as S
from kfacperf.pipeline.ground_truth.plan import ProfileRun, Settings
from kfacperf.profiler.nvtx_backend import DOMAIN

NVTX_TOOLS = ("nsys", "ncu")
"""The tools the check can use, in the order it prefers them."""
NSYS_REPORTS = ("nvtx_sum", "nvtxsum")
"""The NVTX summary report's name in newer and in older nsys."""


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
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout_s, text=True, errors="replace")
        log.write(done.stdout)
    shutil.rmtree(where, ignore_errors=True)
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
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=True)
        rep = report.with_suffix(".nsys-rep")
        for name in NSYS_REPORTS:
            r = subprocess.run([nsys, "stats", "--report", name, "--format", "csv",
                                "--force-export=true", "--output", str(where / "nvtx"),
                                str(rep)], stdout=log, stderr=subprocess.STDOUT,
                               timeout=timeout_s)
            if r.returncode == 0:
                break
    csvs = sorted(where.glob("nvtx*.csv"))
    for p in [*where.glob("*.nsys-rep"), *where.glob("*.sqlite")]:
        p.unlink()  # large; the CSV is what is kept
    shutil.rmtree(where / "trace", ignore_errors=True)
    if not csvs:
        raise RuntimeError("nsys stats wrote no NVTX summary")
    ranges = sum(1 for _ in csvs[0].open()) - 1
    return f"{csvs[0].name}: {ranges} NVTX range name(s)"
