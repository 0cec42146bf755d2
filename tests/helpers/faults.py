"""Shared by the fault suite (tests/faults/): the command line run in-process on a bad input,
copies of committed reference traces to damage, and real `kfacperf profile` runs to stop,
kill or interrupt."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kfacperf.cli import main

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "traces" / "reference"
TRACE_1P = REFERENCE / "p1" / "resnet20-sgd-b16-r1"
"""A committed one-process SGD trace (small: 40 kB)."""
TRACE_2P = REFERENCE / "p2" / "resnet20-sgd-b16-r1"
"""The same configuration on two processes."""
CLUSTER = REFERENCE / "local-cpu.toml"


@dataclass(frozen=True)
class CliResult:
    status: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_cli(capsys, argv: list[str]) -> CliResult:
    """``kfacperf ARGV`` in this process; an exception escaping ``main`` (what a user would
    see as a traceback) fails the test by itself."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return CliResult(status, captured.out, captured.err)


def assert_one_line_error(result: CliResult, *, names: str = "") -> None:
    """Exit status 1 or 2, one error line on stderr (naming ``names``) and it the last one
    (progress lines may come before it), no traceback."""
    assert result.status in (1, 2), result
    assert "Traceback" not in result.text, result.text
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], result.err
    assert names in errors[0], (names, errors[0])


def copy_trace(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- real runs

SMALL = ["--workload", "mlp", "--workload-option", "in_features=24",
         "--workload-option", "hidden=[16,12]", "--batch-size", "8"]


def profile_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("KFACPERF_TEST_CRASH_AFTER", None)
    return env


def start_profile(out: Path, *, timeout_s: float = 3.0, strategy: str = "spngd",
                  extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """A 2-rank K-FAC profile that runs until stopped (100,000 steps)."""
    cmd = [sys.executable, "-m", "kfacperf.cli", "profile", *SMALL, "--optimizer", "kfac",
           "--strategy", strategy, "--nproc", "2", "--steps", "100000", "--warmup", "1",
           "--timeout", str(timeout_s), "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=profile_env())


def steps_recorded(out: Path, rank: int) -> int:
    """Steps rank ``rank`` has recorded so far (its part file)."""
    from kfacperf.trace.parts import event_part_path, read_stream

    path = event_part_path(out / "parts", rank)
    if not path.exists():
        return 0
    table, _ = read_stream(path)
    if table is None:
        return 0
    return sum(1 for s in table.column("stage").to_pylist() if s == "step")


def wait_for_steps(out: Path, launcher: subprocess.Popen, steps: int, *,
                   ranks: tuple[int, ...] = (0, 1), limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"the run ended early: {launcher.communicate()}")
        if all(steps_recorded(out, r) >= steps for r in ranks):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps recorded within {limit_s} s")


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's rank processes (from their environment)."""
    from kfacperf.runtime.launch import descendants

    out = {}
    for pid in descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


def wait_for_ranks(launcher: subprocess.Popen, n: int, limit_s: float = 60.0) -> dict[int, int]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        pids = rank_pids(launcher.pid)
        if len(pids) == n:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"{n} ranks did not start within {limit_s} s")


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


def wait_gone(pids: list[int], limit_s: float) -> float:
    """Seconds until every process of ``pids`` is gone (AssertionError past ``limit_s``)."""
    start = time.monotonic()
    while any(alive(p) for p in pids):
        if time.monotonic() - start > limit_s:
            raise AssertionError(f"processes still alive after {limit_s} s: "
                                 f"{[p for p in pids if alive(p)]}")
        time.sleep(0.05)
    return time.monotonic() - start


def kill_leftovers(launcher: subprocess.Popen, pids: dict[int, int]) -> None:
    """Clean up after a failed test: this test's own processes only, by pid."""
    for pid in [*pids.values(), launcher.pid]:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        launcher.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def listening_addresses(pids: list[int]) -> list[str]:
    """The local addresses (``ip:port``) of every TCP socket in LISTEN state held by
    ``pids`` (Linux ``/proc``)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            out.append(f"{_ip(addr, width)}:{int(port, 16)}")
    return out


def _ip(hexaddr: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hexaddr)
    # /proc stores each 32-bit word in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)) if width else hexaddr
