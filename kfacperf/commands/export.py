"""Run the whole pipeline on this machine with defaults."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5, help="training steps per run")


def run(args: argparse.Namespace) -> int:
    from kfacperf.cli import UserError

    raise UserError("`export` is not built yet")
