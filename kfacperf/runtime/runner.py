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
incomplete (``completed`` false, ``failure`` saying why) and reported rank by rank
(:mod:`kfacperf.runtime.stopped_runs`).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kfacperf.runtime import launch
from kfacperf.runtime import stopped_runs as stopped
from kfacperf.runtime.config import ProfileConfig, run_record
from kfacperf.runtime.net import free_port
from kfacperf.runtime.stopped_runs import ProfileOutcome
from kfacperf.trace.schema import (
    PARTS_DIR,
    TRACE_FILES,
)
from kfacperf.trace.store import load_trace, write_run
from kfacperf.vocab import KAISA, LOCAL, SGD

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PREPARED_ENV = "KFACPERF_OUT_PREPARED"


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

            return stopped.rank_stopped(out, rank, f"interrupted by {signal_name(exc)}",
                                 interrupted=signal_name(exc))
        except Exception as exc:  # one line; the traceback is in the rank's error report
            return stopped.rank_stopped(out, rank, f"rank {rank} failed: "
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
    finished = stopped.finished_trace(config, out)
    if finished is not None:
        return ProfileOutcome(ok=True, trace=finished, interrupted=sup.interrupted, message=(
            f"{stopped.cause_text(sup)} after every rank had recorded every step and the trace "
            "was written and marked completed (a rank failed while exiting); the trace is "
            "complete"))
    if sup.interrupted:
        return stopped.interrupted_outcome(config, out, sup.interrupted)
    return stopped.failed_outcome(config, out, sup)


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
        if stopped.a_step_finished(out):  # the model's own error, mid-run: a failed run
            return stopped.failed_in_process(config, out, exc)
        # a setting (or model) found bad at set-up or in the first step: one line on the
        # terminal; the trace says why
        stopped.mark_incomplete(out, worker.exception_summary(exc))
        raise
    except KeyboardInterrupt as exc:
        from kfacperf.errors import signal_name

        return stopped.interrupted_outcome(config, out, signal_name(exc))
    except Exception as exc:
        return stopped.failed_in_process(config, out, exc)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ProfileOutcome(ok=True, trace=load_trace(out))

