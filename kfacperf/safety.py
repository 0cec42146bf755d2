"""Safe input and output, shared by every part: refused overwrites, atomic writes, strict
reading of small files, strict JSON, finite numbers, and text made safe for a terminal.

Every check raises :class:`kfacperf.errors.UserError` (an output the user must change) or
``ValueError`` (an input that is wrong), with a one-line message that names the file, flag
or value; the command line prints it without a traceback.

API::

    check_output_file(path, *, force, flag="--out") -> Path   (never a measured trace's file)
    measured_trace_part(path) -> Path | None
    check_output_dir(path, *, force, flag="--out", replaceable=..., refuse=...) -> Path
    atomic_path(path)                  context manager: a temporary path, renamed on success
    atomic_write_text(path, text) -> Path
    read_small_file(path, *, what="file", max_bytes=...) -> str
    parse_json(text, *, source) -> Any       (no NaN/Infinity, no deep nesting)
    load_json_file(path, *, what="file") -> Any
    dumps_json(obj, **kwargs) -> str         (NaN and infinities written as null)
    require_finite(value, what) -> float
    terminal_safe(text, *, multiline=True) -> str

This module imports nothing heavy (no torch, no pandas): every part may use it.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kfacperf.errors import UserError

MAX_TEXT_BYTES = 64 * 2**20
"""The largest JSON or TOML file read (run.json, a model, a commbench raw file): 64 MiB."""

MAX_NESTING = 64
"""The deepest nesting of arrays/objects/tables accepted in a JSON or TOML input."""


# --------------------------------------------------------------------------- outputs


def check_output_file(path: str | os.PathLike[str], *, force: bool, flag: str = "--out",
                      note: str = "") -> Path:
    """Check that a file can be written at ``path``; an existing file needs ``force``.

    Refused with a :class:`UserError` naming ``flag``: a directory, a path under a file, a
    special file (FIFO, device), an existing file without ``force`` (``note`` says what the
    file is, e.g. "a committed preset"), and, ``force`` or not, a file of a measured trace
    (:func:`measured_trace_part`)."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise UserError(f"{flag} {str(path)!r}: give a file name")
    _check_parents(p, flag)
    trace = measured_trace_part(p)
    if trace is not None:
        raise UserError(f"{flag} {p} is part of the measured trace {trace}, which no command "
                        "overwrites (--force or not); give a file name outside it, or beside "
                        "its files under another name")
    if p.is_symlink() and not p.exists():
        raise UserError(f"{flag} {p}: a dangling symbolic link; remove it or give another name")
    if p.exists():
        mode = p.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{flag} {p} is a directory; give a file name")
        if not stat.S_ISREG(mode):
            raise UserError(f"{flag} {p} exists and is not a regular file")
        if not force:
            what = f" ({note})" if note else ""
            raise UserError(f"{flag} {p} already exists{what}; pass --force to overwrite it")
    return p


def measured_trace_part(path: str | os.PathLike[str]) -> Path | None:
    """The trace directory whose own file ``path`` would replace (None: none): one of
    :data:`kfacperf.trace.schema.TRACE_FILES` of a directory holding a trace's ``run.json``,
    or anything under its ``parts/``.  Followed through symbolic links; a file beside a
    trace's own under another name is not part of it."""
    from kfacperf.trace.schema import PARTS_DIR, RUN_FILE, TRACE_FILES

    try:
        target = Path(path).resolve()
    except (OSError, RuntimeError):  # a link loop: the writer will say what is wrong
        return None
    if target.name in TRACE_FILES and (target.parent / RUN_FILE).is_file():
        return target.parent
    for above in target.parents:
        if above.name == PARTS_DIR and (above.parent / RUN_FILE).is_file():
            return above.parent
    return None


def check_output_dir(path: str | os.PathLike[str], *, force: bool, flag: str = "--out",
                     replaceable: Callable[[Path], bool] | None = None,
                     refuse: Callable[[Path], str | None] | None = None) -> Path:
    """Check that directory ``path`` can receive an output: absent or empty, or, with
    ``force``, holding what ``replaceable`` accepts (default: anything).

    ``refuse(path)`` may return a reason never to write there, even with ``force`` (e.g. the
    directory holds a measured trace and the output is a prediction)."""
    p = Path(path)
    if str(path) == "":
        raise UserError(f"{flag}: give a directory")
    _check_parents(p, flag)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} exists and is not a directory")
    if p.is_dir():
        why = refuse(p) if refuse is not None else None
        if why:
            raise UserError(f"{flag} {p}: {why}")
        if any(p.iterdir()):
            if replaceable is not None and not replaceable(p):  # --force would not help
                raise UserError(f"{flag} {p} holds files this command did not write; "
                                "choose an empty or new directory")
            if not force:
                raise UserError(f"{flag} {p} already exists and is not empty; pass --force to "
                                "overwrite it")
    return p


def _check_parents(p: Path, flag: str) -> None:
    """Refuse a path whose nearest existing ancestor is not a directory."""
    parent = p.parent
    while not parent.exists():
        if parent == parent.parent:
            return
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {p}: {parent} is not a directory")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an error (removed otherwise), so no reader ever sees half a file."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# --------------------------------------------------------------------------- inputs


def regular_file(path: str | os.PathLike[str], *, what: str = "file",
                 hint: str = "") -> Path:
    """``path`` if it is a regular file (symbolic links followed), else a ``ValueError``
    (a directory, a FIFO that would block, a device such as /dev/zero) or the usual
    ``FileNotFoundError``; both name the file, the ValueError ends with ``hint`` (what to
    give instead) where there is one."""
    tail = f"; {hint}" if hint else ""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {p} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} {p}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {p} is a directory, not a file{tail}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {p} is not a regular file (a FIFO, socket or device){tail}")
    return p


def read_small_file(path: str | os.PathLike[str], *, what: str = "file",
                    max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``; every failure is a one-line
    error naming the file (``FileNotFoundError`` when it is missing, else ``ValueError``)."""
    p = regular_file(path, what=what)
    size = p.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{what} {p} is {size:,} bytes; the most read is {max_bytes:,}")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f"{what} {p}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{what} {p} is larger than {max_bytes:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {p}: not UTF-8 text (byte {exc.start})") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return value


def nesting_depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (a scalar: 0), without recursing."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_nesting(value: Any, *, source: str, limit: int = MAX_NESTING) -> Any:
    """``value``, or a ``ValueError`` naming ``source`` when it nests deeper than ``limit``."""
    if nesting_depth(value) > limit:
        raise ValueError(f"{source}: nested more than {limit} levels deep")
    return value


def parse_json(text: str, *, source: str) -> Any:
    """JSON text as Python values: strict (no NaN or Infinity), at most :data:`MAX_NESTING`
    levels deep; errors are ``ValueError`` naming ``source``."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column "
                         f"{exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{source}: nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from None
    return check_nesting(value, source=source)


def load_json_file(path: str | os.PathLike[str], *, what: str = "file") -> Any:
    """:func:`parse_json` of :func:`read_small_file`."""
    return parse_json(read_small_file(path, what=what), source=str(path))


def json_ready(obj: Any) -> Any:
    """``obj`` as plain JSON data: numpy scalars as Python numbers, NaN and infinities as
    ``None``, paths as strings; dicts, lists and tuples walked."""
    if isinstance(obj, float):  # numpy's float64 too
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:  # a numpy scalar
            return json_ready(obj.item())
        except (TypeError, ValueError):
            return obj
    return obj


def json_records(table: Any) -> list[dict[str, Any]]:
    """A DataFrame's rows as plain dicts for JSON: numpy scalars as Python numbers, NaN and
    infinities as ``None``."""
    return [json_ready(rec) for rec in table.to_dict(orient="records")]


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes valid JSON: NaN and infinities become ``null``."""
    return json.dumps(json_ready(obj), allow_nan=False, **kwargs)


# --------------------------------------------------------------------------- numbers


def require_finite(value: float, what: str) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``what`` when it is NaN or infinite."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} is not finite ({v})")
    return v


def check_all_finite(values: Iterable[tuple[str, float]]) -> None:
    """:func:`require_finite` of every ``(what, value)``."""
    for what, value in values:
        require_finite(value, what)


# --------------------------------------------------------------------------- terminal

# C0 controls but newline and tab, DEL, C1 controls, and the Unicode marks that reorder or
# hide text (bidirectional overrides and isolates, zero-width joiners are harmless and kept)
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: str, *, multiline: bool = True) -> str:
    """``text`` with every control character (escape sequences included) and every
    text-reordering mark written as a visible ``\\xNN`` / ``\\uNNNN`` escape; newlines and
    tabs stay unless ``multiline`` is false."""
    return (_UNSAFE if multiline else _UNSAFE_ONE_LINE).sub(_escape, str(text))


class TerminalSafeStream:
    """A text stream that writes everything through :func:`terminal_safe`: names from traces,
    run.json and models reach the terminal as text, never as control sequences."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(terminal_safe(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# --------------------------------------------------------------------------- libraries

SAFE_PYARROW = (14, 0, 1)
"""The first pyarrow that does not run code from a crafted Parquet file (CVE-2023-47248)."""


def check_pyarrow_version(version: str | None = None) -> None:
    """A :class:`UserError` when the pyarrow in use (or ``version``) predates
    :data:`SAFE_PYARROW`: traces come from other people, and reading one with such a pyarrow
    can run code (pyproject requires a fixed release; this guards environments that
    installed around it)."""
    if version is None:
        import pyarrow

        version = pyarrow.__version__
    numbers = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d+", part)
        numbers.append(int(digits.group()) if digits else 0)
    if tuple(numbers + [0] * (3 - len(numbers))) < SAFE_PYARROW:
        raise UserError(f"pyarrow {version} can run code from a crafted Parquet file "
                        f"(CVE-2023-47248); install pyarrow >= "
                        f"{'.'.join(map(str, SAFE_PYARROW))} (pip install -U pyarrow)")
