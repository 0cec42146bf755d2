"""This rank's side of a trace: its parts, ``run.json``, the stage timer, telemetry, the end.

One :class:`TraceRecorder` per rank, used by the ``kfacperf profile`` worker
(:mod:`kfacperf.runtime.worker`) and by a training loop instrumented with
:func:`kfacperf.instrument` (:mod:`kfacperf.runtime.loop`), so both write the same trace:

* at the start, rank 0 writes ``run.json`` (``completed: false``); every rank marks its parts
  with a random token and opens ``parts/events-rank<R>.arrows`` (and, on a GPU, its telemetry
  part), flushed every step, so a rank that dies keeps every finished step;
* after a barrier, time 0 is taken and the :class:`~kfacperf.profiler.stage_timer.StageTimer`
  (NVTX ranges, CUDA events on a GPU) and the NVML sampler start;
* :meth:`TraceRecorder.finish` closes them, brings every rank's parts to rank 0 (over the
  process group for ranks whose files rank 0 cannot see), compacts them into
  ``events.parquet``, and marks the run completed; :meth:`TraceRecorder.abandon` only closes
  this rank's files (no collective: a peer may be gone) and leaves its error report.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfacperf.runtime.config import ProfileConfig, run_record
from kfacperf.trace.schema import PARTS_DIR
from kfacperf.trace.store import read_run, write_run


def error_path(run_dir: Path, rank: int) -> Path:
    return run_dir / PARTS_DIR / f"error-rank{rank:05d}.txt"


def write_error_report(run_dir: Path, rank: int, summary: str, details: str = "") -> Path:
    """``parts/error-rank<R>.txt`` beside this rank's parts: the one-line ``summary`` (what
    failed), then ``details`` (the traceback)."""
    p = error_path(run_dir, rank)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(" ".join(summary.split()) + "\n" + (f"\n{details}" if details else ""))
    return p


def read_error_summary(path: Path) -> str:
    """The first line of an error report (what failed, in one line)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip() or "(empty report)"
    except OSError as exc:
        return f"(unreadable report: {exc.strerror or exc})"


SUMMARY_CHARS = 600
"""The longest one-line summary of an error (the report keeps the whole of it)."""


def exception_summary(exc: BaseException) -> str:
    """``Type: message`` on one line, at most :data:`SUMMARY_CHARS` long."""
    text = " ".join(str(exc).split())
    if len(text) > SUMMARY_CHARS:
        text = text[:SUMMARY_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def peer_progress(run_dir: Path, rank: int) -> str:
    """When each other rank last wrote its part file (created at its start, appended after
    its steps), as far as this rank can see them (one node, or a shared file system)."""
    now = time.time()
    seen = []
    for path in sorted((run_dir / PARTS_DIR).glob("events-rank*.arrows")):
        r = int(path.stem.rsplit("rank", 1)[1])
        if r != rank:
            try:
                seen.append(f"rank {r} {now - path.stat().st_mtime:.0f} s ago")
            except OSError:
                continue
    return "part file last written: " + ", ".join(seen) if seen else ""


def gpu_info_from_torch(info: Mapping[str, Any], index: int) -> dict[str, Any]:
    """``run.json``'s ``device`` for a CUDA run that NVML could not describe (``info``, as
    :func:`~kfacperf.profiler.telemetry.device_info` left it): the GPU as torch sees it, so
    that the trace is still a GPU's, named as the device presets know it, with NVML's
    reason kept."""
    import torch

    props = torch.cuda.get_device_properties(index)
    gpu = {"index": index, "name": props.name, "uuid": None, "driver": None,
           "compute_capability": [props.major, props.minor],
           "memory_total_mib": props.total_memory / 2**20, "max_sm_clock_mhz": None,
           "max_mem_clock_mhz": None, "power_limit_w": None,
           "count": torch.cuda.device_count(), "described_by": "torch"}
    return dict(info, kind="gpu", name=props.name, gpu=gpu)


class TraceRecorder:
    """See the module docstring.  ``info`` is the rank's
    :class:`~kfacperf.runtime.distributed.DistInfo`; ``device`` the torch device it computes
    on; ``run_extra`` more ``run.json`` keys (rank 0)."""

    def __init__(self, config: ProfileConfig, info: Any, *, device: Any, heap_policy: str,
                 batch_per_rank: int | None, run_extra: Mapping[str, Any] | None = None) -> None:
        import torch.distributed as dist

        from kfacperf.profiler.nvtx_backend import default_backend
        from kfacperf.profiler.stage_timer import StageTimer
        from kfacperf.profiler.telemetry import TelemetrySampler, device_info
        from kfacperf.runtime import precision
        from kfacperf.trace import parts as trace_parts

        self.config, self.rank, self.world = config, info.rank, info.world_size
        self.run_dir = Path(config.out)
        (self.run_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        self._token = _mark_parts(self.run_dir / PARTS_DIR, self.rank)
        cuda = device.type == "cuda"
        gpu_index = (device.index or 0) if cuda else None
        dev_info = device_info(device_index=gpu_index)
        if cuda and dev_info.get("kind") != "gpu":
            dev_info = gpu_info_from_torch(dev_info, gpu_index or 0)
        if not cuda:
            dev_info = dict(dev_info, torch_device="cpu")
        nvtx, nvtx_line = default_backend()
        if self.rank == 0:
            if nvtx_line != "nvtx":
                print(f"kfacperf profile: NVTX ranges: {nvtx_line}", file=sys.stderr)
            prior = _prior_run(self.run_dir)
            write_run(self.run_dir, run_record(
                config, world_size=self.world, batch_per_rank=batch_per_rank, device=dev_info,
                backend=info.backend, heap=heap_policy,
                timing="cuda_events" if cuda else "perf_counter_ns", nvtx=nvtx_line,
                precision_flags=precision.run_flags(config.precision),
                clock="per-rank perf_counter_ns; time 0 right after a barrier at the start",
                **({"start_time": prior["start_time"]} if "start_time" in prior else {}),
                **dict(run_extra or {}),
            ))
        self._events = trace_parts.event_appender(self.run_dir, self.rank)
        self._telemetry = trace_parts.telemetry_appender(self.run_dir, self.rank) if cuda else None
        if self.world > 1:
            dist.barrier()
        origin = time.perf_counter_ns()
        self.timer = StageTimer(rank=self.rank, sink=self._events, cuda=cuda, nvtx=nvtx,
                                isolate=config.isolate, origin_ns=origin)
        self._sampler = None
        if self._telemetry is not None:
            self._sampler = TelemetrySampler(
                rank=self.rank, device_index=gpu_index or 0, sink=self._telemetry,
                origin_ns=origin, interval_s=config.telemetry_interval_s)
            self._sampler.start()

    def finish(self, *, faults_per_step: float = 0.0,
               run_updates: Mapping[str, Any] | None = None, completed: bool = True) -> None:
        """Close the timer and the parts, gather and compact them (a collective on several
        ranks: every rank calls it), and mark ``run.json`` completed (or, ``completed``
        False, a run that recorded nothing to complete) with ``run_updates``."""
        self.timer.close()
        self._close_files()
        _finish(self.rank, self.world, self.run_dir, self._token,
                faults_per_step=faults_per_step, run_updates=run_updates, completed=completed)

    def abandon(self, summary: str, details: str = "",
                run_updates: Mapping[str, Any] | None = None) -> None:
        """After a failure: stop sampling and close this rank's parts (every finished step is
        already in them), with no collective, and leave ``summary`` and ``details`` in
        ``parts/error-rank<R>.txt``; rank 0 adds ``run_updates`` to ``run.json`` (which stays
        ``completed: false``)."""
        try:
            write_error_report(self.run_dir, self.rank, summary, details)
            if self.rank == 0 and run_updates:
                try:  # the loop's own error is what the caller sees, not this one
                    run = read_run(self.run_dir / "run.json")
                    run.update(run_updates, completed=False)
                    write_run(self.run_dir, run)
                except (OSError, ValueError) as exc:
                    print(f"[kfacperf] could not update {self.run_dir / 'run.json'}: {exc}",
                          file=sys.stderr)
        finally:
            self._close_files()

    def _close_files(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        self._events.close()
        if self._telemetry is not None:
            self._telemetry.close()


def _prior_run(run_dir: Path) -> dict[str, Any]:
    try:
        return read_run(run_dir / "run.json")
    except (OSError, ValueError):
        return {}


def _id_path(parts: Path, rank: int) -> Path:
    return parts / f"rank{rank:05d}.id"


def _read_token(parts: Path, rank: int) -> str | None:
    try:
        return _id_path(parts, rank).read_text()
    except OSError:
        return None


def _mark_parts(parts: Path, rank: int) -> str:
    """Write a random token beside this rank's parts; rank 0 reading the same token back
    later proves it sees this rank's files (one node, or a shared file system)."""
    token = os.urandom(8).hex()
    _id_path(parts, rank).write_text(token)
    return token


def _finish(rank: int, world: int, run_dir: Path, token: str, *, faults_per_step: float = 0.0,
            run_updates: Mapping[str, Any] | None = None, completed: bool = True) -> None:
    """Bring every rank's parts to rank 0 (ranks whose files rank 0 cannot see send them over
    the process group), compact, mark the run completed (with rank 0's minor page faults
    per measured step), clean up."""
    import torch.distributed as dist

    from kfacperf.trace import parts as trace_parts

    parts = run_dir / PARTS_DIR
    mine_elsewhere = False
    if world > 1:
        tokens: list[Any] = [None] * world
        dist.all_gather_object(tokens, token)
        unseen: list[Any] = [None]
        if rank == 0:
            unseen[0] = [r for r, t in enumerate(tokens) if _read_token(parts, r) != t]
        dist.broadcast_object_list(unseen, src=0)
        mine_elsewhere = rank in unseen[0]
        mine = None
        if mine_elsewhere:
            mine = {p.name: p.read_bytes() for p in parts.glob(f"*-rank{rank:05d}.arrows")}
        received: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(mine, received, dst=0)
        for blobs in received or []:
            for name, data in (blobs or {}).items():
                (parts / name).write_bytes(data)
    if rank == 0:
        trace_parts.compact(run_dir, remove_parts=False)
        run = read_run(run_dir / "run.json")
        run.update(end_time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   page_faults_per_step=round(faults_per_step, 1), **dict(run_updates or {}))
        run["completed"] = completed
        write_run(run_dir, run)
        shutil.rmtree(parts, ignore_errors=True)
    if world > 1:
        dist.barrier()
    if mine_elsewhere:  # this node's copy of the parts is no longer needed
        for p in [*parts.glob(f"*-rank{rank:05d}.arrows"), _id_path(parts, rank)]:
            p.unlink(missing_ok=True)
        try:
            parts.rmdir()
        except OSError:
            pass  # other ranks of this node still have files there
