"""Strict TOML reading and a tiny TOML writer for the model files under ``models/``.

Reading uses :mod:`tomllib`; every table is then walked with a :class:`Table`, which hands out
typed values key by key and, once the caller is done, rejects any key it did not ask for.
Every error is a :class:`ValueError` that names the file and the dotted key, e.g.::

    models/clusters/x.toml: key 'inter.bandwidth_GBps': must be > 0, got -25

Units live in key names (``alpha_us``, ``bandwidth_GBps``, ``fp32_tflops``).  An unknown key
whose stem matches a known key with another unit suffix (``alpha_ms`` for ``alpha_us``) is
reported as a wrong unit.

The writer handles exactly what the models need: strings, ints, finite floats, bools, lists of
scalars, nested tables and arrays of tables, plus ``#`` comment lines at the top.
"""
from __future__ import annotations

import builtins
import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - Python 3.10
    import tomli as _toml

_UNIT_SUFFIXES = (
    "us", "ms", "ns", "s", "GBps", "Gbps", "MBps", "GiBps", "Bps", "tflops", "gflops",
    "TFLOPS", "GFLOPS", "flops", "bytes", "GB", "MB", "KB",
)


def read_toml(path: str | Path, *, fmt: str | tuple[str, ...] | None = None) -> Table:
    """Parse ``path`` and return its root :class:`Table` (errors name the file).

    With ``fmt``, the file's ``format`` key must equal it, or one of them (model files name
    their format; a reader of several formats asks ``root.str("format")`` which one it got).
    """
    from kfacperf.safety import check_nesting, read_small_file

    p = Path(path)
    try:
        text = read_small_file(p, what="model file")
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such model file") from None
    try:
        data = check_nesting(_toml.loads(text), source=str(p))
    except _toml.TOMLDecodeError as exc:
        raise ValueError(f"{p}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ValueError(f"{p}: nested too deeply") from None
    root = Table(data, source=str(p), prefix="")
    if fmt is not None:
        got = root.str("format")
        allowed = (fmt,) if isinstance(fmt, str) else fmt
        if got not in allowed:
            expected = " or ".join(repr(f) for f in allowed)
            raise root.error("format", f"expected {expected}, got {got!r}")
    return root


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _stem(key: str) -> tuple[str, str]:
    for suffix in _UNIT_SUFFIXES:
        if key.endswith("_" + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, ""


class Table:
    """A TOML table being read strictly: typed getters, then :meth:`done`.

    The getters are named after the types they return, so inside this class the names ``str``,
    ``bool``, ``int`` and ``float`` mean the methods; annotations spell the types
    ``builtins.str`` and so on.
    """

    def __init__(self, data: Mapping[str, Any], *, source: str, prefix: str) -> None:
        self._data = dict(data)
        self._seen: set[str] = set()
        self.source = source
        self.prefix = prefix

    # -- errors ---------------------------------------------------------------------------
    def key_path(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def error(self, key: str, message: str) -> ValueError:
        return ValueError(f"{self.source}: key '{self.key_path(key)}': {message}")

    def _get(self, key: str) -> Any:
        self._seen.add(key)
        if key not in self._data:
            stem, unit = _stem(key)
            for other in self._data:
                ostem, ounit = _stem(other)
                if unit and ounit and ostem == stem and ounit != unit:
                    raise self.error(
                        other, f"wrong unit '{ounit}': this value is given in '{unit}' as '{key}'"
                    )
            raise ValueError(f"{self.source}: missing key '{self.key_path(key)}'")
        return self._data[key]

    def has(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> list[str]:
        return list(self._data)

    def raw(self, key: str) -> Any:
        """The value as parsed, unchecked (for free-form tables such as workload options)."""
        return self._get(key)

    # -- typed getters --------------------------------------------------------------------
    def str(self, key: str, *, choices: Iterable[str] | None = None, nonempty: bool = True) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type_name(value)} {value!r}")
        if nonempty and not value:
            raise self.error(key, "must not be empty")
        if choices is not None:
            allowed = tuple(choices)
            if value not in allowed:
                raise self.error(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
        return value

    def bool(self, key: builtins.str) -> builtins.bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_type_name(value)} {value!r}")
        return value

    def int(self, key: builtins.str, *, minimum: builtins.int | None = None) -> builtins.int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_type_name(value)} {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def float(
        self,
        key: builtins.str,
        *,
        positive: builtins.bool = False,
        nonnegative: builtins.bool = False,
        maximum: builtins.float | None = None,
    ) -> builtins.float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {_type_name(value)} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise self.error(key, f"must be finite, got {value}")
        if positive and value <= 0:
            raise self.error(key, f"must be > 0, got {value:g}")
        if nonnegative and value < 0:
            raise self.error(key, f"must be >= 0, got {value:g}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be <= {maximum:g}, got {value:g}")
        return value

    def int_list(
        self, key: builtins.str, *, minimum: builtins.int | None = None
    ) -> list[builtins.int]:
        value = self._get(key)
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise self.error(key, f"expected an array of integers, got {value!r}")
        if minimum is not None and any(v < minimum for v in value):
            raise self.error(key, f"every entry must be >= {minimum}, got {value!r}")
        return list(value)

    def str_list(self, key: builtins.str) -> list[builtins.str]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected an array of strings, got {value!r}")
        return list(value)

    def table(self, key: builtins.str) -> Table:
        value = self._get(key)
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_type_name(value)} {value!r}")
        return Table(value, source=self.source, prefix=f"{self.key_path(key)}.")

    def tables(self, key: builtins.str) -> list[Table]:
        """An array of tables (``[[key]]``); an absent key is an error like any other."""
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"expected an array of tables, got {_type_name(value)}")
        return [
            Table(v, source=self.source, prefix=f"{self.key_path(key)}[{i}].")
            for i, v in enumerate(value)
        ]

    def done(self) -> None:
        """Reject every key that no getter asked for (naming it, with a unit hint)."""
        unknown = [k for k in self._data if k not in self._seen]
        if not unknown:
            return
        key = unknown[0]
        stem, unit = _stem(key)
        for known in sorted(self._seen):
            kstem, kunit = _stem(known)
            if unit and kunit and kstem == stem and kunit != unit:
                raise self.error(
                    key, f"wrong unit '{unit}': this value is given in '{kunit}' as '{known}'"
                )
        known_list = ", ".join(sorted(self._seen)) or "(none)"
        raise self.error(key, f"unknown key; the known keys here are: {known_list}")


# ---------------------------------------------------------------------------------------------
# writer
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(value: str) -> str:
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite float {value} at '{where}'")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v, where) for v in value) + "]"
    raise ValueError(f"cannot write {type(value).__name__} at '{where}' as TOML")


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(_is_table(v) for v in value)


def _emit(lines: list[str], table: Mapping[str, Any], path: list[str]) -> None:
    scalars = [(k, v) for k, v in table.items() if not _is_table(v) and not _is_table_array(v)]
    for k, v in scalars:
        lines.append(f"{_key(k)} = {_scalar(v, '.'.join(path + [k]))}")
    for k, v in table.items():
        if _is_table(v):
            sub = path + [k]
            only_tables = bool(v) and all(_is_table(x) or _is_table_array(x) for x in v.values())
            if not only_tables:  # a table of tables needs no header of its own
                lines.append("")
                lines.append("[" + ".".join(_key(p) for p in sub) + "]")
            _emit(lines, v, sub)
        elif _is_table_array(v):
            sub = path + [k]
            for item in v:
                lines.append("")
                lines.append("[[" + ".".join(_key(p) for p in sub) + "]]")
                _emit(lines, item, sub)


def dumps_toml(data: Mapping[str, Any], *, header: Iterable[str] = ()) -> str:
    """``data`` as TOML text; ``header`` lines become ``#`` comments at the top.

    Within a table, plain values come first, then sub-tables, then arrays of tables, in the
    mapping's order, so files stay readable and diffs stable.
    """
    lines = [f"# {h}".rstrip() for h in header]
    if lines:
        lines.append("")
    _emit(lines, data, [])
    text = "\n".join(lines).lstrip("\n")
    return text + "\n"


def write_toml(path: str | Path, data: Mapping[str, Any], *, header: Iterable[str] = ()) -> Path:
    """Write ``data`` to ``path`` atomically (creating parent folders) and return the path.
    Callers check first whether an existing file may be replaced
    (:func:`kfacperf.sim.models.presets.check_model_out`)."""
    from kfacperf.safety import atomic_write_text

    return atomic_write_text(path, dumps_toml(data, header=header))
