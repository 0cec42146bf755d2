"""Fit device (and workload) models from traces."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5, help="training steps per run")


def run(args: argparse.Namespace) -> int:
    from kfacperf.cli import UserError

    raise UserError("`calibrate` is not built yet")
