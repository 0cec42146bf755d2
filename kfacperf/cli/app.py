"""``kfacperf`` command line: parse, call the library, print.

Each subcommand lives in ``kfacperf/cli/commands/<name>.py`` with ``configure(parser)`` and
``run(args) -> int``.  Those modules import nothing heavy at module level, so ``--help`` and
the torch-free commands (simulate, report, validate) start fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kfacperf import __version__
from kfacperf.errors import UserError

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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"kfacperf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kfacperf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
