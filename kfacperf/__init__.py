"""kfacperf: profile, simulate and report distributed K-FAC / SP-NGD training.

``kfacperf.instrument(model, optimizer, out=...)`` profiles a training loop you wrote
(:mod:`kfacperf.runtime.loop`); it is imported on first use, so ``import kfacperf`` stays
light (the command line and the torch-free parts never load torch).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "instrument"]


def __getattr__(name: str) -> Any:
    if name == "instrument":
        from kfacperf.runtime.loop import instrument

        return instrument
    raise AttributeError(f"module 'kfacperf' has no attribute {name!r}")
