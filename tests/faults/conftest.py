"""Fixtures of the fault suite."""
from __future__ import annotations

import signal

import pytest


class Hung(BaseException):
    """Raised by the ``no_hang`` alarm (a BaseException: no error handler may swallow it)."""


@pytest.fixture
def no_hang():
    """Fail the test, instead of hanging the suite, if it blocks for 60 s (a FIFO read)."""
    def alarm(_signum, _frame):
        raise Hung("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
