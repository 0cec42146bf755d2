"""End a rank that has made no progress for longer than the process-group timeout allows.

A backend's timeout does not cover every wait: gloo's list-form ``reduce_scatter`` waits
for its parts without a limit, so a rank whose peer was stopped (SIGSTOP) inside an SP-NGD
step waited forever.  The watchdog is backend-agnostic: the training loop calls
:meth:`Watchdog.beat` after every step; a thread checks the time since the last beat, and
past ``limit_s`` (:func:`limit_for`: the process-group timeout plus a grace, so a backend's
own timeout fires first where it works) it calls ``on_stall`` with a one-line reason and ends the
process with :data:`EXIT_STALLED`, without the interpreter's teardown (which could wait on
the very collective that hangs).

A step longer than the limit counts as no progress: raise ``--timeout`` for such steps.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

GRACE_S = 10.0
"""The most seconds past the process-group timeout before the watchdog ends the rank."""
EXIT_STALLED = 3
"""Exit status of a rank ended by the watchdog."""


def limit_for(timeout_s: float) -> float:
    """The watchdog's limit for a process-group timeout: the timeout plus a grace of
    :data:`GRACE_S` or the timeout itself, whichever is shorter."""
    return timeout_s + min(GRACE_S, timeout_s)


class Watchdog:
    """A daemon thread that ends the process when :meth:`beat` is not called for
    ``limit_s`` seconds; ``on_stall(reason)`` runs first (e.g. to write an error report)."""

    def __init__(self, *, limit_s: float, on_stall: Callable[[str], None],
                 what: str = "no step finished") -> None:
        if not limit_s > 0:
            raise ValueError(f"watchdog limit must be > 0 seconds, got {limit_s}")
        self.limit_s = limit_s
        self.what = what
        self._on_stall = on_stall
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kfacperf-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """Progress: restart the clock."""
        self._last = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.limit_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.limit_s:
                reason = (f"{self.what} for {idle:.0f} s (limit {self.limit_s:g} s: the "
                          "process-group timeout plus a grace); a peer rank stopped or hangs, "
                          "or one step takes longer than that (then raise --timeout)")
                try:
                    self._on_stall(reason)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(EXIT_STALLED)
