"""The ``kfacperf`` command line: :func:`main` parses, calls the library, prints.

Nothing in the package imports this one: it sits on top of every other part.
"""
from kfacperf.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
