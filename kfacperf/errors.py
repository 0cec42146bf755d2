"""Errors the command line prints as one line, without a traceback."""
from __future__ import annotations

import signal


class UserError(ValueError):
    """An error caused by the user's input (a bad flag, a missing file, a refused overwrite)."""


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM, SIGHUP); handled like Ctrl-C, so
    whatever cleans up after an interrupt also cleans up after it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(exc: BaseException) -> str:
    """``SIGINT`` for a plain KeyboardInterrupt, else the :class:`Terminated` signal's name."""
    return signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "SIGINT"


def signal_status(exc: BaseException) -> int:
    """The conventional exit status after an interrupt: 128 + the signal number."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else int(signal.SIGINT))
