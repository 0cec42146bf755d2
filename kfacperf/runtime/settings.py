"""The optimizer settings shared by a training step and a profiling run.

:class:`kfacperf.runtime.training.TrainConfig` (which needs torch) and
:class:`kfacperf.runtime.config.ProfileConfig` (which must not) both carry these fields, so
they are declared once here, in a module that imports nothing heavy.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kfacperf import vocab


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """First-order and K-FAC hyper-parameters plus the communication options of a strategy."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    damping: float = 1e-3
    factor_interval: int = 1
    inverse_interval: int = 1
    inverse_method: str = "eigen"
    factor_decay: float = 0.95
    kl_clip: float | None = 1e-3
    grad_worker_fraction: float = 1.0
    fused: bool = False
    comm_dtype: str = "fp32"
    symmetric: bool = False
    bucket_cap_mb: float = 25.0
    bn_blocks: str = vocab.BN_NONE
    fisher: str = vocab.FISHER_EMP
    batch_first: bool = True
    """Linear layers' inputs of three or more dimensions have the examples first (False:
    second, ``[T, N, F]``, a sequence-first model): :class:`kfacperf.kfac.layers.LinearLayer`."""

    def optimizer_settings(self) -> dict[str, Any]:
        """Just the fields declared here, by name."""
        return {f.name: getattr(self, f.name) for f in fields(OptimizerSettings)}
