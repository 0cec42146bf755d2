"""``kfacperf profile`` end to end: prepare the trace directory, start the ranks, report.

Four ways to run, chosen from the environment and the flags:

* **under an existing torchrun** (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
  and ``MASTER_PORT`` set): this process is one rank; ``--nproc``/``--nnodes`` are torchrun's
  business and ignored.
* **one process** (``--nproc 1``, one node): the rank runs in this process (a gloo group of
  one, so strategies behave as in a real run).
* **several processes on one node**: this process starts the N ranks itself
  (:mod:`kfacperf.runtime.launch`), with the rendezvous store and gloo bound to the loopback
  interface, and watches them: a rank that fails, is killed or stays stopped past
  ``--timeout`` stops the run within seconds, and Ctrl-C or SIGTERM stops every rank.
* **several nodes** (``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``; the same command on
  every node): ``torch.distributed.run`` starts this node's ranks with its c10d rendezvous,
  whose store listens on the network: use a trusted network.

In every case the trace keeps every finished step, and a failed or interrupted run is marked
incomplete (``completed`` false, ``failure`` saying why) and reported rank by rank.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from kfacperf.runtime import launch
from kfacperf.runtime.config import ProfileConfig, run_record
from kfacperf.runtime.net import free_port
from kfacperf.trace.schema import (
    PARTS_DIR,
    RUN_FILE,
    TRACE_FILES,
)
from kfacperf.trace.store import Trace, load_trace, read_run, write_run
from kfacperf.vocab import KAISA, LOCAL, SGD, STEP

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PREPARED_ENV = "KFACPERF_OUT_PREPARED"


@dataclass(frozen=True, kw_only=True)
class ProfileOutcome:
    """``ok``: the run completed.  ``trace``: what was recorded (None on ranks other than 0
    under torchrun).  ``message``: why it failed (or, when ``ok``, a warning).
    ``interrupted``: the signal that stopped the run (``"SIGINT"``, ``"SIGTERM"``), or ""."""

    ok: bool
    trace: Trace | None
    message: str = ""
    interrupted: str = ""

    @property
    def exit_status(self) -> int:
        """0, 1 for a failed run, 128 + N after signal N."""
        if self.interrupted:
            return 128 + int(signal.Signals[self.interrupted])
        return 0 if self.ok else 1


def under_torchrun(env: os._Environ[str] | dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(k in env for k in TORCHRUN_ENV)


def prepare_out(out: Path, *, force: bool) -> None:
    """Create the trace directory; an existing non-empty one needs ``force`` (and then only
    trace files are removed, nothing else)."""
    from kfacperf.safety import check_output_dir

    check_output_dir(out, force=force)
    if out.is_dir() and any(out.iterdir()):
        for name in TRACE_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)


def validate(config: ProfileConfig, *, world_size: int | None = None) -> None:
    """Fail fast, before starting processes, on a bad workload, option or optimizer setting
    (``world_size``: the number of ranks, where known)."""
    import torch

    from kfacperf.runtime.training import TrainConfig
    from kfacperf.sim.graphs.placement import grad_workers
    from kfacperf.workloads import get_workload
    from kfacperf.workloads import reference as workload_ref

    if config.resolved_strategy == KAISA and world_size is not None:
        try:  # what every rank would otherwise find out on its own, after the launch
            grad_workers(world_size, config.grad_worker_fraction)
        except ValueError as exc:
            raise ValueError(f"--grad-worker-fraction: {exc}") from None

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (torch "
                         f"{torch.__version__}); use --device cpu or auto")
    workload = get_workload(config.workload, **config.workload_options)
    if workload_ref.is_reference(config.workload):  # the user's model: what K-FAC can't take
        from kfacperf.workloads.describe import DescribeError, walk_workload

        try:  # a forward that fails on make_batch's inputs is a DescribeError too
            walk, _ = walk_workload(workload, strict=False)
        except DescribeError as exc:
            raise ValueError(f"--workload {config.workload}: {exc}") from None
        if config.optimizer != SGD and walk.kfac_problems:
            why = walk.kfac_problems[0]
            hint = "" if "optimizer sgd" in why else (
                "; --optimizer sgd runs it without K-FAC")
            raise ValueError(f"--workload {config.workload}: {why}{hint}")
    TrainConfig(**config.train_config_kwargs())
    if config.resolved_strategy == LOCAL and (config.nproc > 1 or config.multi_node):
        raise ValueError("--strategy local runs on one process; "
                         "use spngd or kaisa with --nproc > 1")


def worker_command(config: ProfileConfig) -> list[str]:
    """The command line of one rank."""
    return [sys.executable, "-u", "-m", "kfacperf.runtime.worker", config.to_json()]


def rank_environments(config: ProfileConfig, base: dict[str, str]) -> list[dict[str, str]]:
    """The environment of each local rank: torchrun's variables with a loopback
    ``MASTER_ADDR`` (the store binds there only), and gloo/NCCL on the loopback interface
    unless the user chose one."""
    common = dict(base, WORLD_SIZE=str(config.nproc), LOCAL_WORLD_SIZE=str(config.nproc),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key in ("TORCHELASTIC_USE_AGENT_STORE", "GROUP_RANK", "ROLE_RANK"):
        common.pop(key, None)
    if os.path.exists("/sys/class/net/lo"):
        common.setdefault("GLOO_SOCKET_IFNAME", "lo")
        common.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return [dict(common, RANK=str(r), LOCAL_RANK=str(r)) for r in range(config.nproc)]


def launch_command(config: ProfileConfig) -> list[str]:
    """The torchrun command line that starts this node's ranks of a multi-node run."""
    return [sys.executable, "-m", "kfacperf.runtime.torchrun", "--nproc-per-node",
            str(config.nproc), "--max-restarts", "0", "--monitor-interval", "0.2",
            "--nnodes", config.nnodes, "--node-rank", str(config.node_rank),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", str(config.rdzv_endpoint),
            "--rdzv-id", config.rdzv_id, "-m", "kfacperf.runtime.worker", config.to_json()]


def cpu_oversubscription(config: ProfileConfig) -> str:
    """A warning when this node's ranks would run more torch threads than it has cores on
    the CPU ("" otherwise): they then share cores, and every compute stage is slower than
    alone (a cluster model's ``[host]`` contention prices that; a GPU cluster has none)."""
    if config.device == "cuda":
        return ""
    if config.device == "auto":
        import torch

        if torch.cuda.is_available():
            return ""
    cores = os.cpu_count() or 1
    threads = config.nproc * config.threads_per_rank
    if threads <= cores:
        return ""
    return (f"{config.nproc} rank(s) x {config.threads_per_rank} thread(s) on {cores} CPU "
            f"core(s): the ranks share cores, so each stage takes longer than it would alone "
            "and the run slows down steeply; use fewer --nproc or --threads-per-rank for "
            "timings of the work itself")


def profile(config: ProfileConfig, *, force: bool = False) -> ProfileOutcome:
    """Run the profile ``config`` describes; see the module docstring."""
    from kfacperf.runtime import worker

    out = Path(config.out)
    if under_torchrun():
        rank = int(os.environ["RANK"])
        if rank == 0 and os.environ.get(PREPARED_ENV) != "1":
            validate(config, world_size=int(os.environ["WORLD_SIZE"]))
            # before joining the process group: no rank touches ``out`` until all have joined
            prepare_out(out, force=force)
        try:
            worker.run_worker(config)
        except KeyboardInterrupt as exc:
            from kfacperf.errors import signal_name

            return _rank_stopped(out, rank, f"interrupted by {signal_name(exc)}",
                                 interrupted=signal_name(exc))
        except Exception as exc:  # one line; the traceback is in the rank's error report
            return _rank_stopped(out, rank, f"rank {rank} failed: "
                                 f"{worker.exception_summary(exc)}")
        return ProfileOutcome(ok=True, trace=load_trace(out) if rank == 0 else None)
    validate(config, world_size=None if ":" in str(config.nnodes) else _world(config))
    lead = config.node_rank == 0
    if lead:
        prepare_out(out, force=force)
        write_run(out, run_record(config, world_size=_world(config),
                                  batch_per_rank=config.batch_size, device=None))
    else:
        (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    if config.nproc == 1 and not config.multi_node:
        return _in_process(config, out)
    env = dict(os.environ, OMP_NUM_THREADS=str(config.threads_per_rank))
    env[PREPARED_ENV] = "1"
    if config.multi_node:
        sup = _run_torchrun(config, env)
    else:
        procs = launch.start(worker_command(config), rank_environments(config, env))
        sup = launch.supervise(procs, stalled_after_s=config.timeout_s)
    if not lead:
        why = sup.interrupted or (sup.cause.how if sup.cause else "")
        return ProfileOutcome(ok=sup.ok, trace=None, interrupted=sup.interrupted,
                              message="" if sup.ok else f"this node's ranks stopped ({why})")
    if sup.ok:
        return ProfileOutcome(ok=True, trace=load_trace(out))
    finished = _finished_trace(config, out)
    if finished is not None:
        return ProfileOutcome(ok=True, trace=finished, interrupted=sup.interrupted, message=(
            f"{_cause_text(sup)} after every rank had recorded every step and the trace was "
            "written and marked completed (a rank failed while exiting); the trace is complete"))
    if sup.interrupted:
        return _interrupted(config, out, sup.interrupted)
    return _failed(config, out, sup)


def _run_torchrun(config: ProfileConfig, env: dict[str, str]) -> launch.Supervision:
    """This node's ranks of a multi-node run, under torch.distributed.run; Ctrl-C or SIGTERM
    stops torchrun and every rank below it."""
    [proc] = launch.start(launch_command(config), [env], ranks_below=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt as exc:
        from kfacperf.errors import signal_name

        with launch.signals_ignored():
            launch.stop([proc], extra_pids=launch.descendants(proc.pid))
        return launch.Supervision(ok=False, interrupted=signal_name(exc))
    end = launch.RankEnd(rank=-1, status=code, how=f"torchrun {launch.describe_status(code)}")
    return launch.Supervision(ok=code == 0, ends=(), cause=None if code == 0 else end)


def _cause_text(sup: launch.Supervision) -> str:
    if sup.interrupted:
        return f"interrupted by {sup.interrupted}"
    c = sup.cause
    if c is None:
        return "the run failed"
    return c.how if c.rank < 0 else f"rank {c.rank} {c.how}"


def _mark_incomplete(out: Path, why: str) -> None:
    """Say in run.json why the run did not complete (it stays ``completed: false``)."""
    try:
        run = read_run(out / RUN_FILE)
    except (OSError, ValueError):
        return
    if not run.get("completed"):
        run["failure"] = why
        write_run(out, run)


def _steps_recorded(out: Path) -> tuple[Trace | None, str]:
    """The partial trace and, in words, how many steps each rank recorded."""
    try:
        trace = load_trace(out, partial=True)
    except (OSError, ValueError) as exc:
        return None, f"no readable trace in {out}: {exc}"
    ev = trace.events
    done = ev[ev["stage"] == STEP].groupby("rank")["step"].nunique()
    world = int(trace.run.get("world_size") or 0)
    counts = [int(done.get(r, 0)) for r in range(world)]
    if counts and len(set(counts)) == 1:
        return trace, f"{counts[0]} finished step(s) of each rank"
    return trace, "finished steps " + ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts))


def _interrupted(config: ProfileConfig, out: Path, signame: str) -> ProfileOutcome:
    """One line: what stopped the run, and what the trace keeps."""
    _mark_incomplete(out, f"interrupted by {signame}")
    trace, steps = _steps_recorded(out)
    message = (f"interrupted by {signame}: stopped all {config.nproc} rank(s) of this node; "
               f"the trace in {out} keeps {steps} and is marked incomplete (completed=false)")
    return ProfileOutcome(ok=False, trace=trace, message=message, interrupted=signame)


def _finished_trace(config: ProfileConfig, out: Path) -> Trace | None:
    """The trace, if it is complete although torchrun failed: marked completed by rank 0 (after
    it gathered every rank's parts) and every rank recorded every step."""
    try:
        trace = load_trace(out)
    except (OSError, ValueError):
        return None
    if not trace.completed:
        return None
    ev = trace.events
    counts = ev[ev["stage"] == STEP].groupby("rank")["step"].nunique()
    world = int(trace.run.get("world_size") or 0)
    if world < 1 or len(counts) != world or (counts < config.total_steps).any():
        return None
    return trace


def _world(config: ProfileConfig) -> int:
    try:
        return config.nproc * int(config.nnodes.split(":")[-1])
    except ValueError:
        return config.nproc


def _in_process(config: ProfileConfig, out: Path) -> ProfileOutcome:
    from kfacperf.runtime import worker

    saved = {k: os.environ.get(k) for k in TORCHRUN_ENV + ("LOCAL_WORLD_SIZE",)}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        worker.run_worker(config)
    except ValueError as exc:
        if _a_step_finished(out):  # the model's own error, mid-run: a failed run
            return _failed_in_process(config, out, exc)
        # a setting (or model) found bad at set-up or in the first step: one line on the
        # terminal; the trace says why
        _mark_incomplete(out, worker.exception_summary(exc))
        raise
    except KeyboardInterrupt as exc:
        from kfacperf.errors import signal_name

        return _interrupted(config, out, signal_name(exc))
    except Exception as exc:
        return _failed_in_process(config, out, exc)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ProfileOutcome(ok=True, trace=load_trace(out))


def _rank_stopped(out: Path, rank: int, why: str, *, interrupted: str = "") -> ProfileOutcome:
    """This rank's end under the user's torchrun: rank 0 says ``why`` in run.json."""
    from kfacperf.runtime.recording import error_path

    if rank == 0:
        _mark_incomplete(out, why)
    report = error_path(out, rank)
    where = f" (traceback: {report})" if report.exists() and not interrupted else ""
    return ProfileOutcome(ok=False, trace=None, interrupted=interrupted, message=(
        f"{why}{where}; the trace in {out} keeps every finished step and is marked "
        "incomplete (completed=false)"))


def _failed_in_process(config: ProfileConfig, out: Path, exc: Exception) -> ProfileOutcome:
    from kfacperf.runtime.recording import exception_summary

    cause = launch.RankEnd(rank=0, status=1, how=f"failed: {exception_summary(exc)}")
    return _failed(config, out, launch.Supervision(ok=False, cause=cause))


def _a_step_finished(out: Path) -> bool:
    """Whether rank 0 recorded a finished step (its part gets rows at each step's end): an
    error after that came from the run, not from checking the settings or the model."""
    from kfacperf.trace.parts import event_part_path, read_stream

    path = event_part_path(out / PARTS_DIR, 0)
    if not path.exists():
        return False
    table, _ = read_stream(path)
    return table is not None and table.num_rows > 0


def _culprit(sup: launch.Supervision, out: Path) -> str:
    """Which rank stopped the run, and how, in one line.  Ranks often end within the same
    moment, so the one named is a rank that failed on its own (killed, crashed, or an error
    of its own) before a rank that gave up waiting for a peer, and a stopped rank before
    the peers that waited for it."""
    from kfacperf.runtime.recording import error_path, read_error_summary

    cause = sup.cause
    if cause is None or cause.rank < 0:
        return _cause_text(sup)

    def report(rank: int) -> str:
        path = error_path(out, rank)
        return read_error_summary(path) if path.exists() else ""

    def waited(rank: int) -> bool:  # gave up waiting for a peer
        return report(rank).startswith(("CollectiveError", "Stalled"))

    def text(end: launch.RankEnd) -> str:
        why = report(end.rank)  # an in-process rank's ``how`` already says it
        return f"rank {end.rank} {end.how}" + (f": {why}" if why and why not in end.how else "")

    if cause.status is None:  # stopped past the timeout
        return text(cause)
    ends = sup.ends or (cause,)
    own = [e for e in ends if e.status not in (None, 0) and not waited(e.rank)]
    if own:
        return text(own[0])
    stopped = [e for e in ends if e.how == "was stopped"]
    if stopped:
        return (f"rank {stopped[0].rank} stopped responding (its process was stopped); "
                f"{text(cause)}")
    return text(cause)


def _failed(config: ProfileConfig, out: Path, sup: launch.Supervision) -> ProfileOutcome:
    """Say which rank stopped the run and how, what each rank recorded, and what the trace
    keeps; mark the trace incomplete."""
    from kfacperf.runtime.recording import error_path, read_error_summary

    cause = _culprit(sup, out)
    _mark_incomplete(out, cause)
    lines = [f"the run failed: {cause}."]
    ends = {e.rank: e for e in sup.ends}
    trace, recorded = _steps_recorded(out)
    done = None
    if trace is None:
        lines.append(f"  {recorded}")
    else:
        ev = trace.events
        done = ev[ev["stage"] == STEP].groupby("rank")["step"].agg(["count", "max"])
    world = int(trace.run.get("world_size") or 0) if trace is not None else len(ends)
    for rank in range(world):
        n = int(done.loc[rank, "count"]) if done is not None and rank in done.index else 0
        last = (f"last finished step {int(done.loc[rank, 'max'])}" if n and done is not None
                else "no finished step")
        parts = [f"  rank {rank}: {n}/{config.total_steps} steps recorded, {last}"]
        if rank in ends:
            parts.append(ends[rank].how)
        report = error_path(out, rank)
        if report.exists():
            parts.append(f"{read_error_summary(report)} [{report}]")
        lines.append("; ".join(parts))
    if trace is not None:
        silent = [r for r in range(world) if done is None or r not in done.index]
        usable = ("it can be loaded and summarized as it is" if not silent else
                  f"rank(s) {', '.join(map(str, silent))} recorded no step, so the commands "
                  "refuse it as a whole run (kfacperf.trace.store.load_trace(path, "
                  "partial=True) reads what is there)")
        lines.append(f"the trace in {out} keeps every finished step and is marked incomplete "
                     f"(completed=false); {usable}.")
    return ProfileOutcome(ok=False, trace=trace, message="\n".join(lines))
