"""Start this node's ranks of a profile run and watch them until they end (torch-free).

Every rank runs in a session of its own, so a Ctrl-C at the terminal reaches only the
launcher, which then stops the ranks itself: SIGTERM, and SIGKILL after
:data:`STOP_GRACE_S` for any that is left (a stopped process ignores SIGTERM until it is
continued).  The same happens when one rank fails (its peers would otherwise wait in a
collective until the process-group timeout) and when a rank stays stopped (SIGSTOP, a
debugger) for longer than the timeout.  Each rank also dies with the launcher
(``PR_SET_PDEATHSIG``, see :func:`die_with_parent`), so even a launcher killed by SIGKILL
leaves no rank behind.

API::

    start(cmd, envs) -> list[subprocess.Popen[bytes]]
    supervise(procs, *, stalled_after_s) -> Supervision
    stop(procs, *, extra_pids=()) -> None
    die_with_parent() -> None          (called by a rank at start)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from kfacperf.errors import signal_name

STOP_GRACE_S = 3.0
"""Seconds between SIGTERM and SIGKILL when the launcher stops ranks."""
FAIL_GRACE_S = 1.0
"""Seconds the other ranks get, after one failed, to end (and report) on their own."""
POLL_S = 0.1
PARENT_ENV = "KFACPERF_LAUNCHER_PID"
"""Set for every process the launcher starts: a rank dies with its parent (see
:func:`die_with_parent`); the value is the parent's pid, or ``"parent"`` when the rank's
parent is another launcher (torchrun) started by this one."""


@dataclass(frozen=True, kw_only=True)
class RankEnd:
    """How one rank ended, in words (``"exited with status 1"``, ``"was killed by SIGKILL"``,
    ``"was stopped"`` ...), and its exit status (None: it was still there)."""

    rank: int
    status: int | None
    how: str


@dataclass(frozen=True, kw_only=True)
class Supervision:
    """The outcome of :func:`supervise`.

    ``ok``: every rank exited with status 0.  ``cause``: the rank whose end stopped the run
    (the first to fail, or one stopped past the timeout).  ``interrupted``: the signal that
    stopped the launcher (``"SIGINT"``, ``"SIGTERM"``), or "".  ``ends``: every rank."""

    ok: bool
    ends: tuple[RankEnd, ...] = field(default=())
    cause: RankEnd | None = None
    interrupted: str = ""


def start(cmd: Sequence[str], envs: Sequence[Mapping[str, str]], *,
          ranks_below: bool = False) -> list[subprocess.Popen[bytes]]:
    """Start one process per environment (rank order), each in a session of its own.
    ``ranks_below``: the processes are launchers (torchrun) whose children are the ranks."""
    parent = "parent" if ranks_below else str(os.getpid())
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for env in envs:
            procs.append(subprocess.Popen(list(cmd), env=dict(env, **{PARENT_ENV: parent}),
                                          start_new_session=True))
    except BaseException:
        stop(procs)
        raise
    return procs


def process_state(pid: int) -> str | None:
    """The state letter of a live process (``R``, ``S``, ``T`` stopped, ...) from
    ``/proc``, or None when it is gone or this is not Linux."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:][:1].decode() or None


def describe_status(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def supervise(procs: Sequence[subprocess.Popen[bytes]], *, stalled_after_s: float) -> Supervision:
    """Wait for the ranks ``procs`` (index = rank) to end; stop them all when one fails,
    when one stays stopped for ``stalled_after_s`` seconds, or on Ctrl-C / SIGTERM (a
    KeyboardInterrupt here, see :class:`kfacperf.errors.Terminated`)."""
    stopped_since: dict[int, float] = {}
    cause: RankEnd | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c is not None and c != 0]
            if failed:
                rank, code = failed[0]
                cause = RankEnd(rank=rank, status=code, how=describe_status(code))
                break
            if all(c == 0 for c in codes):
                return Supervision(ok=True, ends=tuple(
                    RankEnd(rank=r, status=0, how="exited with status 0")
                    for r in range(len(procs))))
            now = time.monotonic()
            for r, p in enumerate(procs):
                if codes[r] is None and process_state(p.pid) in ("T", "t"):
                    since = stopped_since.setdefault(r, now)
                    if now - since > stalled_after_s:
                        cause = RankEnd(rank=r, status=None, how=(
                            f"was stopped (SIGSTOP or a debugger) for more than "
                            f"{stalled_after_s:g} s"))
                else:
                    stopped_since.pop(r, None)
            if cause is not None:
                break
            time.sleep(POLL_S)
        _wait_all(procs, FAIL_GRACE_S)
        ends = _ends(procs)
        stop(procs)
        return Supervision(ok=False, ends=ends, cause=cause)
    except KeyboardInterrupt as exc:
        with signals_ignored():
            ends = _ends(procs)
            stop(procs)
        return Supervision(ok=False, ends=ends, interrupted=signal_name(exc))


def _ends(procs: Sequence[subprocess.Popen[bytes]]) -> tuple[RankEnd, ...]:
    out = []
    for r, p in enumerate(procs):
        code = p.poll()
        if code is not None:
            out.append(RankEnd(rank=r, status=code, how=describe_status(code)))
        else:
            state = process_state(p.pid)
            how = "was stopped" if state in ("T", "t") else "was still running"
            out.append(RankEnd(rank=r, status=None, how=how))
    return tuple(out)


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def stop(procs: Sequence[subprocess.Popen[bytes]], *, extra_pids: Sequence[int] = ()) -> None:
    """SIGTERM every process still running (and ``extra_pids``; then SIGCONT, so a stopped
    one acts on it), SIGKILL what is left after :data:`STOP_GRACE_S`, and reap them."""
    live = [p for p in procs if p.poll() is None]
    for pid in [p.pid for p in live] + list(extra_pids):
        _signal(pid, signal.SIGTERM)
        _signal(pid, signal.SIGCONT)
    _wait_all(live, STOP_GRACE_S)
    for p in live:
        if p.poll() is None:
            _signal(p.pid, signal.SIGKILL)
    for pid in extra_pids:
        _signal(pid, signal.SIGKILL)
    for p in live:
        try:
            p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
            pass


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while cleaning up, so a second Ctrl-C cannot cut it short."""
    saved = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def die_with_parent() -> None:
    """In a rank started by :func:`start` (directly, or below torchrun): ask the kernel to
    SIGKILL this process when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), and leave
    at once if the launcher that started it already has."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl here
        return
    if parent.isdigit() and os.getppid() != int(parent):
        os._exit(1)
