"""The compute precision of a profiled run: ``fp32``, ``tf32`` or ``bf16``.

The names are the vocabulary's compute dtypes (:data:`kfacperf.vocab.COMPUTE_DTYPES`, the
dtypes a device model has a peak rate for; calibration fits a run's forward and backward
against the peak of its precision):

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
imports :data:`DEFAULT_PRECISION`, is torch-free).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from kfacperf import vocab as S

DEFAULT_PRECISION = S.FP32


def check(precision: object) -> str:
    """``precision`` if it is one of :data:`kfacperf.vocab.COMPUTE_DTYPES`, else a
    ``ValueError`` naming it."""
    return S.check_choice("precision", precision, S.COMPUTE_DTYPES)


def allows_tf32(precision: str) -> bool:
    """Whether float32 matmuls and convolutions may use TF32 under ``precision``."""
    return check(precision) != S.FP32


def autocast_dtype(precision: str) -> Any:
    """The ``torch.autocast`` dtype of the forward pass (None: no autocast)."""
    import torch

    return torch.bfloat16 if check(precision) == S.BF16 else None


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


@contextlib.contextmanager
def denormals_flushed(device_type: str) -> Iterator[bool]:
    """On the CPU, flush denormal numbers to zero inside the block (off again after); yields
    whether it is on.  A profiled run cycles through a few batches, which a small model
    learns by heart: its gradients then sink into denormals, which x86 cores compute tens of
    times slower (one layer's preconditioning went from about 1 ms to 2 s), a cost no GPU
    run has.  On a GPU it is left alone (the CPU computes nothing that matters there)."""
    import torch

    flushed = device_type == "cpu" and bool(torch.set_flush_denormal(True))
    try:
        yield flushed
    finally:
        if flushed:
            torch.set_flush_denormal(False)
