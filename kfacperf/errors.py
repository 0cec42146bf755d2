"""Errors the command line prints as one line, without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input (a bad flag, a missing file, a refused overwrite)."""
