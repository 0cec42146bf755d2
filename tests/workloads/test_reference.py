"""Workload references (``FILE.py:FUNC``, ``package.module:FUNC``) read without torch."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kfacperf.workloads import reference


def test_registry_names_are_not_references() -> None:
    assert not reference.is_reference("resnet50")
    assert reference.absolute("resnet50") == "resnet50"
    assert reference.match_key("resnet50") == "resnet50"
    assert reference.label("resnet50") == "resnet50"


def test_a_file_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ref = reference.parse("models/my net.py:build")
    assert (ref.kind, ref.target, ref.function) == ("file", "models/my net.py", "build")
    assert ref.display == "my net.py:build"  # the base name, not the folder
    assert ref.slug == "my_net-build"
    absolute = reference.absolute("models/my net.py:build")
    assert absolute == f"{tmp_path}{os.sep}models{os.sep}my net.py:build"
    # a run and a model match on the base name, wherever the file lies
    assert reference.match_key(absolute) == reference.match_key("my net.py:build")


def test_a_module_reference_stays_as_written() -> None:
    ref = reference.parse("pkg.sub.models:make")
    assert (ref.kind, ref.target, ref.function) == ("module", "pkg.sub.models", "make")
    assert reference.absolute("pkg.sub.models:make") == "pkg.sub.models:make"
    assert reference.label("pkg.sub.models:make") == "pkg.sub.models-make"


@pytest.mark.parametrize(("text", "says"), [
    ("model.py", "name the factory function too"),
    ("model.py:1build", "is not a function name"),
    ("not a module:build", "neither a .py file nor a dotted module name"),
])
def test_malformed_references_say_what_is_wrong(text: str, says: str) -> None:
    assert reference.is_reference(text)
    with pytest.raises(ValueError, match=says):
        reference.parse(text)
    assert reference.match_key(text) == text  # matching never raises


def test_file_sha256(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_bytes(b"def build(): pass\n")
    assert reference.file_sha256(f) == hashlib.sha256(b"def build(): pass\n").hexdigest()


def test_reading_a_reference_does_not_import_torch() -> None:
    code = ("import sys\nfrom kfacperf.workloads import reference\n"
            "reference.match_key('m.py:build')\nprint('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
