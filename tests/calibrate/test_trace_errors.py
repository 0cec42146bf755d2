"""``kfacperf calibrate`` on a trace whose run.json lacks a key it needs: one line naming the
trace and the key (exit status 2), never a traceback, and no model written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kfacperf.cli import main

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "traces" / "reference" / "p1" / "resnet20-sgd-b16-r1"
needs_reference = pytest.mark.skipif(not REF.is_dir(), reason="no committed reference traces")


def _without(tmp_path: Path, key: str) -> Path:
    trace = tmp_path / f"no-{key}"
    shutil.copytree(REF, trace)
    run = json.loads((trace / "run.json").read_text())
    del run[key]
    (trace / "run.json").write_text(json.dumps(run))
    return trace


@needs_reference
@pytest.mark.parametrize(("key", "says"), [
    ("batch_per_rank", "run.json has no 'batch_per_rank'"),  # was a KeyError traceback
    ("workload", "run.json has no 'workload'"),  # was named "run", not the trace
])
def test_a_missing_key_names_the_trace(tmp_path, capsys, key, says) -> None:
    trace = _without(tmp_path, key)
    out = tmp_path / "never.toml"
    assert main(["calibrate", str(trace), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kfacperf calibrate: error: {trace}: {says}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
