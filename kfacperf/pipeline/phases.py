"""Running the demo's phases: one progress line each, their output kept in a log file, and a
failure that names the phase.

A phase's own output (the profiler's per-step lines, torchrun's and commbench's messages,
from this process and from the processes it starts) goes to ``logs/<n>-<slug>.log`` by
redirecting file descriptors 1 and 2 while it runs, so the terminal shows one line per phase;
``verbose`` leaves the output on the terminal instead.
"""
from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypeVar

T = TypeVar("T")


class DemoPhaseError(RuntimeError):
    """A phase failed; ``phase`` names it, ``log`` is where its output went (if captured)."""

    def __init__(self, *, phase: str, message: str, log: Path | None,
                 finished: tuple[str, ...]) -> None:
        self.phase, self.message, self.log, self.finished = phase, message, log, finished
        where = f"\n  its output: {log}" if log is not None else ""
        done = ", ".join(finished) if finished else "none"
        super().__init__(f"phase '{phase}' failed: {message}{where}\n  finished phases (their "
                         f"files are kept): {done}")


@dataclass(frozen=True, kw_only=True)
class PhaseTime:
    name: str
    seconds: float
    note: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "phase"


@contextmanager
def captured_output(path: Path) -> Iterator[None]:
    """Send everything written to ``sys.stdout``/``sys.stderr`` and to file descriptors 1 and
    2 (by this process and the processes it starts) to ``path`` until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with open(path, "a", buffering=1, encoding="utf-8", errors="replace") as log:
        saved = (os.dup(1), os.dup(2))
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            with redirect_stdout(log), redirect_stderr(log):
                yield
        finally:
            log.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def log_tail(path: Path | None, lines: int = 12) -> str:
    """The last non-empty lines of a phase log (for error messages)."""
    if path is None or not path.is_file():
        return ""
    text = path.read_text(errors="replace").strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-lines:]
    return "\n".join("    " + ln for ln in tail)


class PhaseRunner:
    """Runs phases in order, timing each and printing one line per phase to ``stream``
    (nothing when ``stream`` is None)."""

    def __init__(self, *, total: int, log_dir: Path, stream: TextIO | None,
                 verbose: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.log_dir, self.stream, self.verbose = total, log_dir, stream, verbose
        self.clock = clock
        self.start = clock()
        self.done: list[PhaseTime] = []
        self.width = 38

    def _write(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()

    def say(self, line: str) -> None:
        self._write(line + "\n")

    def elapsed(self) -> float:
        return self.clock() - self.start

    def run(self, name: str, fn: Callable[[], T], note: Callable[[T], str] | None = None) -> T:
        """Run phase ``name``; on an exception raise :class:`DemoPhaseError` naming it."""
        index = len(self.done) + 1
        log = None if self.verbose else self.log_dir / f"{index:02d}-{_slug(name)}.log"
        head = f"[{index}/{self.total}] {name:<{self.width}}"
        self._write(head + ("\n" if self.verbose else ""))
        t0 = self.clock()
        try:
            if log is None:
                result = fn()
            else:
                if log.exists():
                    log.unlink()
                with captured_output(log):
                    result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised with the phase's name
            dt = self.clock() - t0
            self._write(("" if not self.verbose else head) + f" FAILED after {dt:.1f} s\n")
            message = str(exc) or type(exc).__name__
            if not isinstance(exc, (ValueError, FileNotFoundError, DemoStepFailed)):
                message = f"{type(exc).__name__}: {message}"
            tail = log_tail(log)
            if tail:
                message += f"\n  last lines of its output:\n{tail}"
            raise DemoPhaseError(phase=name, message=message, log=log,
                                 finished=tuple(p.name for p in self.done)) from exc
        dt = self.clock() - t0
        if log is not None and log.is_file() and log.stat().st_size == 0:
            log.unlink()  # the phase printed nothing
        text = note(result) if note is not None else ""
        self.done.append(PhaseTime(name=name, seconds=dt, note=text))
        tail = f"{dt:6.1f} s   (total {self.elapsed():6.1f} s)" + (f"   {text}" if text else "")
        self._write((head if self.verbose else "") + tail + "\n")
        return result


class DemoStepFailed(RuntimeError):
    """A phase's work reported failure (its message is already user-facing)."""
