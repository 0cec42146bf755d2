"""``kfacperf`` command line: parse, call the library, print.

Each subcommand lives in ``kfacperf/cli/commands/<name>.py`` with ``configure(parser)`` and
``run(args) -> int``.  Those modules import nothing heavy at module level, so ``--help`` and
the torch-free commands (simulate, report, validate) start fast.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from kfacperf import __version__
from kfacperf.errors import Terminated, UserError, signal_name, signal_status
from kfacperf.safety import TerminalSafeStream, terminal_safe

# (name, module, one-line help) in the order of the data flow.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("demo", "demo", "the whole pipeline on this machine with defaults"),
    ("profile", "profile", "run a workload with an optimizer/strategy and write a trace"),
    ("export", "export", "export a trace (Chrome/Perfetto JSON)"),
    ("commbench", "commbench", "measure collectives here and fit alpha-beta per collective"),
    ("calibrate", "calibrate", "traces -> device (and workload) models"),
    ("simulate", "simulate", "workload x device x cluster x strategy x GPU counts -> predictions"),
    ("report", "report", "traces and predictions -> one HTML page"),
    ("validate", "validate", "predict held-out measured runs and report the error"),
    ("plan", "plan", "time to solution and the best strategy per GPU count on a cluster"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kfacperf",
        description="Profile, simulate and report distributed K-FAC / SP-NGD training.",
    )
    parser.add_argument("--version", action="version", version=f"kfacperf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        mod = importlib.import_module(f"kfacperf.cli.commands.{module}")
        # the docstrings are laid out by hand (examples on their own lines): keep their breaks
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.configure(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: exit status 0 on success, 2 for bad input, 1 when the system refused
    (a file it cannot write, memory), 128 + N after signal N.  Whatever the command prints
    goes through :func:`kfacperf.safety.terminal_safe`."""
    with terminal_safe_output(), signals_as_interrupts():
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_module", None) is None:
            parser.print_help()
            return 2
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    def fail(message: object, status: int) -> int:
        text = terminal_safe(str(message)).strip() or "(no message)"
        print(f"kfacperf {args.command}: error: {text}", file=sys.stderr)
        return status

    try:
        return int(args._module.run(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # from the system, not a check
            return fail(describe_os_error(exc), 1)
        return fail(exc, 2)
    except RecursionError:
        return fail("an input is nested too deeply to read", 2)
    except MemoryError:
        return fail("out of memory; a smaller input (fewer GPU counts, steps or traces) "
                    "needs less", 1)
    except BrokenPipeError:  # the reader went away (kfacperf ... | head)
        return 1
    except OSError as exc:
        return fail(describe_os_error(exc), 1)
    except KeyboardInterrupt as exc:
        print(f"kfacperf {args.command}: interrupted ({signal_name(exc)})", file=sys.stderr)
        return signal_status(exc)


def describe_os_error(exc: OSError) -> str:
    """One line for an error of the operating system, naming the file."""
    why = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        why = "no space left on the device"
    names = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(names)}: {why}" if names else why


@contextmanager
def terminal_safe_output() -> Iterator[None]:
    """Route ``sys.stdout`` and ``sys.stderr`` through :class:`TerminalSafeStream`."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TerminalSafeStream(saved[0]), TerminalSafeStream(saved[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt) instead of killing
    the process, so a command stopped by a scheduler or ``timeout`` cleans up like Ctrl-C.
    A signal the parent set to be ignored (``nohup``) stays ignored."""
    def raise_terminated(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    saved = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                saved[sig] = signal.signal(sig, raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
