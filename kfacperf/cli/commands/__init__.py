"""One module per subcommand: ``configure(parser)`` and ``run(args) -> int``; no heavy imports
at module level."""
from __future__ import annotations

import argparse


def key_value(text: str) -> tuple[str, object]:
    """argparse type for ``KEY=VALUE`` options; VALUE is JSON when it parses, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    from kfacperf.safety import parse_json

    try:
        return key, parse_json(value, source=key)
    except ValueError:
        return key, value


def positive_int(text: str) -> int:
    """argparse type for a whole number >= 1 (the error names the flag through argparse)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value
