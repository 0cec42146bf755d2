"""What every strategy's step graph is made of: per-layer costs, sizes, buckets, step kinds.

Sizes follow the real optimizer (``kfacperf.kfac.layers`` / ``kfacperf.kfac.comm``):

* a layer's factors are ``dim_a**2 + dim_g**2`` elements (upper triangles when packed),
  sent in the factor communication precision, stored in fp32; a BatchNorm block's are its
  C 2x2 matrices (unit) or its 2C x 2C matrix (full) (:mod:`kfacperf.sim.costs.blocks`);
* its gradient (and preconditioned gradient) is ``dim_g * dim_a`` fp32 elements, plus one
  KL-clipping term when a preconditioned gradient travels;
* its inverse state is ``QA, QG, dA, dG`` (eigen) or ``A^-1, G^-1`` (cholesky), fp32 (a
  BatchNorm block's: :func:`kfacperf.sim.costs.blocks.inverse_elements`).

Buckets follow the rules in use: DDP's for gradients (items in reverse layer order; a bucket
closes once it reaches its limit, ``bucket_cap_mb`` MiB, optionally smaller for the first)
and the optimizer's factor plan, :func:`kfacperf.buckets.plan_buckets` (whole layers, last
first, closed the same way at ``bucket_cap_mb`` MB = 10**6 bytes).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kfacperf import vocab as S
from kfacperf.buckets import bucket_label, plan_buckets
from kfacperf.sim.costs import blocks
from kfacperf.sim.graphs.graph import UNSTAGED, Group, Program
from kfacperf.sim.graphs.placement import blocks_cost, nodes_spanned
from kfacperf.vocab import COMM_DTYPE_BYTES, StepKind

FP32 = S.DTYPE_BYTES["fp32"]


MAX_BUCKET_MB = 1e6
"""The largest bucket (1 TB): any larger is one bucket for every model there is."""


@dataclass(frozen=True, kw_only=True)
class CommSettings:
    """How the optimizer communicates (the real optimizer's options and defaults)."""

    factor_dtype: str = "fp32"
    symmetric: bool = False
    inverse_method: str = "eigen"
    precond_dtype: str = "fp32"
    """Precision of the preconditioned gradients sent back (SP-NGD's all-gather-v, KAISA's
    broadcast); SP-NGD sent them in fp16."""
    statistics_fraction: float = 1.0
    """Share of the layers whose statistics a factor step refreshes and sends (SP-NGD's stale
    statistics skip layers whose factors barely changed; 1: every layer)."""
    placement: str = "balanced"
    """SP-NGD's owners: balanced by cost, or contiguous runs of layers sorted by name
    (:data:`kfacperf.vocab.PLACEMENTS`)."""
    factor_bucket_mb: float = 25.0
    ddp_bucket_mb: float = 25.0
    ddp_first_bucket_mb: float = 25.0
    """DDP's 1 MiB first bucket applies only when ``bucket_cap_mb`` is left unset; the
    optimizer passes it explicitly (``kfacperf.kfac.ddp.wrap_ddp``), so every bucket is 25 MiB."""

    def __post_init__(self) -> None:
        S.check_choice("comm dtype", self.factor_dtype, S.COMM_DTYPES)
        S.check_choice("inverse method", self.inverse_method, S.INVERSE_METHODS)
        S.check_choice("comm dtype", self.precond_dtype, S.COMM_DTYPES)
        S.check_choice("placement", self.placement, S.PLACEMENTS)
        f = self.statistics_fraction
        if isinstance(f, bool) or not (isinstance(f, (int, float)) and 0 < f <= 1):
            raise ValueError(f"statistics_fraction must be in (0, 1], got {f!r}")
        for key in ("factor_bucket_mb", "ddp_bucket_mb", "ddp_first_bucket_mb"):
            v = getattr(self, key)
            if isinstance(v, bool) or not 0 < v <= MAX_BUCKET_MB:
                raise ValueError(f"{key} must be above 0 and at most {MAX_BUCKET_MB:g} MB, "
                                 f"got {v!r}")

    def factor_elems(self, n: int) -> int:
        return n * (n + 1) // 2 if self.symmetric else n * n

    def factor_comm_bytes(self, n: int) -> int:
        """Bytes of one factor as sent, in expectation over the layers a step refreshes."""
        return round(self.factor_elems(n) * COMM_DTYPE_BYTES[self.factor_dtype]
                     * self.statistics_fraction)


def comm_settings(options: Any, *, bucket_mb: float = 25.0, **chosen: Any) -> CommSettings:
    """How the optimizer communicates, from a cost model's options (``comm_dtype``,
    ``symmetric_factors``, ``inverse_method``, ``precond_dtype``, ``statistics_fraction``,
    ``placement``) and one bucket size for factors and DDP; ``chosen`` overrides fields (what
    a search varies)."""
    fields = dict(factor_dtype=options.comm_dtype, symmetric=options.symmetric_factors,
                  inverse_method=options.inverse_method, precond_dtype=options.precond_dtype,
                  statistics_fraction=options.statistics_fraction, placement=options.placement,
                  factor_bucket_mb=bucket_mb, ddp_bucket_mb=bucket_mb,
                  ddp_first_bucket_mb=bucket_mb)
    fields.update(chosen)
    return CommSettings(**fields)


@dataclass(frozen=True, kw_only=True)
class LayerCosts:
    """Per-layer stage times (us) and sizes (bytes), layers in forward order."""

    names: tuple[str, ...]
    fwd: tuple[float, ...]
    bwd: tuple[float, ...]
    factor: tuple[float, ...]
    inverse: tuple[float, ...]
    precond: tuple[float, ...]
    update: float
    fwd_flops: tuple[float, ...]
    bwd_flops: tuple[float, ...]
    factor_flops: tuple[float, ...]
    inverse_flops: tuple[float, ...]
    precond_flops: tuple[float, ...]
    dim_a: tuple[int, ...]
    dim_g: tuple[int, ...]
    other_params: int
    fwd_capture: float = 1.0
    """Forward on a factor step takes this times ``fwd`` (the statistics capture's overhead)."""
    bwd_capture: float = 1.0
    """Backward on a factor step takes this times ``bwd`` (statistics not included)."""
    grad_load: float = 0.0
    """K-FAC steps: host time forming every layer's gradient matrix after backward, in no
    stage (``DeviceModel.layer_host_us``)."""
    grad_write: float = 0.0
    """K-FAC steps: host time writing the preconditioned gradients back before the update,
    in no stage."""
    forms: tuple[str, ...] = ()
    """Each layer's block form (:data:`kfacperf.sim.costs.blocks.FORMS`); empty: every layer
    is Kronecker-factored."""
    mc_fisher: bool = False
    """Factor steps run the Monte-Carlo backward (``fisher = "mc"``) before the true one."""

    @property
    def n(self) -> int:
        return len(self.names)

    def form(self, l: int) -> str:
        return self.forms[l] if self.forms else blocks.KRONECKER

    def factor_items(self, l: int, cs: CommSettings) -> list[tuple[str, int]]:
        """A layer's statistics as the optimizer queues them: ``(tag, bytes)`` for A then G,
        or one item for a BatchNorm block."""
        item = COMM_DTYPE_BYTES[cs.factor_dtype]
        form = self.form(l)
        if form == blocks.KRONECKER:
            return [("A", cs.factor_comm_bytes(self.dim_a[l])),
                    ("G", cs.factor_comm_bytes(self.dim_g[l]))]
        return [("F", item * blocks.statistic_elements(form, self.dim_a[l], self.dim_g[l],
                                                       cs.symmetric))]

    def factor_comm_bytes(self, l: int, cs: CommSettings) -> int:
        return sum(nbytes for _, nbytes in self.factor_items(l, cs))

    def placement_cost(self, l: int) -> int:
        return blocks_cost(blocks.stacks(self.form(l), self.dim_a[l], self.dim_g[l]))

    def grad_bytes(self, l: int) -> int:
        return self.dim_a[l] * self.dim_g[l] * FP32

    def precond_bytes(self, l: int, cs: CommSettings | None = None) -> int:
        """A preconditioned gradient as sent (plus its KL-clipping term)."""
        size = COMM_DTYPE_BYTES[cs.precond_dtype] if cs is not None else FP32
        return (self.dim_a[l] * self.dim_g[l] + 1) * size

    def inverse_bytes(self, l: int, cs: CommSettings) -> int:
        """Inverse state as sent: eigenvectors and eigenvalues, or the two damped inverses
        (upper triangles when packed); always fp32."""
        return FP32 * blocks.inverse_elements(self.form(l), self.dim_a[l], self.dim_g[l],
                                              cs.inverse_method, cs.symmetric)


@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """Everything a strategy needs to write one step's programs."""

    costs: LayerCosts
    world_size: int
    gpus_per_node: int
    kind: StepKind
    comm: CommSettings

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"number of GPUs must be >= 1, got {self.world_size}")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")

    def world(self) -> Group:
        p = self.world_size
        return Group(("world",), ("world",), p, nodes_spanned(0, p, 1, self.gpus_per_node))


def ddp_buckets(costs: LayerCosts, cs: CommSettings) -> tuple[list[list[int]], list[int]]:
    """DDP's gradient buckets, in the order they fill during backward.

    Items are the layers in reverse order (index ``l``), then the non-K-FAC parameters (index
    ``-1``, ready when the backward pass ends).  Returns ``(buckets, nbytes)``.
    """
    items = [(l, costs.grad_bytes(l)) for l in reversed(range(costs.n))]
    if costs.other_params:
        items.append((-1, costs.other_params * FP32))
    limits = [int(cs.ddp_first_bucket_mb * 2**20), int(cs.ddp_bucket_mb * 2**20)]
    buckets: list[list[int]] = []
    sizes: list[int] = []
    cur: list[int] = []
    cur_bytes = 0
    for idx, nb in items:
        cur.append(idx)
        cur_bytes += nb
        if cur_bytes >= limits[min(len(buckets), 1)]:
            buckets.append(cur)
            sizes.append(cur_bytes)
            cur, cur_bytes = [], 0
    if cur:
        buckets.append(cur)
        sizes.append(cur_bytes)
    return buckets, sizes


BucketItem = tuple[tuple[int, str], int]
"""A factor bucket's item: ``((layer, tag), bytes)``, the tag naming the factor(s)."""


@dataclass(frozen=True)
class BucketEvent:
    """A factor bucket: its index, its layers, its ``(key, bytes)`` items, its size."""

    index: int
    layers: tuple[int, ...]
    items: tuple[BucketItem, ...]
    nbytes: int


FactorPlan = tuple[dict[int, list[BucketEvent]], list[BucketEvent]]
"""``(flushed by the hook of layer l, flushed by finish_factors)``."""


def _events(batches: list[tuple[int, list[list[BucketItem]]]],
            end: list[list[BucketItem]]) -> FactorPlan:
    after: dict[int, list[BucketEvent]] = {}
    count = 0

    def event(items: list[BucketItem]) -> BucketEvent:
        nonlocal count
        layers = tuple(dict.fromkeys(k[0] for k, _ in items))
        count += 1
        return BucketEvent(count - 1, layers, tuple(items), sum(n for _, n in items))

    for l, flushed in batches:
        if flushed:
            after[l] = [event(b) for b in flushed]
    return after, [event(b) for b in end]


def factor_plan(costs: LayerCosts, cs: CommSettings) -> FactorPlan:
    """The optimizer's factor buckets (:mod:`kfacperf.kfac.factor_exchange`): whole layers,
    last layer first, each its statistics and one presence flag, split by
    :func:`kfacperf.buckets.plan_buckets`; each bucket is sent by the hook of its last layer,
    none after the backward pass."""
    flag = COMM_DTYPE_BYTES[cs.factor_dtype]
    order = list(reversed(range(costs.n)))
    nbytes = {l: costs.factor_comm_bytes(l, cs) + flag for l in order}
    buckets = plan_buckets([(l, nbytes[l]) for l in order], int(cs.factor_bucket_mb * 1_000_000))
    return _events([(b[-1], [[((l, "AG"), nbytes[l]) for l in b]]) for b in buckets], [])


def emit_factor_prefix(costs: LayerCosts, kind: StepKind, plan: FactorPlan,
                       launch: Callable[[Program, BucketEvent, str], None], *,
                       on_grad: Callable[[Program, int], None] | None = None,
                       after_backward: Callable[[Program], None] | None = None) -> Program:
    """What every rank of a K-FAC strategy issues alike: forward, backward (on factor steps
    each factor bucket launched, by ``launch(prog, bucket, label)``, once the hook of the
    layer that fills it has run), ``after_backward`` (DDP's last buckets), the gradients'
    load, then the buckets left for after the backward pass and the wait for all of them."""
    after, end = plan
    prog = Program()
    labels = {ev.index: bucket_label([costs.names[l] for l in ev.layers])
              for evs in list(after.values()) + [end] for ev in evs}

    def on_factor(l: int) -> None:
        for ev in after.get(l, ()):
            launch(prog, ev, labels[ev.index])

    emit_forward(prog, costs, factor=kind.factor)
    emit_backward(prog, costs, factor=kind.factor, on_factor=on_factor,
                  on_grad=None if on_grad is None else (lambda l: on_grad(prog, l)))
    if after_backward is not None:
        after_backward(prog)
    emit_unstaged(prog, costs.grad_load)
    if kind.factor:
        for ev in end:
            launch(prog, ev, labels[ev.index])
        prog.wait_all([("fac", ev.index) for evs in list(after.values()) + [end]
                       for ev in evs])
    return prog


def emit_unstaged(prog: Program, dur_us: float) -> None:
    """Host work between stages (the trace charges it to no stage), if there is any."""
    if dur_us > 0:
        prog.compute(UNSTAGED, "", dur_us)


def emit_forward(prog: Program, costs: LayerCosts, *, factor: bool = False) -> None:
    """The whole forward pass (slower by ``fwd_capture`` on factor steps)."""
    scale = costs.fwd_capture if factor else 1.0
    prog.compute(S.FORWARD, "", sum(costs.fwd) * scale, sum(costs.fwd_flops))


def emit_backward(prog: Program, costs: LayerCosts, *, factor: bool,
                  on_factor: Callable[[int], None] | None = None,
                  on_grad: Callable[[int], None] | None = None) -> None:
    """Backward, last layer first.

    For each layer, in autograd's order: the hook on its output gradient (factor steps: the
    batch statistics, then ``on_factor(l)`` — what the strategy launches), the layer's own
    backward (input and weight gradients; slower by ``bwd_capture`` on factor steps), then
    ``on_grad(l)`` (DDP's bucket launches).  A layer without a share of the backward (a
    BatchNorm block) issues no backward work.

    With the Monte-Carlo Fisher (``costs.mc_fisher``) a factor step runs two whole backward
    passes on the compute stream: first the sampled labels' (its rows carry the layer
    ``mc_fisher``, :data:`kfacperf.vocab.MC_FISHER_PASS`), which captures the statistics
    and launches what the strategy launches for them, then the true labels' (a plain
    backward, with ``on_grad``).
    """
    if factor and costs.mc_fisher:
        _backward_pass(prog, costs, capture=True, label=S.MC_FISHER_PASS, on_factor=on_factor)
        _backward_pass(prog, costs, capture=False, label="", on_grad=on_grad)
    else:
        _backward_pass(prog, costs, capture=factor, label="", on_factor=on_factor,
                       on_grad=on_grad)


def _backward_pass(prog: Program, costs: LayerCosts, *, capture: bool, label: str,
                   on_factor: Callable[[int], None] | None = None,
                   on_grad: Callable[[int], None] | None = None) -> None:
    scale = costs.bwd_capture if capture else 1.0
    for l in reversed(range(costs.n)):
        if capture:
            prog.compute(S.FACTOR_COMPUTE, costs.names[l], costs.factor[l], costs.factor_flops[l])
            if on_factor is not None:
                on_factor(l)
        if costs.bwd[l] > 0 or costs.form(l) == blocks.KRONECKER:
            prog.compute(S.BACKWARD, label, costs.bwd[l] * scale, costs.bwd_flops[l])
        if on_grad is not None:
            on_grad(l)
