"""Model definitions and deterministic synthetic data.

>>> w = get_workload("teacher")
>>> model = w.build_model(seed=0)
>>> x, y = w.make_batch(w.default_batch_size, seed=0, step=0)
>>> loss = w.loss_fn(model(x), y)
"""
from .base import Workload, rank_slice
from .registry import WORKLOAD_NAMES, get_workload, workload_options

__all__ = ["WORKLOAD_NAMES", "Workload", "get_workload", "rank_slice", "workload_options"]
