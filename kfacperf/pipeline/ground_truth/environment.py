"""The machine a ground-truth run measured (``env.json``): Python, torch and its libraries,
the device as torch sees it, the other packages, and the run's own settings."""
from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from kfacperf.pipeline.ground_truth.plan import Settings

PACKAGES = ("numpy", "pandas", "pyarrow", "pynvml", "nvtx", "simpy", "plotly")
"""Packages whose versions are recorded (a missing one is recorded as missing)."""


def environment(settings: Settings, argv: Sequence[str]) -> dict[str, Any]:
    """Everything ``env.json`` holds; ``device`` is
    :func:`kfacperf.bench.kernels.describe_device` of the device the plan runs on."""
    import torch

    from kfacperf import __version__
    from kfacperf.bench.kernels import describe_device

    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "hostname": platform.node(), "kfacperf": __version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "nccl": nccl_version(torch),
        "device": describe_device(torch.device(settings.device)),
        "packages": package_versions(),
        "argv": list(argv), "settings": asdict(settings),
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def nccl_version(torch: Any) -> str | None:
    """NCCL's version as ``major.minor.patch`` (None: no NCCL in this torch build)."""
    try:
        v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
    except Exception:  # no NCCL in this build
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def package_versions() -> dict[str, str]:
    """Each of :data:`PACKAGES`: its version, or why it cannot be imported."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = str(getattr(__import__(name), "__version__", "?"))
        except Exception as exc:  # recorded, not fatal: the run says what it had
            versions[name] = f"missing: {exc}"
    return versions
