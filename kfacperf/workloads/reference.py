"""A reference to the user's own workload factory: ``FILE.py:FUNC`` or ``package.module:FUNC``.

``kfacperf profile --workload`` and ``kfacperf calibrate --workload`` take a registry name
(``resnet20``) or such a reference.  This module only reads the text and the file: it never
imports torch and never runs the user's code (:mod:`kfacperf.workloads.user` does that).

* :func:`is_reference` tells a reference from a registry name (a registry name has no ``:``).
* :func:`absolute` makes a file reference absolute, so every rank of a run, and every later
  reader of its ``run.json``, finds the same file whatever its working directory.
* :func:`match_key` is what a workload model and a run are matched on: the file's base name
  and the function (``my_model.py:build``) or the module reference itself, so a trace still
  finds its workload model after the file or the trace moved.  The file's content hash
  (:func:`file_sha256`, recorded as the run's and the model's ``fingerprint``) tells two
  versions of one file apart.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")

FORMS = "FILE.py:FUNC or package.module:FUNC"


@dataclass(frozen=True)
class WorkloadRef:
    """A parsed reference: ``kind`` is ``"file"`` (``target`` a path) or ``"module"``."""

    kind: str
    target: str
    function: str

    @property
    def text(self) -> str:
        return f"{self.target}:{self.function}"

    @property
    def display(self) -> str:
        """Short form for messages and names: the file's base name (not its folder)."""
        return f"{Path(self.target).name if self.kind == 'file' else self.target}:{self.function}"

    @property
    def slug(self) -> str:
        """A file-name-safe form (``my_model-build``), for default output paths."""
        base = Path(self.target).stem if self.kind == "file" else self.target
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{base}-{self.function}")


def is_reference(name: str) -> bool:
    """Whether ``name`` is meant as a reference (it has a ``:``, or names a ``.py`` file)."""
    return ":" in name or name.endswith(".py")


def parse(name: str) -> WorkloadRef:
    """Parse ``FILE.py:FUNC`` or ``package.module:FUNC``; a malformed one is a ``ValueError``."""
    target, sep, function = name.rpartition(":")
    if not sep:
        raise ValueError(f"--workload {name!r}: name the factory function too, as {name}:FUNC "
                         f"({FORMS})")
    if not _IDENT.match(function):
        raise ValueError(f"--workload {name!r}: {function!r} is not a function name ({FORMS})")
    if target.endswith(".py"):
        return WorkloadRef("file", target, function)
    if not _MODULE.match(target):
        raise ValueError(f"--workload {name!r}: {target!r} is neither a .py file nor a dotted "
                         f"module name ({FORMS})")
    return WorkloadRef("module", target, function)


def absolute(name: str) -> str:
    """``name`` with a file reference's path made absolute (other names unchanged)."""
    if not is_reference(name):
        return name
    ref = parse(name)
    if ref.kind != "file":
        return name
    return WorkloadRef("file", os.path.abspath(os.path.expanduser(ref.target)), ref.function).text


def match_key(name: str) -> str:
    """What a run's workload and a workload model's are compared by (see the module doc)."""
    if not is_reference(name):
        return name
    try:
        return parse(name).display
    except ValueError:
        return name


def label(name: str) -> str:
    """A file-name-safe label of a workload: the name itself, or a reference's slug."""
    if not is_reference(name):
        return name
    try:
        return parse(name).slug
    except ValueError:
        return name


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
