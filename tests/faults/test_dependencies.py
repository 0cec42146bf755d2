"""Reading other people's traces must not run their code: pyarrow before 14.0.1 does, from a
crafted Parquet file (CVE-2023-47248).  The package requires a fixed release, and refuses to
read Parquet with an older one installed around that requirement."""
from __future__ import annotations

import re

import pytest

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from helpers.faults import REPO, TRACE_1P


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_the_pyarrow_floor_is_a_fixed_release():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in deps if d.split(">")[0].strip() == "pyarrow"]
    floor = version_tuple(spec.split(">=", 1)[1])
    assert floor >= (14, 0, 1), spec
    import pyarrow

    assert version_tuple(pyarrow.__version__) >= floor


@pytest.mark.parametrize("version", ["14.0.0", "13.0.0", "0.17.1", "14.0.0.dev123"])
def test_an_unsafe_pyarrow_is_refused_before_reading(version, monkeypatch):
    import pyarrow

    from kfacperf.errors import UserError
    from kfacperf.trace.store import load_trace

    monkeypatch.setattr(pyarrow, "__version__", version)
    with pytest.raises(UserError, match=f"pyarrow {re.escape(version)} can run code"):
        load_trace(TRACE_1P)


@pytest.mark.parametrize("version", ["14.0.1", "14.0.2", "21.0.0", "26.0.1"])
def test_a_fixed_pyarrow_is_accepted(version):
    from kfacperf.safety import check_pyarrow_version

    check_pyarrow_version(version)


def test_python_3_10_gets_a_toml_reader():
    """The package supports Python 3.10, which has no tomllib; every model file is TOML."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    [spec] = [d for d in project["dependencies"] if d.startswith("tomli")]
    assert "python_version < '3.11'" in spec, spec
