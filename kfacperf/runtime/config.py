"""What a profiling run is asked to do: :class:`ProfileConfig`, shared by the launcher and the
ranks (it travels to them as JSON), and the ``run.json`` record built from it.

This module never imports torch.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kfacperf import vocab as S
from kfacperf.runtime.precision import DEFAULT_PRECISION
from kfacperf.runtime.settings import OptimizerSettings
from kfacperf.sim.graphs.strategies.common import MAX_BUCKET_MB
from kfacperf.workloads import reference as workload_ref

DEVICES = ("auto", "cpu", "cuda")

MAX_TIMEOUT_S = 86400.0
"""The longest ``--timeout``: a day."""
MAX_NPROC = 1024
"""The most ranks started on one node (every rank is a process of its own)."""

CRASH_ENV = "KFACPERF_TEST_CRASH_AFTER"
"""Test hook: ``"R:K"`` makes rank R exit abruptly (``os._exit(13)``) right after step K;
``"R:exit"`` makes it abort as it leaves, after the run finished."""
EXIT_CRASH = "exit"
"""The ``CRASH_ENV`` step that means: abort while leaving, after the run finished."""


@dataclass(frozen=True, kw_only=True)
class ProfileConfig(OptimizerSettings):
    """Settings of one ``kfacperf profile`` run; ``batch_size`` is per rank.

    ``workload`` is a registry name or a factory reference (``FILE.py:FUNC``,
    ``package.module:FUNC``); a file's path is made absolute here, so every rank and every
    later reader of ``run.json`` finds the same file.
    """

    workload: str
    out: str
    optimizer: str = S.KFAC
    strategy: str | None = None  # default: "sgd" for SGD, "spngd" for K-FAC
    workload_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 30
    warmup: int = 5
    batch_size: int | None = None  # default: the workload's
    nproc: int = 1
    threads_per_rank: int = 1
    isolate: bool = False
    keep_heap: bool = True  # see kfacperf.runtime.heap
    timeout_s: float = 60.0
    device: str = "auto"
    precision: str = DEFAULT_PRECISION  # see kfacperf.runtime.precision
    seed: int = 0
    telemetry_interval_s: float = 0.1
    nnodes: str = "1"
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "kfacperf"
    command: str = ""

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"{flag_of(key)} {why}, got {getattr(self, key)!r}")

        if not str(self.out).strip():
            raise ValueError("--out must name a directory, got an empty path")
        if workload_ref.is_reference(self.workload):
            object.__setattr__(self, "workload", workload_ref.absolute(self.workload))
        S.check_choice("optimizer", self.optimizer, S.OPTIMIZERS)
        strategy = S.check_choice("strategy", self.resolved_strategy, S.PROFILE_STRATEGIES)
        if self.optimizer == S.SGD and strategy != S.SGD:
            raise ValueError(f"--optimizer sgd runs the DDP baseline; --strategy {strategy} is a "
                             "K-FAC strategy (leave it out, or use --optimizer kfac)")
        if self.optimizer == S.KFAC and strategy == S.SGD:
            raise ValueError("--optimizer kfac needs a K-FAC strategy: spngd, kaisa or local")
        for key in ("steps", "nproc", "threads_per_rank", "factor_interval", "inverse_interval"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "must be a positive integer")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise bad("warmup", "must be a non-negative integer")
        if self.batch_size is not None and (not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise bad("batch_size", "must be a positive integer")
        S.check_intervals(self.factor_interval, self.inverse_interval,
                          names=("--factor-interval", "--inverse-interval"))
        for key in ("timeout_s", "damping", "telemetry_interval_s"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be > 0")
        if not math.isfinite(self.damping):
            raise bad("damping", "must be a finite number > 0")
        for key in ("lr", "momentum", "weight_decay"):
            v = getattr(self, key)
            if isinstance(v, bool) or not (math.isfinite(v) and v >= 0):
                raise bad(key, "must be a finite number >= 0")
        if not 0 <= self.factor_decay < 1:
            raise bad("factor_decay", "must be in [0, 1) (the weight of the old factors)")
        if self.kl_clip is not None and not (math.isfinite(self.kl_clip) and self.kl_clip > 0):
            raise bad("kl_clip", "must be a finite number > 0, or none")
        if not 0 < self.bucket_cap_mb <= MAX_BUCKET_MB:
            raise bad("bucket_cap_mb", f"must be > 0 and at most {MAX_BUCKET_MB:g}")
        if self.fused and strategy != S.SPNGD:
            raise ValueError(f"--fused is an SP-NGD option (one fused all-reduce); --strategy "
                             f"{strategy} does not take it (leave it out, or use --strategy "
                             "spngd)")
        if self.nproc > MAX_NPROC:
            raise ValueError(f"--nproc must be at most {MAX_NPROC} (processes on this node), "
                             f"got {self.nproc}")
        if not self.timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"--timeout must be at most {MAX_TIMEOUT_S:g} seconds (a day), "
                             f"got {self.timeout_s!r}")
        if not 0 < self.grad_worker_fraction <= 1:
            raise bad("grad_worker_fraction", "must be in (0, 1]")
        S.check_choice("inverse method", self.inverse_method, S.INVERSE_METHODS)
        S.check_choice("device", self.device, DEVICES)
        S.check_choice("comm dtype", self.comm_dtype, S.COMM_DTYPES)
        S.check_choice("bn_blocks", self.bn_blocks, S.BN_BLOCKS)
        S.check_choice("fisher", self.fisher, S.FISHER_TYPES)
        if not isinstance(self.batch_first, bool):
            raise bad("batch_first", "must be True or False")
        if self.optimizer == S.SGD and (self.bn_blocks, self.fisher) != (S.BN_NONE,
                                                                         S.FISHER_EMP):
            raise ValueError("--bn-blocks and --fisher are K-FAC settings; --optimizer sgd "
                             "takes neither (leave them out, or use --optimizer kfac)")
        S.check_choice("precision", self.precision, S.COMPUTE_DTYPES)
        nodes = _node_range(str(self.nnodes))
        if nodes is None:
            raise ValueError(f"--nnodes must be a number of nodes N >= 1, or MIN:MAX with "
                             f"1 <= MIN <= MAX, got {self.nnodes!r}")
        rank_ok = (not isinstance(self.node_rank, bool) and isinstance(self.node_rank, int)
                   and 0 <= self.node_rank < nodes[1])
        if not rank_ok:
            where = (f"0 on one node (--nnodes {self.nnodes}; leave it out)" if nodes[1] == 1
                     else f"in [0, {nodes[1] - 1}] (one of the --nnodes {self.nnodes} nodes)")
            raise ValueError(f"--node-rank must be {where}, got {self.node_rank!r}")
        if self.multi_node and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT")

    @property
    def resolved_strategy(self) -> str:
        if self.strategy is not None:
            return self.strategy
        return S.default_strategy(self.optimizer)

    @property
    def multi_node(self) -> bool:
        return self.nnodes not in ("1", "1:1")

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ProfileConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"profile config has unknown key(s) {', '.join(unknown)}")
        return cls(**data)

    def train_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`kfacperf.runtime.training.TrainConfig`."""
        return {"optimizer": self.optimizer, "strategy": self.resolved_strategy,
                **self.optimizer_settings()}


def _node_range(nnodes: str) -> tuple[int, int] | None:
    """``--nnodes`` as (min, max) nodes (torchrun's ``N`` or ``MIN:MAX``), or None if it is
    neither."""
    low, _, high = nnodes.partition(":")
    high = high if ":" in nnodes else low
    if not (low.isdigit() and high.isdigit()):
        return None
    lo, hi = int(low), int(high)
    return (lo, hi) if 1 <= lo <= hi else None


_FLAGS = {"timeout_s": "--timeout", "telemetry_interval_s": "--telemetry-interval"}
"""Fields whose ``kfacperf profile`` flag is not ``--`` + the field's name with dashes."""


def flag_of(key: str) -> str:
    """The ``kfacperf profile`` flag that sets field ``key`` (``timeout_s`` -> ``--timeout``)."""
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


def command_line() -> str:
    """The command line that started this process, as a shell would re-run it."""
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) in ("kfacperf", "__main__.py", "cli.py"):
        argv[0] = "kfacperf"
    return " ".join(shlex.quote(a) for a in argv)


def run_record(
    config: ProfileConfig,
    *,
    world_size: int,
    batch_per_rank: int | None,
    device: dict[str, Any] | None,
    completed: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The ``run.json`` of a run with ``config`` (see :data:`kfacperf.trace.store.RUN_KEYS`)."""
    from kfacperf import __version__

    torch = sys.modules.get("torch")
    rec: dict[str, Any] = {
        "workload": config.workload,
        "workload_options": dict(config.workload_options),
        "optimizer": config.optimizer,
        "strategy": config.resolved_strategy,
        "grad_worker_fraction": config.grad_worker_fraction,
        "factor_interval": config.factor_interval,
        "inverse_interval": config.inverse_interval,
        "damping": config.damping,
        "inverse_method": config.inverse_method,
        "factor_decay": config.factor_decay,
        "kl_clip": config.kl_clip,
        "lr": config.lr,
        "momentum": config.momentum,
        "fused": config.fused,
        "comm_dtype": config.comm_dtype,
        "precision": config.precision,
        "symmetric": config.symmetric,
        "bucket_cap_mb": config.bucket_cap_mb,
        "bn_blocks": config.bn_blocks,
        "fisher": config.fisher,
        "batch_first": config.batch_first,
        "world_size": world_size,
        "batch_per_rank": batch_per_rank,
        "steps": config.steps,
        "warmup": config.warmup,
        "isolate": config.isolate,
        "seed": config.seed,
        "threads_per_rank": config.threads_per_rank,
        "device": device,
        "torch_version": getattr(torch, "__version__", None) if torch else None,
        "kfacperf_version": __version__,
        "command": config.command or command_line(),
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "completed": completed,
    }
    rec.update(extra)
    return rec
