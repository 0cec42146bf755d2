"""``kfacperf profile`` end to end: prepare the trace directory, start the ranks, report.

Three ways to run, chosen from the environment:

* **under an existing torchrun** (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
  and ``MASTER_PORT`` set): this process is one rank; ``--nproc``/``--nnodes`` are torchrun's
  business and ignored.
* **one process** (``--nproc 1``, one node): the rank runs in this process (a gloo group of
  one, so strategies behave as in a real run), without torchrun's start-up cost.
* **otherwise**: ``python -m torch.distributed.run --nproc-per-node N`` re-invokes
  :mod:`kfacperf.runtime.worker` N times (``--standalone`` on one node; with ``--nnodes``,
  ``--node-rank``, ``--rdzv-endpoint`` passed through, the same command run on every node
  makes a multi-node job).  A rank that fails makes torchrun stop the others; the trace keeps
  every finished step and this reports who stopped where.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kfacperf.runtime.config import ProfileConfig, run_record
from kfacperf.runtime.net import free_port
from kfacperf.trace.schema import EVENTS_FILE, PARTS_DIR, RUN_FILE, TELEMETRY_FILE, WORKLOAD_FILE
from kfacperf.trace.store import Trace, load_trace, write_run
from kfacperf.vocab import STEP

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PREPARED_ENV = "KFACPERF_OUT_PREPARED"
_TRACE_FILES = (RUN_FILE, EVENTS_FILE, TELEMETRY_FILE, WORKLOAD_FILE, RUN_FILE + ".tmp",
                EVENTS_FILE + ".tmp")


@dataclass(frozen=True, kw_only=True)
class ProfileOutcome:
    """``ok``: the run completed.  ``trace``: what was recorded (None on ranks other than 0
    under torchrun).  ``message``: why it failed (or, when ``ok``, a warning)."""

    ok: bool
    trace: Trace | None
    message: str = ""


def under_torchrun(env: os._Environ[str] | dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(k in env for k in TORCHRUN_ENV)


def prepare_out(out: Path, *, force: bool) -> None:
    """Create the trace directory; an existing non-empty one needs ``force`` (and then only
    trace files are removed, nothing else)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"--out {out} already exists and is not empty; "
                             "pass --force to overwrite its trace")
        for name in _TRACE_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)


def validate(config: ProfileConfig) -> None:
    """Fail fast, before starting processes, on a bad workload, option or optimizer setting."""
    import torch

    from kfacperf.runtime.training import TrainConfig
    from kfacperf.workloads import get_workload

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (torch "
                         f"{torch.__version__}); use --device cpu or auto")
    get_workload(config.workload, **config.workload_options)
    TrainConfig(**config.train_config_kwargs())
    if config.resolved_strategy == "local" and (config.nproc > 1 or config.multi_node):
        raise ValueError("--strategy local runs on one process; use spngd or kaisa with --nproc > 1")


def launch_command(config: ProfileConfig) -> list[str]:
    """The torchrun command line that starts this node's ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(config.nproc),
           "--max-restarts", "0", "--monitor-interval", "0.2"]
    if config.multi_node:
        cmd += ["--nnodes", config.nnodes, "--node-rank", str(config.node_rank),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", str(config.rdzv_endpoint),
                "--rdzv-id", config.rdzv_id]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "kfacperf.runtime.worker", config.to_json()]


def profile(config: ProfileConfig, *, force: bool = False) -> ProfileOutcome:
    """Run the profile ``config`` describes; see the module docstring."""
    from kfacperf.runtime import worker

    out = Path(config.out)
    if under_torchrun():
        rank = int(os.environ["RANK"])
        if rank == 0 and os.environ.get(PREPARED_ENV) != "1":
            validate(config)
            # before joining the process group: no rank touches ``out`` until all have joined
            prepare_out(out, force=force)
        worker.run_worker(config)
        return ProfileOutcome(ok=True, trace=load_trace(out) if rank == 0 else None)
    validate(config)
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
    rc = subprocess.call(launch_command(config), env=env)
    if not lead:
        return ProfileOutcome(ok=rc == 0, trace=None,
                              message="" if rc == 0 else f"torchrun exited with status {rc}")
    if rc == 0:
        return ProfileOutcome(ok=True, trace=load_trace(out))
    finished = _finished_trace(config, out)
    if finished is not None:
        return ProfileOutcome(ok=True, trace=finished, message=(
            f"torchrun exited with status {rc} after every rank had recorded every step and "
            "the trace was written and marked completed (a rank failed while exiting); the "
            "trace is complete"))
    return _failed(config, out, f"torchrun exited with status {rc}")


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
    except ValueError:
        raise
    except Exception as exc:
        return _failed(config, out, f"{type(exc).__name__}: {exc}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ProfileOutcome(ok=True, trace=load_trace(out))


def _failed(config: ProfileConfig, out: Path, why: str) -> ProfileOutcome:
    """Say what failed, which ranks stopped where, and what the trace still holds."""
    from kfacperf.runtime.recording import error_path

    lines = [f"the run failed ({why})."]
    errors = sorted((out / PARTS_DIR).glob("error-rank*.txt"))
    for path in errors:
        tail = [ln for ln in path.read_text().strip().splitlines() if ln.strip()]
        lines.append(f"  rank {int(path.stem.rsplit('rank', 1)[1])}: "
                     f"{tail[-1] if tail else '(empty report)'}  [{path}]")
    trace = None
    try:
        trace = load_trace(out)
    except (OSError, ValueError) as exc:
        lines.append(f"  no readable trace in {out}: {exc}")
    if trace is not None:
        ev = trace.events
        done = ev[ev["stage"] == STEP].groupby("rank")["step"].agg(["count", "max"])
        world = int(trace.run.get("world_size") or 0) or (int(ev["rank"].max()) + 1 if len(ev) else 0)
        for rank in range(world):
            n = int(done.loc[rank, "count"]) if rank in done.index else 0
            reported = error_path(out, rank).exists()
            note = "" if reported else ", no error report (killed, crashed or stopped by torchrun)"
            last = f"last finished step {int(done.loc[rank, 'max'])}" if n else "no finished step"
            lines.append(f"  rank {rank}: {n}/{config.total_steps} steps recorded, {last}{note}")
        if len(done):
            first = int(done["count"].idxmin())
            lines.append(f"  fewest finished steps: rank {first}")
        lines.append(f"the trace in {out} keeps every finished step and is marked incomplete "
                     "(completed=false); it can be loaded and summarized as it is.")
    return ProfileOutcome(ok=False, trace=trace, message="\n".join(lines))
