"""scripts/gpu-ground-truth.sh without --dry-run, as far as a machine without CUDA takes it:
the wheels' installation, up to the driver's start."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-ground-truth.sh"


def make_wheel(folder: Path, name: str, tag: str) -> Path:
    """A minimal wheel of one module ``name`` for the platform ``tag``
    (``py3-none-any`` installs anywhere)."""
    dist = f"{name}-1.0.dist-info"
    path = folder / f"{name}-1.0-{tag}.whl"
    files = {
        f"{name}/__init__.py": "VALUE = 1\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         f"Tag: {tag}\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, text in {**files, f"{dist}/RECORD": record}.items():
            z.writestr(n, text)
    return path


@pytest.mark.slow
def test_a_wheel_that_does_not_install_is_named_and_the_run_goes_on(tmp_path):
    """One wheel the machine cannot take (another platform's) costs that wheel alone: the
    others install, the run goes on to the driver, and wheels.txt names the one left out."""
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no pip for this interpreter")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    good = make_wheel(wheels, "gtwheel_ok", "py3-none-any")
    bad = make_wheel(wheels, "gtwheel_bad", "cp27-cp27m-win32")
    site, out, returned = tmp_path / "site", tmp_path / "out", tmp_path / "returned"
    env = dict(os.environ, PYTHON=sys.executable, GPU_GROUND_TRUTH_SITE=str(site),
               PYTHONWARNINGS="ignore")
    env.pop("OUT", None)
    # budget 0: where CUDA is there, the time guard skips every task at once
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--return", str(returned),
                           "--wheels", str(wheels), "--budget-s", "0", "--no-nsys"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = (out / "ground-truth.log").read_text()
    assert "running: " in log, proc.stdout[-3000:] + proc.stderr[-3000:]  # the driver started
    assert proc.returncode != 3
    assert (site / "gtwheel_ok" / "__init__.py").is_file()
    assert not (site / "gtwheel_bad").exists()
    listed = (out / "wheels.txt").read_text().splitlines()
    assert listed == [str(good), f"not installed: {bad}"]
    assert "did not install" in log and bad.name in log
    assert (returned / "ground-truth.tar.gz").is_file()


def test_a_budget_not_in_whole_seconds_is_refused_before_anything_runs(tmp_path):
    """bash's arithmetic takes whole seconds only: --budget-s 470.5 would stop the script
    after its set-up, with the device's time spent; it is refused at once instead."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--budget-s", "470.5", "--out", str(out),
                           "--wheels", str(tmp_path / "none")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--budget-s wants whole seconds" in proc.stderr
    assert not out.exists()
