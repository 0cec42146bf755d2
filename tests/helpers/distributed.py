"""Run a function on P real gloo ranks (one process each) and collect what every rank returns.

Process start-up and ``import torch`` cost seconds, so tests put many checks into ONE launch:
the rank function runs them through a :class:`Checks` collector that records each failure
(with its traceback) instead of stopping, and returns ``checks.report()``.  The parent gets
one :class:`RankResult` per rank; :func:`merge_checks` turns them into one verdict per check.

A rank that raises, exits or hangs never hangs the caller: every collective has a finite
process-group timeout (``dist_timeout_s``) and the whole launch a deadline (``timeout_s``),
after which the ranks still running are terminated.
"""
from __future__ import annotations

import os
import pickle
import queue as _queue
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.multiprocessing as tmp

from kfacperf.runtime.net import free_port


@dataclass(frozen=True, kw_only=True)
class RankResult:
    """What one rank returned, or why it returned nothing."""

    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    exitcode: int | None = None


class DistributedTestError(AssertionError):
    """One or more ranks failed; the message holds every rank's error."""


def _worker(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...],
    kwargs: dict[str, Any], results: Any, dist_timeout_s: float, threads: int, init: bool,
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    from kfacperf.runtime import distributed

    torch.set_num_threads(threads)
    try:
        if init:
            distributed.init_distributed(backend="gloo", timeout_s=dist_timeout_s)
        value = fn(rank, world_size, *args, **kwargs)
        # Plain pickle: tensors travel by value, not as shared-memory handles that die
        # with this process.
        results.put(pickle.dumps(RankResult(rank=rank, ok=True, value=value)))
    except BaseException:  # report everything, including SystemExit, to the parent
        results.put(pickle.dumps(RankResult(rank=rank, ok=False, error=traceback.format_exc())))
    finally:
        if init:
            try:
                distributed.shutdown()
            except Exception:
                pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
    dist_timeout_s: float = 30.0,
    threads: int = 1,
    init: bool = True,
    start_method: str = "fork",
) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Returns one :class:`RankResult` per rank, in rank order.  ``fn`` and its return value
    must be picklable when ``start_method="spawn"``; with the default ``fork`` any callable
    works.  ``init=False`` leaves process-group set-up to ``fn`` (for tests of it).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = tmp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, fn, args, kwargs or {}, results, dist_timeout_s,
                  threads, init),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < world_size and time.monotonic() < deadline:
        try:
            res = pickle.loads(results.get(timeout=0.1))
            got[res.rank] = res
        except _queue.Empty:
            pass
        if all(p.exitcode is not None for p in procs):
            _drain(results, got)
            break
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()) if r in got else 0.5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    _drain(results, got)
    out = []
    for r, p in enumerate(procs):
        if r in got:
            out.append(RankResult(rank=r, ok=got[r].ok, value=got[r].value,
                                  error=got[r].error, exitcode=p.exitcode))
        else:
            why = (f"rank {r} timed out after {timeout_s:.0f} s and was terminated"
                   if p.exitcode in (None, -15) else
                   f"rank {r} exited with code {p.exitcode} without returning")
            out.append(RankResult(rank=r, ok=False, error=why, exitcode=p.exitcode))
    return out


def _drain(results: Any, got: dict[int, RankResult]) -> None:
    while True:
        try:
            res = pickle.loads(results.get(timeout=0.05))
        except (_queue.Empty, OSError, ValueError):
            return
        got[res.rank] = res


def run_distributed(fn: Callable[..., Any], world_size: int, **opts: Any) -> list[Any]:
    """Like :func:`run_ranks`, but return the values and raise if any rank failed."""
    results = run_ranks(fn, world_size, **opts)
    failed = [r for r in results if not r.ok]
    if failed:
        raise DistributedTestError(
            "\n".join(f"--- rank {r.rank} failed:\n{r.error}" for r in failed)
        )
    return [r.value for r in results]


@dataclass
class Checks:
    """Named checks inside one rank; a failing check is recorded and the next one runs.

    Keep assertions after a check's collectives: a rank that stops before a collective
    leaves its peers waiting until the process-group timeout.
    """

    failures: dict[str, str] = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name in self.failures or name in self.passed:
            raise ValueError(f"check {name!r} ran twice")
        try:
            value = fn(*args, **kwargs)
        except Exception:
            self.failures[name] = traceback.format_exc()
            return None
        self.passed.append(name)
        if value is not None:
            self.values[name] = value
        return value

    def report(self) -> dict[str, Any]:
        return {"passed": list(self.passed), "failures": dict(self.failures),
                "values": dict(self.values)}


def merge_checks(results: list[RankResult]) -> dict[str, dict[int, str]]:
    """``check name -> {rank: error}`` (an empty dict when it passed on every rank).

    A rank that failed as a whole is reported under the pseudo-check ``"<rank>"``.
    """
    merged: dict[str, dict[int, str]] = {}
    for res in results:
        if not res.ok:
            merged.setdefault("<rank>", {})[res.rank] = res.error
            continue
        for name in res.value["passed"]:
            merged.setdefault(name, {})
        for name, err in res.value["failures"].items():
            merged.setdefault(name, {})[res.rank] = err
    return merged


def assert_check(merged: dict[str, dict[int, str]], name: str) -> None:
    """Fail (with every rank's traceback) unless check ``name`` passed on every rank."""
    if "<rank>" in merged:
        raise DistributedTestError(
            "\n".join(f"--- rank {r}:\n{e}" for r, e in merged["<rank>"].items())
        )
    if name not in merged:
        raise DistributedTestError(f"check {name!r} never ran")
    errors = merged[name]
    if errors:
        raise DistributedTestError(
            f"check {name!r} failed on rank(s) {sorted(errors)}:\n"
            + "\n".join(f"--- rank {r}:\n{e}" for r, e in sorted(errors.items()))
        )



class CasesInOneLaunch:
    """Named cases, each ``train(case, rank, world)``, run as checks of one launch of
    ``world`` gloo ranks (started by the first test that asks); :meth:`values` is a case's
    result on every rank, failing with every rank's traceback where the case failed."""

    def __init__(self, train: Callable[[str, int, int], Any], cases: Sequence[str],
                 world: int, *, timeout_s: float, dist_timeout_s: float = 30.0) -> None:
        self.train, self.cases, self.world = train, tuple(cases), world
        self.timeout_s, self.dist_timeout_s = timeout_s, dist_timeout_s
        self._results: list[RankResult] | None = None

    def _suite(self, rank: int, world: int) -> dict[str, Any]:
        checks = Checks()
        for case in self.cases:
            checks.run(case, self.train, case, rank, world)
        return checks.report()

    def values(self, case: str) -> list[Any]:
        if self._results is None:
            self._results = run_ranks(self._suite, self.world, timeout_s=self.timeout_s,
                                      dist_timeout_s=self.dist_timeout_s)
        assert_check(merge_checks(self._results), case)
        return [r.value["values"][case] for r in self._results]


def strategy_of_case(name: str, world: int) -> Any:
    """The strategy a case name spells: ``local`` (None: the preconditioner's own),
    ``spngd``, ``spngd-fused``, ``kaisa-f1`` (f = 1) or ``kaisa-f1P`` (f = 1/P), with
    ``-ddp`` in a KAISA name for gradients a DDP wrapper averages before the step, and
    ``-each`` anywhere for factors sent one layer a bucket (``bucket_cap_mb=0``)."""
    from kfacperf.kfac.comm import CommOptions
    from kfacperf.kfac.strategies import KAISAStrategy, SPNGDStrategy

    if name == "local":
        return None
    opts = CommOptions(bucket_cap_mb=0.0) if "-each" in name else None
    name = name.replace("-each", "")
    if name.startswith("spngd"):
        return SPNGDStrategy(fused=name == "spngd-fused", comm_options=opts)
    fraction = 1.0 if name.endswith("f1") else 1.0 / world
    return KAISAStrategy(grad_worker_fraction=fraction, average_gradients="ddp" not in name,
                         comm_options=opts)
