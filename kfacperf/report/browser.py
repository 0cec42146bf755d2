"""Headless Chromium: load a report from file:// to check it renders, or take a screenshot.

Uses Debian's ``chromium`` (``scripts/ensure-chromium.sh`` installs it); a fresh profile
directory per call and every background feature off, so a run never touches the network.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_BASE_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """Path of a Chromium executable on PATH, or None."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _require_chromium() -> str:
    path = find_chromium()
    if path is None:
        raise FileNotFoundError(
            "chromium not found on PATH; install it with scripts/ensure-chromium.sh "
            "(or `apt-get install chromium`)"
        )
    return path


@dataclass(frozen=True, kw_only=True)
class PageLoad:
    """What Chromium saw: the serialized DOM after scripts ran, and the console/browser log."""

    dom: str
    log: str

    @property
    def uncaught_errors(self) -> list[str]:
        """Console lines reporting an uncaught JavaScript error."""
        return [line for line in self.log.splitlines() if "Uncaught" in line]

    @property
    def plot_count(self) -> int:
        """Number of plotly figures drawn."""
        return self.dom.count('class="plot-container plotly"')


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="kfacperf-chromium-") as profile:
        cmd = [_require_chromium(), *_BASE_FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-1500:]}")
    return proc


def load_page(page: str | Path, *, budget_ms: int = 15000, timeout_s: float = 180) -> PageLoad:
    """Load ``page`` from file://, let its scripts run for ``budget_ms`` of virtual time, and
    return the DOM and the log (``--enable-logging=stderr`` prints console messages)."""
    uri = Path(page).resolve().as_uri()
    proc = _run([f"--virtual-time-budget={budget_ms}", "--enable-logging=stderr", "--v=0",
                 "--dump-dom", uri], timeout_s)
    return PageLoad(dom=proc.stdout, log=proc.stderr)


def screenshot(page: str | Path, png: str | Path, *, width: int = 1280, height: int = 1500,
               scale: float = 0.6, budget_ms: int = 15000, timeout_s: float = 180) -> Path:
    """Save a PNG of the top ``width`` x ``height`` CSS pixels of ``page``, scaled by
    ``scale`` (a smaller file for a README)."""
    from kfacperf.safety import atomic_path

    out = Path(png)
    uri = Path(page).resolve().as_uri()
    # chromium writes into a folder of its own; the PNG then replaces ``png`` atomically
    with tempfile.TemporaryDirectory(prefix="kfacperf-shot-") as tmp:
        shot = Path(tmp) / "page.png"
        _run([f"--window-size={width},{height}", f"--force-device-scale-factor={scale}",
              f"--virtual-time-budget={budget_ms}", f"--screenshot={shot}", uri], timeout_s)
        if not shot.is_file():
            raise RuntimeError(f"chromium did not write the screenshot of {page}")
        with atomic_path(out) as target:
            shutil.copyfile(shot, target)
    return out
