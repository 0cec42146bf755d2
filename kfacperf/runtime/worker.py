"""What every rank of a profiling run does: set up, train instrumented, write its rows.

Started by ``torchrun`` (``python -m kfacperf.runtime.worker CONFIG_JSON``), by
``kfacperf profile`` itself for one process, or by ``kfacperf profile`` run under a
user's own ``torchrun``.  The trace side (``run.json``, crash-safe per-rank parts, the stage
timer, telemetry, compaction at the end) is :class:`kfacperf.runtime.recording.TraceRecorder`.
A rank that fails leaves ``parts/error-rank<R>.txt``: one line saying what failed, then the
traceback; on the terminal it prints that one line only.  With more than one rank a
:class:`~kfacperf.runtime.watchdog.Watchdog` ends a rank that finishes no step within the
process-group timeout plus a grace.  A workload given
as a factory reference (``FILE.py:FUNC``) is checked to be the same file on every rank, and
rank 0 writes its workload model into the trace (``workload.toml``), so the simulator and
``kfacperf calibrate``/``validate`` find it there.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from kfacperf.runtime.config import CRASH_ENV, EXIT_CRASH, ProfileConfig
from kfacperf.runtime.recording import (
    error_path,
    exception_summary,
    peer_progress,
    read_error_summary,
    write_error_report,
)

__all__ = ["error_path", "exception_summary", "main", "read_error_summary", "run_worker"]

PROGRESS_EVERY_S = 2.0
DATA_BATCHES = 4


def _crash_point(rank: int) -> int | None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    r, _, k = spec.partition(":")
    return int(k) if int(r) == rank and k != EXIT_CRASH else None


def _log(msg: str) -> None:
    """Progress, on stderr: a caller of the library keeps stdout to itself."""
    print(f"[kfacperf] {msg}", file=sys.stderr, flush=True)


def run_worker(config: ProfileConfig) -> None:
    """Run this rank's share of the profile described by ``config``."""
    import torch

    from kfacperf.runtime import distributed, heap, precision
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
        with (precision.float32_math(config.precision),  # restored after: in-process runs
              precision.denormals_flushed(info.device.type) as flushed):
            _train(config, info, run_dir, heap_policy, beat=watchdog.beat if watchdog else None,
                   run_extra={"flush_denormal": flushed})
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
           beat: Any = None, run_extra: dict[str, Any] | None = None) -> None:
    from kfacperf.runtime import precision
    from kfacperf.runtime.heap import minor_faults
    from kfacperf.runtime.recording import TraceRecorder
    from kfacperf.runtime.training import TrainConfig, Trainer
    from kfacperf.workloads import get_workload

    rank, world, device = info.rank, info.world_size, info.device
    workload = get_workload(config.workload, **config.workload_options)
    fingerprint = same_factory_everywhere(config.workload, world)
    batch = config.batch_size or workload.default_batch_size
    model = workload.build_model(seed=config.seed).to(device)
    # a few distinct batches made up front and cycled: making synthetic data (on the CPU)
    # between steps would leave a GPU idle and stretch the run for nothing
    batches = [workload.make_batch(batch, seed=config.seed, step=k * world + rank, device=device)
               for k in range(min(config.total_steps, DATA_BATCHES))]
    if rank == 0 and fingerprint:
        _write_model_or_say_why(run_dir, config)
    recorder = TraceRecorder(
        config, info, device=device, heap_policy=heap_policy, batch_per_rank=batch,
        run_extra={**(run_extra or {}),
                   **({"workload_fingerprint": fingerprint} if fingerprint else {})})
    timer = recorder.timer
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
    beat()
    recorder.finish(faults_per_step=faults)


def same_factory_everywhere(workload: str, world: int) -> str:
    """The fingerprint of a factory reference's file (``""`` for a registry workload),
    checked to be the same on every rank: a node with another version of the file would
    train another model."""
    from kfacperf.workloads import reference as workload_ref

    if not workload_ref.is_reference(workload):
        return ""
    from kfacperf.workloads.user import factory_fingerprint

    mine = factory_fingerprint(workload)
    if world > 1:
        import torch.distributed as dist

        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        differ = [r for r, fp in enumerate(every) if fp != every[0]]
        if differ:
            raise ValueError(
                f"--workload {workload}: rank(s) {', '.join(map(str, differ))} loaded another "
                f"version of the file than rank 0 (sha256 {every[differ[0]][:12]} vs "
                f"{every[0][:12]}); every node needs the same file")
    return mine


def write_trace_workload_model(run_dir: Path, config: ProfileConfig) -> None:
    """The workload model of ``config``'s workload, as ``kfacperf calibrate --workload``
    writes it, into the trace directory (see :data:`kfacperf.trace.schema.WORKLOAD_FILE`).
    A first-order run's model may be one K-FAC cannot train (a layer called twice, tied
    layers): it describes what the run computes."""
    from kfacperf.sim.models import save_workload_model
    from kfacperf.trace.schema import WORKLOAD_FILE
    from kfacperf.vocab import KFAC
    from kfacperf.workloads.workload_model import build_workload_model

    model = build_workload_model(config.workload, dict(config.workload_options),
                                 strict=config.optimizer == KFAC)
    save_workload_model(model, run_dir / WORKLOAD_FILE)


def _write_model_or_say_why(run_dir: Path, config: ProfileConfig) -> None:
    """:func:`write_trace_workload_model`; a first-order run of a model with no K-FAC layer
    (which a workload model is made of) goes on without one, and says so."""
    from kfacperf.vocab import SGD
    from kfacperf.workloads.describe import NoLayerError

    try:
        write_trace_workload_model(run_dir, config)
    except NoLayerError:
        if config.optimizer != SGD:
            raise
        print("[kfacperf] no workload model in the trace: the simulator's workload model is "
              "made of a model's nn.Linear and nn.Conv2d layers, and this model has none; the "
              "run goes on (report reads its trace; calibrate, validate and simulate need a "
              "workload model)", file=sys.stderr, flush=True)


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
