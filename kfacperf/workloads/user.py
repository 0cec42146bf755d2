"""The user's own model as a :class:`~kfacperf.workloads.base.Workload`, from a factory reference.

``--workload FILE.py:FUNC`` or ``--workload package.module:FUNC`` (see
:mod:`kfacperf.workloads.reference`) names a function that ``FUNC(**options)`` calls, with the
options of ``--workload-option``.  It returns either

* a :class:`Workload` (its own data, loss and default batch), or
* ``(model, make_batch)`` or ``(model, make_batch, loss_fn)``: an ``nn.Module``, a function
  ``make_batch(batch_size: int, generator: torch.Generator) -> (inputs, targets)`` and,
  optionally, ``loss_fn(outputs, targets) -> scalar`` (default: mean cross-entropy).

The factory is called first on the meta device (``with torch.device("meta")``), which costs no
memory however large the model, to check what it returns and to learn the input's shape; the
real model is built by :meth:`Workload.build_model`, which calls the factory again (seeded, so
every rank builds the same parameters).  A factory that fails on the meta device is called
normally instead.  Every failure is a :class:`~kfacperf.errors.UserError` of one line naming
the file (or module) and the function.  What K-FAC cannot train (no K-FAC layer, a layer
called twice, tied layers) is not a failure here: a first-order run takes such a model, and
``kfacperf profile`` refuses it for K-FAC (:func:`kfacperf.runtime.runner.validate`).

A file is imported under a module name of its own (its folder put first on ``sys.path``, so it
can import its neighbours), once per content: the same file is not executed twice.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from kfacperf.errors import UserError

from .base import Workload
from .reference import FORMS, WorkloadRef, file_sha256, parse

DEFAULT_BATCH_SIZE = 32
RETURNS = ("return a kfacperf Workload, or (model, make_batch) or (model, make_batch, loss_fn) "
           "with model an nn.Module and make_batch(batch_size, generator) -> (inputs, targets)")


def load_user_workload(name: str, options: Mapping[str, Any] | None = None) -> Workload:
    """The workload ``FUNC(**options)`` describes (see the module docstring)."""
    ref = parse(name)
    func = resolve_factory(ref)
    options = dict(options or {})
    _check_options(ref, func, options)
    factory = _Factory(ref, func, options)
    return factory.workload()


def user_workload_options(name: str) -> dict[str, Any]:
    """The factory's keyword options and their defaults (those without a default left out)."""
    ref = parse(name)
    out = {}
    for p in inspect.signature(resolve_factory(ref)).parameters.values():
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty:
            out[p.name] = p.default
    return out


def factory_fingerprint(name: str) -> str:
    """SHA-256 of the file that defines the factory (a module's ``__file__``)."""
    ref = parse(name)
    if ref.kind == "file":
        return file_sha256(ref.target)
    module = sys.modules.get(ref.target) or importlib.import_module(ref.target)
    path = getattr(module, "__file__", None)
    if not path:
        raise UserError(f"{ref.text}: module {ref.target} has no source file to fingerprint")
    return file_sha256(path)


# ---------------------------------------------------------------------------------- resolve

def resolve_factory(ref: WorkloadRef) -> Callable[..., Any]:
    """Import the file or module and return its function ``ref.function``."""
    module = _import_file(ref) if ref.kind == "file" else _import_module(ref)
    func = getattr(module, ref.function, None)
    if func is None:
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise UserError(f"--workload {ref.text}: {_where(ref)} has no function "
                        f"{ref.function!r} "
                        f"(it defines: {', '.join(defined) or 'nothing callable'})")
    if not callable(func):
        raise UserError(f"--workload {ref.text}: {ref.function} in {_where(ref)} is "
                        f"{_a(type(func).__name__)}, not a function ({FORMS})")
    return cast("Callable[..., Any]", func)


def _where(ref: WorkloadRef) -> str:
    return ref.target if ref.kind == "file" else f"module {ref.target}"


def _import_file(ref: WorkloadRef) -> Any:
    path = Path(ref.target)
    if not path.is_file():
        raise UserError(f"--workload {ref.text}: no file {path}")
    digest = file_sha256(path)
    name = f"kfacperf_user_{ref.slug.replace('-', '_').replace('.', '_')}_{digest[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"--workload {ref.text}: cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UserError(f"--workload {ref.text}: importing {path} failed: "
                        f"{_exception_text(exc, str(path))}") from exc
    return module


def _import_module(ref: WorkloadRef) -> Any:
    try:
        return importlib.import_module(ref.target)
    except ModuleNotFoundError as exc:
        if exc.name and (ref.target == exc.name or ref.target.startswith(exc.name + ".")):
            raise UserError(f"--workload {ref.text}: no module named {exc.name!r} (is its "
                            "package installed, or its folder on PYTHONPATH?)") from exc
        raise UserError(f"--workload {ref.text}: importing {ref.target} failed: "
                        f"{_exception_text(exc)}") from exc
    except Exception as exc:
        raise UserError(f"--workload {ref.text}: importing {ref.target} failed: "
                        f"{_exception_text(exc)}") from exc


_PACKAGE = Path(__file__).resolve().parents[1]  # kfacperf/: frames of ours are no place to name


def _exception_text(exc: BaseException, filename: str = "") -> str:
    """``Type: message`` plus where it happened in the user's code: the innermost frame in
    ``filename``, else the innermost frame outside kfacperf (none where the error is the call
    itself, e.g. a function given the wrong number of arguments)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not Path(f.filename).resolve().is_relative_to(_PACKAGE)]
    mine = [f for f in frames if filename and Path(f.filename) == Path(filename)]
    if isinstance(exc, SyntaxError):
        # its text already says where: "invalid syntax (my_model.py, line 2)"
        where = "" if exc.lineno is None or "line" in str(exc) else f" (line {exc.lineno})"
    elif mine or frames:
        f = (mine or frames)[-1]
        where = f" ({Path(f.filename).name} line {f.lineno})"
    else:
        where = ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"


def _check_options(ref: WorkloadRef, func: Callable[..., Any], options: Mapping[str, Any]) -> None:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin or an odd callable: let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - {p.name for p in named})
    if unknown:
        known = ", ".join(p.name for p in named) or "(none)"
        raise UserError(f"--workload {ref.text}: {ref.function}() takes no option(s) "
                        f"{', '.join(unknown)}; its options are: {known}")
    needed = [p.name for p in params if p.default is p.empty and p.name not in options
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if needed:
        raise UserError(f"--workload {ref.text}: {ref.function}() needs option(s) "
                        f"{', '.join(needed)}: pass --workload-option KEY=VALUE")


# ---------------------------------------------------------------------------------- factory

class _Factory:
    """Calls the user's factory and adapts what it returns to a :class:`Workload`."""

    def __init__(self, ref: WorkloadRef, func: Callable[..., Any], options: dict[str, Any]) -> None:
        self.ref, self.func, self.options = ref, func, options
        # (make_batch, loss_fn) of the meta-device call and of the latest real build
        self._probe: tuple[Callable[..., Any], Callable[..., Any] | None] | None = None
        self._real: tuple[Callable[..., Any], Callable[..., Any] | None] | None = None

    def _fail(self, why: str) -> UserError:
        return UserError(f"--workload {self.ref.text}: {why}")

    def call(self, *, meta: bool) -> Any:
        """``FUNC(**options)``, on the meta device if ``meta``; errors name the function."""
        try:
            if meta:
                with torch.device("meta"):
                    return self.func(**self.options)
            return self.func(**self.options)
        except Exception as exc:
            filename = self.ref.target if self.ref.kind == "file" else ""
            raise self._fail(f"{self.ref.function}({_kwargs(self.options)}) raised "
                             f"{_exception_text(exc, filename)}") from exc

    def unpack(
        self, result: Any,
    ) -> tuple[nn.Module, Callable[..., Any], Callable[..., Any] | None]:
        """``(model, make_batch, loss_fn or None)`` from a tuple result, checked."""
        got = type(result).__name__
        if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
            n = f" of {len(result)}" if isinstance(result, (tuple, list)) else ""
            raise self._fail(f"{self.ref.function}() returned {_a(got)}{n}; {RETURNS}")
        model, make_batch, *rest = result
        loss = rest[0] if rest else None
        if not isinstance(model, nn.Module):
            raise self._fail(f"{self.ref.function}() returned {_a(type(model).__name__)} as the "
                             f"model; {RETURNS}")
        if not callable(make_batch):
            raise self._fail(f"{self.ref.function}() returned {_a(type(make_batch).__name__)} as "
                             f"make_batch; {RETURNS}")
        if loss is not None and not callable(loss):
            raise self._fail(f"{self.ref.function}() returned {_a(type(loss).__name__)} as "
                             "loss_fn; it must be loss_fn(outputs, targets) -> scalar tensor")
        return model, make_batch, loss

    def workload(self) -> Workload:
        try:
            result = self.call(meta=True)
        except UserError:  # e.g. a factory that loads a checkpoint: build it for real
            result = self.call(meta=False)
        if isinstance(result, Workload):
            real = self.call(meta=False)  # a Workload builds lazily: this costs nothing
            if not isinstance(real, Workload):
                raise self._fail(f"{self.ref.function}() returned a Workload on the meta "
                                 f"device but {_a(type(real).__name__)} otherwise")
            return real
        model, make_batch, loss = self.unpack(result)
        self._probe = (make_batch, loss)
        x, _ = self.sample(1, torch.Generator().manual_seed(0))
        return Workload(
            name=self.ref.text,
            description=f"{type(model).__name__} from {self.ref.display}",
            input_shape=tuple(x.shape[1:]), input_dtype=x.dtype, num_classes=0,
            default_batch_size=DEFAULT_BATCH_SIZE, model_factory=self.build,
            batch_sampler=self.sample, options=dict(self.options),
            loss=self.default_loss if loss is None else self.loss,
        )

    def build(self) -> nn.Module:
        """The model (the caller seeds the RNG, and may ask for the meta device); a real one
        leaves its make_batch and loss_fn for the data and the loss."""
        model, make_batch, loss = self.unpack(self.call(meta=False))
        if not any(p.is_meta for p in itertools.chain(model.parameters(), model.buffers())):
            self._real = (make_batch, loss)
        return model

    def sample(self, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        make_batch = self._real[0] if self._real else self._probe[0] if self._probe else None
        if make_batch is None:
            make_batch = self._real_make_batch()
        batch = self._batch(make_batch, batch_size, gen)
        if self._real is None and any(t.is_meta for t in batch):
            # made from tensors the factory created on the meta device: ask a real build
            batch = self._batch(self._real_make_batch(), batch_size, gen)
        return batch

    def _real_make_batch(self) -> Callable[..., Any]:
        """make_batch of a real build; a factory that builds on the meta device even when
        asked for a real model cannot be trained or profiled."""
        self.build()
        if self._real is None:
            raise self._fail(f"{self.ref.function}() built its model on the meta device when "
                             "asked for a real one; build it on the default device (kfacperf "
                             "asks for the meta device itself where it only needs shapes)")
        return self._real[0]

    def _batch(self, make_batch: Callable[..., Any], n: int, gen: torch.Generator
               ) -> tuple[Tensor, Tensor]:
        try:
            out = make_batch(n, gen)
        except Exception as exc:
            filename = self.ref.target if self.ref.kind == "file" else ""
            raise self._fail(f"make_batch({n}, generator) raised "
                             f"{_exception_text(exc, filename)}") from exc
        if (not isinstance(out, (tuple, list)) or len(out) != 2
                or not all(isinstance(t, Tensor) for t in out)):
            raise self._fail(f"make_batch({n}, generator) returned {_shape_text(out)}; it must "
                             "return (inputs, targets), two tensors with the batch first")
        x, y = out
        if x.dim() == 0 or x.shape[0] != n:
            raise self._fail(f"make_batch({n}, generator) returned inputs of shape "
                             f"{tuple(x.shape)}; the first dimension must be the batch ({n})")
        return x, y

    def default_loss(self, outputs: Any, targets: Tensor) -> Tensor:
        """Mean cross-entropy, for a model that returns one tensor of logits."""
        if not isinstance(outputs, Tensor):
            raise self._fail(f"the model returns {_shape_text(outputs)}, and the default loss "
                             "(cross-entropy) takes one tensor of logits; return (model, "
                             "make_batch, loss_fn) with loss_fn(outputs, targets) taking what "
                             "the model returns")
        try:
            return torch.nn.functional.cross_entropy(outputs, targets, reduction="mean")
        except (RuntimeError, ValueError, IndexError) as exc:
            raise self._fail(
                f"the default loss (cross-entropy) failed on the model's outputs of shape "
                f"{tuple(outputs.shape)} and make_batch's targets of shape "
                f"{tuple(targets.shape)} ({targets.dtype}): {_first_line(exc)}; it takes "
                "logits [batch, classes] and class indices [batch] (int64) or class "
                "probabilities of the outputs' shape; for anything else return (model, "
                "make_batch, loss_fn)") from exc

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = self._real[1] if self._real else self._probe[1] if self._probe else None
        assert loss is not None  # only installed when the factory returned a loss_fn
        value = loss(outputs, targets)  # its own errors are the user's, raised as they are
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise self._fail(f"loss_fn(outputs, targets) returned {_shape_text(value)}; it must "
                             "return one number, a scalar tensor (e.g. a mean over the batch)")
        return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _kwargs(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _shape_text(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in value)
        return f"{_a(type(value).__name__)} of {len(value)} ({kinds})"
    return _a(type(value).__name__)
