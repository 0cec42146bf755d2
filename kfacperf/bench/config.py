"""What ``kfacperf commbench`` is asked to measure (no torch): :class:`CommbenchConfig`."""
from __future__ import annotations

from dataclasses import dataclass

from kfacperf.bench.results import DEFAULT_SIZES, TIMINGS
from kfacperf.bench.timing import sent_bytes
from kfacperf.sim.models.cluster import OPS

MAX_RANKS = 1024
"""The most ranks one launch starts on one node (as ``kfacperf profile``)."""
MAX_TIMEOUT_S = 86400.0
"""The longest ``timeout_s``: a day (as ``kfacperf profile``)."""


@dataclass(frozen=True, kw_only=True)
class CommbenchConfig:
    world_sizes: tuple[int, ...] | None = None  # None: default_world_sizes(backend)
    sizes: tuple[int, ...] = DEFAULT_SIZES
    ops: tuple[str, ...] = OPS
    reps: int = 5
    warmup: int = 2
    backend: str = "auto"
    timeout_s: float = 120.0
    contention: bool = True
    collectives: bool = True  # False: only the contention probe
    timing: str = "auto"  # per_call | batched | auto (per_call on gloo, batched on NCCL)
    # across nodes (kfacperf.bench.multinode): one torchrun job of nnodes x nproc_per_node
    nnodes: int = 1
    nproc_per_node: int | None = None  # None: 1 on gloo, every GPU of the node on NCCL
    rdzv_endpoint: str | None = None  # HOST[:PORT] of the c10d rendezvous
    rdzv_id: str = "kfacperf-commbench"

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    def __post_init__(self) -> None:
        if not (self.collectives or self.contention):
            raise ValueError("nothing to measure: neither collectives nor contention")
        if self.world_sizes is not None and (
            not self.world_sizes or any(p < 2 for p in self.world_sizes)
        ):
            raise ValueError(f"world sizes must be >= 2, got {list(self.world_sizes)}")
        if self.world_sizes is not None and max(self.world_sizes) > MAX_RANKS:
            raise ValueError(f"world sizes must be at most {MAX_RANKS:,} ranks on one node, got "
                             f"{max(self.world_sizes):,}")
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise ValueError(f"sizes must be >= 1 byte, got {list(self.sizes)}")
        world = max(self.world_sizes or (2,))
        if self.collectives and len(self.sizes) > 1 and len(
                {sent_bytes(s, world) for s in self.sizes}) < 2:
            raise ValueError(f"sizes {list(self.sizes)} are one buffer on {world} ranks (whole "
                             f"fp32 elements, one per rank at least: {sent_bytes(1, world)} "
                             "bytes); give sizes that differ by more")
        bad = [op for op in self.ops if op not in OPS]
        if bad or not self.ops:
            raise ValueError(f"unknown collective(s) {bad}; known: {', '.join(OPS)}")
        if self.reps < 1 or self.warmup < 0:
            raise ValueError("reps must be >= 1 and warmup >= 0")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl, got {self.backend!r}")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:  # NaN too
            raise ValueError(f"--timeout must be a number of seconds > 0 and at most "
                             f"{MAX_TIMEOUT_S:g} (a day), got {self.timeout_s:g}")
        if self.timing not in ("auto",) + TIMINGS:
            raise ValueError(f"timing must be auto, {' or '.join(TIMINGS)}, got {self.timing!r}")
        if isinstance(self.nnodes, bool) or not isinstance(self.nnodes, int) or self.nnodes < 1:
            raise ValueError(f"--nnodes must be a positive integer, got {self.nnodes!r}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.multi_node and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, the "
                             "rendezvous every node reaches (the same on every node)")
        if not self.multi_node and (self.nproc_per_node is not None or self.rdzv_endpoint):
            raise ValueError("--nproc-per-node and --rdzv-endpoint are for runs across nodes "
                             "(--nnodes N > 1); on one machine use --world-sizes")


