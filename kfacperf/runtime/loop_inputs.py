"""What :func:`kfacperf.instrument` is given, checked before any trace exists: its K-FAC
settings and whether K-FAC can take the model; and the shape of what a forward is called
with (the batch size, and why no workload model could be walked)."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from kfacperf import vocab as S
from kfacperf.runtime.settings import OptimizerSettings

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.runtime.config import ProfileConfig


def check_kfac_model(model: nn.Module, settings: Mapping[str, Any]) -> None:
    """What K-FAC cannot take (no supported layer, tied layers), before the trace exists."""
    from kfacperf.kfac.preconditioner import find_layers

    try:
        find_layers(model, bn_blocks=settings.get("bn_blocks", S.BN_NONE))
    except ValueError as exc:
        raise ValueError(f"instrument: {type(model).__name__}: {exc}") from None


def input_kind(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """What a forward was called with, for the note that no workload model could be walked."""
    if args:
        return f"{_article(type(args[0]).__name__)} as its first argument"
    if kwargs:
        return "keyword arguments only"
    return "no argument"


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def first_tensor(value: Any) -> Tensor | None:
    """The first tensor with a batch dimension in nested tuples, lists and dicts."""
    if isinstance(value, Tensor):
        return value if value.dim() else None
    items = value.values() if isinstance(value, Mapping) else (
        value if isinstance(value, (tuple, list)) else ())
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def check_settings(settings: Mapping[str, Any]) -> None:
    """K-FAC settings ``instrument`` takes: the optimizer's own (not lr, momentum, weight
    decay), and only the empirical Fisher."""
    from dataclasses import fields

    known = {f.name for f in fields(OptimizerSettings)} - {"lr", "momentum", "weight_decay"}
    if settings.get("fisher", S.FISHER_EMP) != S.FISHER_EMP:
        raise ValueError(f"instrument: fisher={settings['fisher']!r}: a loop you write runs "
                         f"its own backward, so only the empirical Fisher "
                         f"({S.FISHER_EMP!r}) is available; kfacperf profile --fisher mc runs "
                         "the Monte-Carlo one")
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"instrument: unknown setting(s) {', '.join(unknown)}; the K-FAC "
                        f"settings are {', '.join(sorted(known))} (lr, momentum and "
                        "weight_decay come from your optimizer)")


def in_keywords(message: str, keywords: Iterable[str], switches: Iterable[str] = ()) -> str:
    """``message`` (a profile setting's error) with each ``kfacperf profile`` flag of one of
    ``keywords`` written as that keyword argument (``--timeout`` -> ``timeout_s``), and of
    one of ``switches`` as the argument set (``--force`` -> ``force=True``), as
    :func:`kfacperf.instrument` is called from Python."""
    from kfacperf.runtime.config import flag_of

    by_flag = {flag_of(k): k for k in keywords} | {flag_of(k): f"{k}=True" for k in switches}
    return re.sub(r"--[a-z][a-z0-9-]*", lambda m: by_flag.get(m.group(), m.group()), message)


def loop_config(optimizer: Any, *, workload: str, world_size: int, device: str,
                asked: Mapping[str, Any]) -> ProfileConfig:
    """The profile settings of an instrumented loop: ``asked`` (instrument's own keyword
    arguments and K-FAC settings, as :class:`ProfileConfig` fields), the optimizer's first
    group's lr, momentum and weight decay, and where it runs; a bad value is a ValueError
    that names the keyword, not profile's flag."""
    import torch

    from kfacperf.runtime.config import ProfileConfig, command_line

    kind = S.SGD if asked.get("strategy") == S.SGD else S.KFAC
    group = optimizer.param_groups[0]
    try:
        return ProfileConfig(
            workload=workload, optimizer=kind, steps=1, nproc=world_size,
            threads_per_rank=torch.get_num_threads(), device=device, command=command_line(),
            lr=float(group.get("lr", 0.0)), momentum=float(group.get("momentum", 0.0) or 0.0),
            weight_decay=float(group.get("weight_decay", 0.0) or 0.0), **asked)
    except ValueError as exc:  # said as profile's flags; here they are keywords
        raise ValueError(f"instrument: {in_keywords(str(exc), asked)}") from None
