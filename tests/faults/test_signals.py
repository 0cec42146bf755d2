"""Ctrl-C (SIGINT) or SIGTERM to a real `kfacperf profile --nproc 2` launcher: no process of
the run is left after 10 s, the trace keeps its finished steps, marked incomplete, and the
launcher says so in one line, without a traceback.  The same run shows that nothing of it
listens beyond the loopback interface.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import time

import pytest

from helpers.faults import (
    kill_leftovers,
    listening_addresses,
    start_profile,
    wait_for_ranks,
    wait_for_steps,
    wait_gone,
)
from kfacperf.trace.store import load_trace, read_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_launcher_stops_every_rank(tmp_path, sig):
    out = tmp_path / "run"
    launcher = start_profile(out)
    pids = {}
    try:
        pids = wait_for_ranks(launcher, 2)
        wait_for_steps(out, launcher, 2)
        listening = listening_addresses([launcher.pid, *pids.values()])
        os.kill(launcher.pid, sig)
        t0 = time.monotonic()
        _, err = launcher.communicate(timeout=30)
        wait_gone(list(pids.values()), max(0.0, 10.0 - (time.monotonic() - t0)))
        elapsed = time.monotonic() - t0
    finally:
        kill_leftovers(launcher, pids)
    assert elapsed <= 10.0, elapsed
    assert launcher.returncode == 128 + sig, err
    # what the interrupt says: one line, beside the ranks' progress lines
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[kfacperf] ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    name = signal.Signals(sig).name
    assert lines[0].startswith(f"kfacperf profile: interrupted by {name}: stopped all 2 rank(s)")
    assert "marked incomplete (completed=false)" in lines[0]
    trace = load_trace(out, partial=True)
    assert trace.completed is False
    steps = trace.events[trace.events["stage"] == "step"].groupby("rank")["step"].nunique()
    assert len(steps) == 2 and (steps >= 2).all()
    assert read_run(out / "run.json")["failure"] == f"interrupted by {name}"
    # the rendezvous store, gloo and anything else of the run: loopback only
    assert listening, "the ranks' sockets were not found"
    for address in listening:
        host = address.rsplit(":", 1)[0]
        assert ipaddress.ip_address(host).is_loopback, listening
