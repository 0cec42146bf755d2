"""The NVTX check: one short K-FAC run under Nsight Systems, of which only the NVTX range
summary (a small CSV) is kept; it shows the stage timer's ranges arrive."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from kfacperf import vocab as S
from kfacperf.pipeline.ground_truth.plan import ProfileRun, Settings

NSYS_REPORTS = ("nvtx_sum", "nvtxsum")
"""The NVTX summary report's name in newer and in older nsys."""


def nsys_run(settings: Settings) -> ProfileRun:
    """The run profiled under nsys: K-FAC 1/1 at the first calibration batch, 1+2 steps."""
    return ProfileRun(workload=settings.workload, precision=settings.precisions[0],
                      optimizer=S.KFAC, batch=settings.calibration_batches[0], role="check",
                      steps=2, warmup=1)


def run_nsys(settings: Settings, out: Path, log_path: Path, timeout_s: float) -> str:
    """Run :func:`nsys_run` under ``nsys profile`` (``kfacperf profile`` in a child process,
    its output in ``log_path``), export the NVTX summary into ``out/nsys/`` and delete the
    rest; says how many range names the summary has."""
    nsys = shutil.which("nsys")
    if nsys is None:
        raise FileNotFoundError("nsys is not installed")
    where = out / "nsys"
    where.mkdir(parents=True, exist_ok=True)
    args = [*nsys_run(settings).cli_args(settings, str((where / "trace").resolve())), "--force"]
    report = where / "kfac-1-1"
    cmd = [nsys, "profile", "--trace=cuda,nvtx", "--sample=none", "--cpuctxsw=none",
           "--force-overwrite=true", "-o", str(report),
           sys.executable, "-m", "kfacperf.cli", "profile", *args]
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
