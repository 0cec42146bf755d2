"""What every rank of a profiling run does: set up, train instrumented, write its rows.

Started by ``torchrun`` (``python -m kfacperf.runtime.worker CONFIG_JSON``), by
``kfacperf profile`` itself for one process, or by ``kfacperf profile`` run under a
user's own ``torchrun``.  Rank 0 writes ``run.json``; every rank appends its events (and, on a
GPU, telemetry) to its part files, flushed every step; at the end rank 0 compacts them
(collecting the parts of ranks on other hosts over the process group) and marks the run
completed.  A rank that fails leaves ``parts/error-rank<R>.txt``: one line saying what
failed, then the traceback; on the terminal it prints that one line only.  With more than
one rank a :class:`~kfacperf.runtime.watchdog.Watchdog` ends a rank that finishes no step
within the process-group timeout plus a grace.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from kfacperf.runtime.config import CRASH_ENV, EXIT_CRASH, ProfileConfig, run_record
from kfacperf.trace.schema import PARTS_DIR
from kfacperf.trace.store import read_run, write_run

PROGRESS_EVERY_S = 2.0
DATA_BATCHES = 4


def error_path(run_dir: Path, rank: int) -> Path:
    return run_dir / PARTS_DIR / f"error-rank{rank:05d}.txt"


def _crash_point(rank: int) -> int | None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    r, _, k = spec.partition(":")
    return int(k) if int(r) == rank and k != EXIT_CRASH else None


def _log(msg: str) -> None:
    print(f"[kfacperf] {msg}", flush=True)


def write_error_report(run_dir: Path, rank: int, summary: str, details: str = "") -> Path:
    """``parts/error-rank<R>.txt``: the one-line ``summary``, then ``details``."""
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
    """When each other rank last recorded a step (from its part file), as far as this rank
    can see them (one node, or a shared file system)."""
    now = time.time()
    seen = []
    for path in sorted((run_dir / PARTS_DIR).glob("events-rank*.arrows")):
        r = int(path.stem.rsplit("rank", 1)[1])
        if r != rank:
            try:
                seen.append(f"rank {r} {now - path.stat().st_mtime:.0f} s ago")
            except OSError:
                continue
    return "last step recorded: " + ", ".join(seen) if seen else ""


def run_worker(config: ProfileConfig) -> None:
    """Run this rank's share of the profile described by ``config``."""
    import torch

    from kfacperf import precision
    from kfacperf.runtime import distributed, heap
    from kfacperf.runtime.watchdog import Watchdog, limit_for

    heap_policy = heap.keep_heap() if config.keep_heap else heap.DEFAULT
    torch.set_num_threads(config.threads_per_rank)
    backend = {"cpu": "gloo", "cuda": "nccl", "auto": None}[config.device]
    info = distributed.init_distributed(backend=backend, timeout_s=config.timeout_s)
    run_dir = Path(config.out)
    watchdog = None
    if info.world_size > 1:
        def stalled(reason: str) -> None:
            peers = peer_progress(run_dir, info.rank)
            summary = f"Stalled: rank {info.rank}: {reason}" + (f"; {peers}" if peers else "")
            write_error_report(run_dir, info.rank, summary)
            print(f"[kfacperf] rank {info.rank}: error: {summary}", file=sys.stderr, flush=True)

        watchdog = Watchdog(limit_s=limit_for(config.timeout_s), on_stall=stalled)
    try:
        with precision.float32_math(config.precision):  # restored after: in-process runs
            _train(config, info, run_dir, heap_policy, beat=watchdog.beat if watchdog else None)
    except BaseException as exc:
        try:
            write_error_report(run_dir, info.rank, exception_summary(exc), traceback.format_exc())
        finally:
            raise
    finally:
        if watchdog is not None:
            watchdog.close()
        distributed.shutdown()


def _train(config: ProfileConfig, info: Any, run_dir: Path, heap_policy: str, *,
           beat: Any = None) -> None:
    import torch.distributed as dist

    from kfacperf import precision
    from kfacperf.profiler.stage_timer import StageTimer
    from kfacperf.profiler.telemetry import TelemetrySampler, device_info
    from kfacperf.runtime.heap import minor_faults
    from kfacperf.runtime.training import TrainConfig, Trainer
    from kfacperf.trace import parts as trace_parts
    from kfacperf.workloads import get_workload

    rank, world, device = info.rank, info.world_size, info.device
    workload = get_workload(config.workload, **config.workload_options)
    batch = config.batch_size or workload.default_batch_size
    model = workload.build_model(seed=config.seed).to(device)
    # a few distinct batches made up front and cycled: making synthetic data (on the CPU)
    # between steps would leave a GPU idle and stretch the run for nothing
    batches = [workload.make_batch(batch, seed=config.seed, step=k * world + rank, device=device)
               for k in range(min(config.total_steps, DATA_BATCHES))]
    (run_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    token = _mark_parts(run_dir / PARTS_DIR, rank)
    cuda = device.type == "cuda"
    gpu_index = (device.index or 0) if cuda else None
    dev_info = device_info(device_index=gpu_index)
    if not cuda:
        dev_info = dict(dev_info, torch_device="cpu")
    if rank == 0:
        prior = _prior_run(run_dir)
        write_run(run_dir, run_record(
            config, world_size=world, batch_per_rank=batch, device=dev_info,
            backend=info.backend, heap=heap_policy, timing="cuda_events" if cuda else "perf_counter_ns",
            precision_flags=precision.run_flags(config.precision),
            clock="per-rank perf_counter_ns; time 0 right after a barrier at the start",
            **({"start_time": prior["start_time"]} if "start_time" in prior else {}),
        ))
    events = trace_parts.event_appender(run_dir, rank)
    tel_sink = trace_parts.telemetry_appender(run_dir, rank) if cuda else None
    if world > 1:
        dist.barrier()
    origin = time.perf_counter_ns()
    timer = StageTimer(rank=rank, sink=events, cuda=cuda, isolate=config.isolate,
                       origin_ns=origin)
    sampler = None
    if tel_sink is not None:
        sampler = TelemetrySampler(rank=rank, device_index=gpu_index or 0, sink=tel_sink,
                                   origin_ns=origin, interval_s=config.telemetry_interval_s)
        sampler.start()
    trainer = Trainer(model, loss_fn=workload.loss_fn,
                      config=TrainConfig(**config.train_config_kwargs()), timer=timer,
                      seed=config.seed,
                      autocast_dtype=precision.autocast_dtype(config.precision))
    crash_after = _crash_point(rank)
    total = config.total_steps
    last_print = 0.0
    t_prev = time.perf_counter()
    beat = beat or (lambda: None)
    for step in range(total):  # total > warmup: the first measured step always comes
        beat()
        if step == config.warmup:
            faults_before = minor_faults()
        x, y = batches[step % len(batches)]
        loss = trainer.train_step(x, y)
        if crash_after is not None and step >= crash_after:
            os._exit(13)  # test hook: die like a killed process (no cleanup, no flush)
        now = time.perf_counter()
        if rank == 0 and (now - last_print >= PROGRESS_EVERY_S or step in (0, total - 1)):
            phase = "warm-up" if step < config.warmup else "measured"
            _log(f"step {step + 1}/{total} ({phase})  loss {float(loss):.4f}  "
                 f"{(now - t_prev) * 1e3:.1f} ms")
            last_print = now
        t_prev = time.perf_counter()
    measured = max(1, total - config.warmup)
    faults = (minor_faults() - faults_before) / measured
    if rank == 0:
        _log(f"page faults per measured step (rank 0): {faults:.0f}")
    timer.close()
    if sampler is not None:
        sampler.stop()
    events.close()
    if tel_sink is not None:
        tel_sink.close()
    beat()
    _finish(config, rank, world, run_dir, token, faults_per_step=faults)


def _prior_run(run_dir: Path) -> dict[str, Any]:
    try:
        return read_run(run_dir / "run.json")
    except (OSError, ValueError):
        return {}


def _id_path(parts: Path, rank: int) -> Path:
    return parts / f"rank{rank:05d}.id"


def _mark_parts(parts: Path, rank: int) -> str:
    """Write a random token beside this rank's parts; rank 0 reading the same token back
    later proves it sees this rank's files (one node, or a shared file system)."""
    token = os.urandom(8).hex()
    _id_path(parts, rank).write_text(token)
    return token


def _finish(config: ProfileConfig, rank: int, world: int, run_dir: Path, token: str, *,
            faults_per_step: float = 0.0) -> None:
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
        run.update(completed=True, end_time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   page_faults_per_step=round(faults_per_step, 1))
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


def _read_token(parts: Path, rank: int) -> str | None:
    try:
        return _id_path(parts, rank).read_text()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    """A rank as a process of its own: on failure one line on stderr (the traceback is in
    the error report) and exit status 1."""
    from kfacperf.runtime.launch import die_with_parent

    die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kfacperf.runtime.worker CONFIG_JSON", file=sys.stderr)
        return 2
    config = ProfileConfig.from_json(args[0])
    try:
        run_worker(config)
    except Exception as exc:
        from kfacperf.safety import terminal_safe

        rank = os.environ.get("RANK", "?")
        print(f"[kfacperf] rank {rank}: error: {terminal_safe(exception_summary(exc))}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    code = main()
    # Leave without the interpreter's teardown: by now the process group is destroyed and the
    # trace written, and gloo's threads still holding finished work objects can abort the
    # process while Python finalizes ("terminate called without an active exception", about
    # one 2-rank CPU run in twenty), which torchrun would report as a failed run.
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get(CRASH_ENV) == f"{os.environ.get('RANK')}:{EXIT_CRASH}":
        os.abort()  # test hook: die as that abort does
    os._exit(code)
