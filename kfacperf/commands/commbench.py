"""Measure collectives on this machine and fit alpha-beta per collective."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5, help="training steps per run")


def run(args: argparse.Namespace) -> int:
    from kfacperf.cli import UserError

    raise UserError("`commbench` is not built yet")
