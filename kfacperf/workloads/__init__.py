"""Model definitions and deterministic synthetic data.

A name is a built-in workload (:data:`WORKLOAD_NAMES`) or the user's own factory,
``FILE.py:FUNC`` or ``package.module:FUNC`` (:mod:`kfacperf.workloads.user`).

>>> w = get_workload("teacher")
>>> model = w.build_model(seed=0)
>>> x, y = w.make_batch(w.default_batch_size, seed=0, step=0)
>>> loss = w.loss_fn(model(x), y)
"""
from .base import Workload, rank_slice
from .registry import WORKLOAD_NAMES, get_workload, workload_options

__all__ = ["WORKLOAD_NAMES", "Workload", "get_workload", "rank_slice", "workload_options"]
