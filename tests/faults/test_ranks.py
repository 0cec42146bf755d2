"""A rank that is stopped, killed or hangs: the run ends within the timeout plus 30 s with an
error naming the rank, no process is left, and the trace keeps every finished step, marked
incomplete.  Real `kfacperf profile --nproc 2` runs (K-FAC, SP-NGD) with --timeout 3.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.faults import (
    alive,
    kill_leftovers,
    start_profile,
    steps_recorded,
    wait_for_ranks,
    wait_for_steps,
    wait_gone,
)
from kfacperf.trace.store import load_trace, read_run

TIMEOUT_S = 3.0
pytestmark = pytest.mark.slow


def check_incomplete_trace(out, *, min_steps: int, names: str) -> None:
    trace = load_trace(out, partial=True)
    assert trace.completed is False
    ev = trace.events
    steps = ev[ev["stage"] == "step"].groupby("rank")["step"].nunique()
    assert (steps >= min_steps).all() and len(steps) == 2, steps
    run = read_run(out / "run.json")
    assert run["completed"] is False and names in run["failure"], run.get("failure")


@pytest.mark.parametrize("sig, how", [
    (signal.SIGSTOP, "rank 1 was stopped (SIGSTOP or a debugger) for more than 3 s"),
    (signal.SIGKILL, "rank 1 was killed by SIGKILL"),
])
def test_a_stopped_or_killed_rank_ends_the_run_naming_it(tmp_path, sig, how):
    out = tmp_path / "run"
    launcher = start_profile(out, timeout_s=TIMEOUT_S)
    pids = {}
    try:
        pids = wait_for_ranks(launcher, 2)
        wait_for_steps(out, launcher, 2)
        os.kill(pids[1], sig)
        t0 = time.monotonic()
        _, err = launcher.communicate(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - t0
        wait_gone(list(pids.values()), 5.0)
    finally:
        kill_leftovers(launcher, pids)
    assert elapsed < TIMEOUT_S + 30, elapsed
    assert launcher.returncode == 1, err
    assert f"kfacperf profile: error: the run failed: {how}" in err, err
    assert "Traceback" not in err
    check_incomplete_trace(out, min_steps=2, names=how)


def test_the_watchdog_ends_a_rank_that_makes_no_progress(tmp_path):
    """Where the backend's timeout never fires (gloo's reduce_scatter waits without a
    limit), the watchdog ends the rank, with a report, within the timeout plus its grace."""
    code = (
        "import sys, threading, time\n"
        "from kfacperf.runtime.watchdog import Watchdog\n"
        "def stalled(reason):\n"
        "    print('report:', reason, flush=True)\n"
        "w = Watchdog(limit_s=1.0, on_stall=stalled)\n"
        "w.beat()\n"
        "threading.Event().wait()  # a wait without a limit\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    from kfacperf.runtime.watchdog import EXIT_STALLED

    assert proc.returncode == EXIT_STALLED, proc
    assert proc.stdout.startswith("report: no step finished for 1 s"), proc.stdout
    assert "(then raise --timeout)" in proc.stdout  # a step that is merely long says how
    assert time.monotonic() - t0 < 30


def test_a_rank_whose_peer_is_stopped_does_not_wait_forever(tmp_path):
    """The ranks alone, no launcher watching them: rank 1 is stopped; rank 0 must end by
    itself (gloo's timeout or the watchdog) within twice the timeout plus a margin, with an
    error report, and keep its finished steps."""
    from kfacperf.runtime import launch
    from kfacperf.runtime.config import ProfileConfig, run_record
    from kfacperf.runtime.runner import (
        PREPARED_ENV,
        prepare_out,
        rank_environments,
        worker_command,
    )
    from kfacperf.runtime.watchdog import limit_for
    from kfacperf.runtime.worker import error_path, read_error_summary
    from kfacperf.trace.store import write_run

    out = tmp_path / "run"
    config = ProfileConfig(workload="mlp", workload_options={"in_features": 24, "hidden": [16, 12]},
                           batch_size=8, out=str(out), strategy="spngd", nproc=2,
                           steps=100000, warmup=1, timeout_s=TIMEOUT_S)
    prepare_out(out, force=False)
    write_run(out, run_record(config, world_size=2, batch_per_rank=8, device=None))
    env = dict(os.environ, OMP_NUM_THREADS="1", **{PREPARED_ENV: "1"})
    procs = launch.start(worker_command(config), rank_environments(config, env))
    try:
        deadline = time.monotonic() + 120
        while min(steps_recorded(out, 0), steps_recorded(out, 1)) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        procs[0].wait(timeout=limit_for(TIMEOUT_S) + 30)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if alive(p.pid):
                p.kill()
            p.wait(timeout=10)
    assert elapsed < limit_for(TIMEOUT_S) + 20, elapsed
    assert procs[0].returncode != 0
    summary = read_error_summary(error_path(out, 0))
    assert summary.startswith(("CollectiveError: rank 0", "Stalled: rank 0")), summary
    trace = load_trace(out, partial=True)
    assert trace.completed is False
    assert (trace.events[trace.events["stage"] == "step"].groupby("rank")["step"].nunique()
            >= 2).all()
