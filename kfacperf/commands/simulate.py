"""Predict step time: workload x device x cluster x strategy x GPU counts."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5, help="training steps per run")


def run(args: argparse.Namespace) -> int:
    from kfacperf.cli import UserError

    raise UserError("`simulate` is not built yet")
