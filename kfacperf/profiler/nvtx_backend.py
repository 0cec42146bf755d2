"""NVTX behind a five-method interface, so the stage timer can be tested without Nsight.

:class:`NvtxDomainBackend` emits into one NVTX domain (``kfacperf``) with the ``nvtx``
package's fast ``Domain`` methods and pre-built attribute objects; with no tool attached the
package hands out a no-op domain and every call costs a few tens of nanoseconds.
:class:`RecordingBackend` keeps the calls in a list, for tests.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

DOMAIN = "kfacperf"

RangeTree: TypeAlias = "list[tuple[str, RangeTree]]"
"""Nested NVTX ranges: ``[(message, children), ...]``."""


class NvtxBackend(Protocol):
    """What the stage timer needs from NVTX."""

    def attributes(
        self, *, message: str, color: int, category: str, payload: int | None = None
    ) -> Any:
        """A reusable attribute object (built once per stage/layer)."""

    def push(self, attrs: Any) -> None:
        """Open a nested range on this thread."""

    def pop(self) -> None:
        """Close this thread's innermost range."""

    def start(self, attrs: Any) -> Any:
        """Open a range that may end on another thread; returns its handle."""

    def end(self, handle: Any) -> None:
        """Close a range opened with :meth:`start`."""


class NvtxDomainBackend:
    """The real thing: the ``nvtx`` package, one domain, categories named after lanes."""

    name = "nvtx"

    def __init__(self, *, domain: str = DOMAIN) -> None:
        import nvtx

        self._domain = nvtx.get_domain(domain)
        dom = self._domain
        # bound methods looked up once: they are on the hot path
        self.push = dom.push_range
        self.pop = dom.pop_range
        self.start = dom.start_range
        self.end = dom.end_range

    @property
    def attached(self) -> bool:
        """Whether a tool (Nsight Systems, an injection library) receives the ranges."""
        import nvtx

        return nvtx.enabled() and type(self._domain).__name__ != "DummyDomain"

    def attributes(
        self, *, message: str, color: int, category: str, payload: int | None = None
    ) -> Any:
        return self._domain.get_event_attributes(
            message=message, color=color, category=category, payload=payload
        )


class TorchNvtxBackend:
    """NVTX through torch's own bindings (``torch.cuda.nvtx``), where the ``nvtx`` package is
    missing: the same ranges and messages, in the default domain, without colours or
    categories."""

    name = "torch.cuda.nvtx"

    def __init__(self) -> None:
        import torch.cuda.nvtx as tnvtx

        self.push = tnvtx.range_push
        self.pop = tnvtx.range_pop
        self.start = tnvtx.range_start
        self.end = tnvtx.range_end

    def attributes(
        self, *, message: str, color: int, category: str, payload: int | None = None
    ) -> Any:
        return message


class NullNvtxBackend:
    """No NVTX at all (neither the ``nvtx`` package nor torch's CUDA bindings are usable):
    the stage timer's own timings are unaffected."""

    name = "none"

    def attributes(
        self, *, message: str, color: int, category: str, payload: int | None = None
    ) -> Any:
        return None

    def push(self, attrs: Any) -> None:
        pass

    def pop(self) -> None:
        pass

    def start(self, attrs: Any) -> Any:
        return None

    def end(self, handle: Any) -> None:
        pass


def default_backend() -> tuple[NvtxBackend, str]:
    """The best NVTX backend here and a line saying which: the ``nvtx`` package's domain;
    without the package (or where it fails to load), torch's bindings on a CUDA machine;
    else none.  A missing NVTX never stops a profile: the ranges are for Nsight, the
    trace's timings do not depend on them."""
    try:
        return NvtxDomainBackend(), NvtxDomainBackend.name
    except Exception as exc:  # ImportError, or a compiled extension that fails to load
        why = f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        import torch

        if torch.cuda.is_available():
            return TorchNvtxBackend(), f"{TorchNvtxBackend.name} (the nvtx package: {why})"
    except Exception:  # noqa: S110 - torch's bindings are the fallback; none is next
        pass
    return NullNvtxBackend(), f"{NullNvtxBackend.name} (the nvtx package: {why})"


@dataclass(frozen=True)
class NvtxAttrs:
    message: str
    color: int
    category: str
    payload: int | None = None


@dataclass(frozen=True)
class NvtxCall:
    """One recorded call: ``kind`` is push/pop/start/end; ``handle`` pairs start with end."""

    kind: str
    attrs: NvtxAttrs | None
    thread: int
    handle: int | None = None


class RecordingBackend:
    """Records every call (thread-safe), for tests of what a run would show in Nsight."""

    def __init__(self) -> None:
        self.calls: list[NvtxCall] = []
        self._lock = threading.Lock()
        self._next = 0

    def attributes(
        self, *, message: str, color: int, category: str, payload: int | None = None
    ) -> NvtxAttrs:
        return NvtxAttrs(message, color, category, payload)

    def push(self, attrs: NvtxAttrs) -> None:
        self.calls.append(NvtxCall("push", attrs, threading.get_ident()))

    def pop(self) -> None:
        self.calls.append(NvtxCall("pop", None, threading.get_ident()))

    def start(self, attrs: NvtxAttrs) -> int:
        with self._lock:
            self._next += 1
            handle = self._next
        self.calls.append(NvtxCall("start", attrs, threading.get_ident(), handle))
        return handle

    def end(self, handle: int) -> None:
        self.calls.append(NvtxCall("end", None, threading.get_ident(), handle))

    def push_pop_tree(self, thread: int | None = None) -> RangeTree:
        """The nested push/pop ranges of one thread as ``[(message, children), ...]``.

        Raises AssertionError on a pop without a push or a push never popped.
        """
        thread = threading.get_ident() if thread is None else thread
        root: RangeTree = []
        stack = [root]
        for c in self.calls:
            if c.thread != thread or c.kind not in ("push", "pop"):
                continue
            if c.kind == "push":
                assert c.attrs is not None  # push() always records its attributes
                node: tuple[str, RangeTree] = (c.attrs.message, [])
                stack[-1].append(node)
                stack.append(node[1])
            else:
                if len(stack) == 1:
                    raise AssertionError("NVTX pop without a matching push")
                stack.pop()
        if len(stack) != 1:
            raise AssertionError(f"{len(stack) - 1} NVTX range(s) pushed and never popped")
        return root
