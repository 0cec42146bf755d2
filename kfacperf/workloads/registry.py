"""Name -> workload lookup.

``get_workload(name, **options)`` builds the :class:`~kfacperf.workloads.base.Workload`;
``options`` are the keyword arguments of that workload's factory (for example
``get_workload("resnet50", image_size=64)``) and an unknown one is a ``ValueError``.
A name of the form ``FILE.py:FUNC`` or ``package.module:FUNC`` is the user's own factory
(:mod:`kfacperf.workloads.user`).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from . import reference as workload_ref
from .base import Workload
from .bert import bert_base_block_workload, bert_large_block_workload, bert_large_workload
from .gpt2 import gpt2_xl_workload
from .mlp import mlp_workload
from .resnet_cifar import resnet20_workload, resnet32_workload
from .resnet_imagenet import resnet50_workload
from .synthetic import teacher_workload
from .transformer import transformer_workload

_FACTORIES: dict[str, Callable[..., Workload]] = {
    "mlp": mlp_workload,
    "resnet20": resnet20_workload,
    "resnet32": resnet32_workload,
    "resnet50": resnet50_workload,
    "transformer": transformer_workload,
    "teacher": teacher_workload,
    "bert-large": bert_large_workload,
    "bert-large-block": bert_large_block_workload,
    "bert-base-block": bert_base_block_workload,
    "gpt2-xl": gpt2_xl_workload,
}

WORKLOAD_NAMES: tuple[str, ...] = tuple(_FACTORIES)
"""Every workload name :func:`get_workload` accepts."""


def workload_options(name: str) -> dict[str, Any]:
    """The keyword options of workload ``name`` and their defaults."""
    if workload_ref.is_reference(name):
        from .user import user_workload_options

        return user_workload_options(name)
    factory = _factory(name)
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def get_workload(name: str, **options: Any) -> Workload:
    """The workload called ``name``, built with ``options`` (see :func:`workload_options`)."""
    if workload_ref.is_reference(name):
        from .user import load_user_workload

        return load_user_workload(name, options)
    factory = _factory(name)
    known = workload_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"workload {name!r} has no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(known) or '(none)'}"
        )
    try:
        return factory(**options)
    except (TypeError, ValueError, OverflowError) as exc:  # a value of the wrong kind
        if not options:
            raise
        raise ValueError(f"workload {name!r} with option(s) {', '.join(sorted(options))}: "
                         f"{' '.join(str(exc).split())[:300]}") from None


def _factory(name: str) -> Callable[..., Workload]:
    try:
        return _FACTORIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown workload {name!r}; known workloads: {', '.join(WORKLOAD_NAMES)}; "
            f"or your own model as {workload_ref.FORMS}"
        ) from None
