"""Model definitions and deterministic synthetic data.

A name is a built-in workload (:data:`WORKLOAD_NAMES`) or the user's own factory,
``FILE.py:FUNC`` or ``package.module:FUNC`` (:mod:`kfacperf.workloads.user`).

>>> w = get_workload("teacher")
>>> model = w.build_model(seed=0)
>>> x, y = w.make_batch(w.default_batch_size, seed=0, step=0)
>>> loss = w.loss_fn(model(x), y)

The models need torch; reading a workload's *name* does not.  The torch-free parts of the
package (the simulator, the calibration) read names through :mod:`.reference`, so this
package's own names are loaded on first use rather than on import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Workload, rank_slice
    from .registry import WORKLOAD_NAMES, get_workload, workload_options

__all__ = ["WORKLOAD_NAMES", "Workload", "get_workload", "rank_slice", "workload_options"]

_HOME = {"Workload": ".base", "rank_slice": ".base", "WORKLOAD_NAMES": ".registry",
         "get_workload": ".registry", "workload_options": ".registry"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value
