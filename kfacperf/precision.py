"""The compute precision of a profiled run: ``fp32``, ``tf32`` or ``bf16``.

The names are the simulator's compute dtypes (:data:`kfacperf.sim.models.device.DTYPES`):

* ``fp32``: IEEE float32 everywhere.  On a GPU this switches TF32 *off* for cuBLAS matmuls
  and for cuDNN convolutions; note that PyTorch's own default is neither this nor ``tf32``
  (it lets cuDNN convolutions use TF32 and keeps matmuls in IEEE float32).
* ``tf32``: float32 tensors, with TF32 tensor cores allowed for matmuls and convolutions.
* ``bf16``: forward pass and loss under ``torch.autocast(dtype=torch.bfloat16)``
  (convolutions and matmuls in bfloat16, reductions such as the loss in float32), the usual
  mixed-precision recipe; backward follows the forward's dtypes, and the float32 work outside
  autocast (K-FAC's factors, inverses and preconditioning, the optimizer) may use TF32 as in
  ``tf32``.  The K-FAC factors stay float32 (:mod:`kfacperf.kfac.layers`).

On a CPU the TF32 switches change nothing; ``bf16`` runs CPU autocast.

This module imports torch only inside its functions (the profile configuration, which
imports :data:`PRECISIONS`, is torch-free).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
DEFAULT_PRECISION = "fp32"


def check(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def allows_tf32(precision: str) -> bool:
    """Whether float32 matmuls and convolutions may use TF32 under ``precision``."""
    return check(precision) != "fp32"


def autocast_dtype(precision: str) -> Any:
    """The ``torch.autocast`` dtype of the forward pass (None: no autocast)."""
    import torch

    return torch.bfloat16 if check(precision) == "bf16" else None


def autocast(precision: str, device_type: str) -> AbstractContextManager[Any]:
    """The forward pass's autocast context for ``precision`` on ``device_type``."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device_type, dtype=dtype)


def current_flags() -> dict[str, bool]:
    """torch's TF32 switches as they are now (what ``run.json`` records)."""
    import torch

    return {"matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32)}


def run_flags(precision: str) -> dict[str, Any]:
    """What ``run.json`` records under ``precision_flags``: the TF32 switches as they are now
    and the forward pass's autocast dtype (None: no autocast)."""
    dtype = autocast_dtype(precision)
    return {**current_flags(), "autocast": None if dtype is None else str(dtype).split(".")[-1]}


@contextlib.contextmanager
def float32_math(precision: str) -> Iterator[dict[str, bool]]:
    """Set the TF32 switches for ``precision`` inside the block, restore them after.

    Yields the switches as set.  Only the long-standing ``allow_tf32`` attributes are used,
    for setting and for reading: recent torch also has ``fp32_precision`` attributes, and a
    process that sets the switches through one interface and reads them through the other
    gets a ``RuntimeError``.
    """
    import torch

    tf32 = allows_tf32(precision)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = tf32
    cudnn.allow_tf32 = tf32
    try:
        yield current_flags()
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
