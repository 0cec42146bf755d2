"""The one vocabulary shared by the optimizer, the profiler, the simulator and the reports.

Every closed set of names the parts exchange is declared here once, and checked with one
helper (:func:`check_choice`):

* stages and lanes: every stage of a training step has a name, a lane (``compute`` or
  ``comm``; the whole-step stage ``step`` has neither) and a place in the canonical order of
  a step.  Traces and predictions are rows of the same event table keyed by ``(stage,
  layer)``, so everything that names a stage must use these constants;
* kinds of step (``inverse``, ``factor``, ``plain``) and the rule that decides a step's kind
  from the intervals (:func:`step_kind`), with the check of the intervals themselves;
* optimizers, strategies (the simulator's and the profiler's, which adds ``local``), inverse
  methods, collective operations and data types;
* Fisher blocks and estimators: ``bn_blocks`` and ``fisher``, and the label of the
  Monte-Carlo backward pass.

This module imports nothing beyond the standard library.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


def check_choice(what: str, value: object, choices: Collection[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming it.

    >>> check_choice("inverse method", "qr", INVERSE_METHODS)
    Traceback (most recent call last):
    ValueError: unknown inverse method 'qr'; use one of eigen, cholesky
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
    return value


COMPUTE = "compute"
COMM = "comm"

FORWARD = "forward"
BACKWARD = "backward"
FACTOR_COMPUTE = "factor_compute"
FACTOR_COMM = "factor_comm"
INVERSE = "inverse"
INVERSE_COMM = "inverse_comm"
GRAD_COMM = "grad_comm"
PRECONDITION = "precondition"
PRECOND_COMM = "precond_comm"
UPDATE = "update"
STEP = "step"


@dataclass(frozen=True)
class Stage:
    """A stage of a training step."""

    name: str
    lane: str  # "compute", "comm", or "" for the whole step
    per_layer: bool
    description: str


STAGES: tuple[Stage, ...] = (
    Stage(FORWARD, COMPUTE, False, "forward pass (K-FAC hooks save layer inputs)"),
    Stage(BACKWARD, COMPUTE, False, "backward pass (hooks save output gradients)"),
    Stage(FACTOR_COMPUTE, COMPUTE, True, "A = E[a a^T], G = E[g g^T] and their running average"),
    Stage(FACTOR_COMM, COMM, True, "reducing factors across ranks"),
    Stage(INVERSE, COMPUTE, True, "eigendecomposition or damped inverse of a layer's factors"),
    Stage(INVERSE_COMM, COMM, True, "sending inverses/eigenbases to the preconditioning ranks"),
    Stage(GRAD_COMM, COMM, False, "gradient reduction (DDP all-reduce or reduce-scatter)"),
    Stage(PRECONDITION, COMPUTE, True, "G^-1 grad A^-1 (or the eigenbasis form) for one layer"),
    Stage(PRECOND_COMM, COMM, True, "sending preconditioned gradients back"),
    Stage(UPDATE, COMPUTE, False, "the first-order optimizer step"),
    Stage(STEP, "", False, "the whole step, start to end"),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
ORDER: dict[str, int] = {name: i for i, name in enumerate(STAGE_NAMES)}
COMPUTE_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.lane == COMPUTE)
COMM_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.lane == COMM)
LANES: tuple[str, ...] = (COMPUTE, COMM)


def lane_of(stage: str) -> str:
    """The event-table lane of ``stage``; ``step`` rows are recorded on the compute lane."""
    try:
        lane = BY_NAME[stage].lane
    except KeyError:
        raise ValueError(
            f"unknown stage {stage!r}; known stages: {', '.join(STAGE_NAMES)}"
        ) from None
    return lane or COMPUTE


def check_stage(stage: str) -> str:
    """Return ``stage`` if it is in the vocabulary, else raise a ValueError naming it."""
    lane_of(stage)
    return stage


# --------------------------------------------------------------------------- kinds of step
@dataclass(frozen=True, kw_only=True)
class StepKind:
    """Which K-FAC work a step does: factors (batch statistics), inverses."""

    name: str
    factor: bool
    inverse: bool


INVERSE_STEP = StepKind(name="inverse", factor=True, inverse=True)
FACTOR_STEP = StepKind(name="factor", factor=True, inverse=False)
PLAIN_STEP = StepKind(name="plain", factor=False, inverse=False)
STEP_KINDS: tuple[StepKind, ...] = (INVERSE_STEP, FACTOR_STEP, PLAIN_STEP)
STEP_KIND_NAMES: tuple[str, ...] = tuple(k.name for k in STEP_KINDS)


def check_intervals(factor_interval: object, inverse_interval: object, *,
                    names: tuple[str, str] = ("factor_interval", "inverse_interval")) -> None:
    """Both intervals positive integers, the inverse interval a multiple of the factor
    interval (inverses need fresh factors); ``names`` are what the error calls them."""
    for key, v in zip(names, (factor_interval, inverse_interval)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
    assert isinstance(factor_interval, int) and isinstance(inverse_interval, int)
    if inverse_interval % factor_interval:
        raise ValueError(f"{names[1]} ({inverse_interval}) must be a multiple of {names[0]} "
                         f"({factor_interval}): inverses need fresh factors")


def computes_factors(step: int, factor_interval: int) -> bool:
    """Does step ``step`` compute batch statistics (the optimizer's rule)?"""
    return step % factor_interval == 0


def recomputes_inverses(step: int, inverse_interval: int) -> bool:
    """Does step ``step`` recompute the inverses (the optimizer's rule)?"""
    return step % inverse_interval == 0


def step_kind(step: int, factor_interval: int, inverse_interval: int, *,
              kfac: bool = True) -> StepKind:
    """The kind of step ``step``: inverses iff ``step % inverse_interval == 0``, else factors
    iff ``step % factor_interval == 0``, else plain; every step of SGD (``kfac=False``) is
    plain.  Step 0 does both."""
    if not kfac:
        return PLAIN_STEP
    if recomputes_inverses(step, inverse_interval):
        return INVERSE_STEP
    if computes_factors(step, factor_interval):
        return FACTOR_STEP
    return PLAIN_STEP


# --------------------------------------------------------------------------- optimizers
SGD = "sgd"
KFAC = "kfac"
OPTIMIZERS: tuple[str, ...] = (SGD, KFAC)

LOCAL = "local"
SPNGD = "spngd"
KAISA = "kaisa"
KFAC_STRATEGIES: tuple[str, ...] = (SPNGD, KAISA)
"""Distributed K-FAC strategies: the real optimizer's and the simulator's, under one name."""
SIM_STRATEGIES: tuple[str, ...] = (SGD, *KFAC_STRATEGIES)
"""What the simulator models: the SGD/DDP baseline and the distributed K-FAC strategies."""
OPTIMIZER_KFAC_STRATEGIES: tuple[str, ...] = (LOCAL, *KFAC_STRATEGIES)
"""What the real K-FAC optimizer takes: also ``local`` (one process, no communication),
which the simulator has no need for: any strategy on one GPU does the same work."""
PROFILE_STRATEGIES: tuple[str, ...] = (SGD, *OPTIMIZER_KFAC_STRATEGIES)
"""What ``kfacperf profile --strategy`` takes."""


def default_strategy(optimizer: str) -> str:
    """The strategy a run of ``optimizer`` uses when none is named: SGD's own, else SP-NGD."""
    return SGD if optimizer == SGD else SPNGD


def optimizer_of(strategy: str, strategies: Collection[str] = PROFILE_STRATEGIES) -> str:
    """The optimizer family of ``strategy``: ``sgd`` for the baseline, ``kfac`` for every
    K-FAC strategy; a ValueError for one not in ``strategies``."""
    return SGD if check_choice("strategy", strategy, strategies) == SGD else KFAC

EIGEN = "eigen"
CHOLESKY = "cholesky"
INVERSE_METHODS: tuple[str, ...] = (EIGEN, CHOLESKY)

# --------------------------------------------------------------------------- collectives
ALL_REDUCE = "all_reduce"
REDUCE_SCATTER = "reduce_scatter"
ALL_GATHER = "all_gather"
BROADCAST = "broadcast"
REDUCE_SCATTER_V = "reduce_scatter_v"
ALL_GATHER_V = "all_gather_v"
COLLECTIVE_OPS: tuple[str, ...] = (ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER, BROADCAST)
"""The collectives a cluster model has a cost for (and commbench times)."""
V_OPS: tuple[str, ...] = (REDUCE_SCATTER_V, ALL_GATHER_V)
"""Their forms with a different block per rank, costed from the equal-block ones."""
ALL_COLLECTIVE_OPS: tuple[str, ...] = COLLECTIVE_OPS + V_OPS

# --------------------------------------------------------------------------- data types
DTYPE_BYTES: dict[str, int] = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
FP64 = "fp64"
"""The precision K-FAC decomposes its factors in by default (``inverse_dtype``)."""
FP32 = "fp32"
TF32 = "tf32"
BF16 = "bf16"
COMPUTE_DTYPES: tuple[str, ...] = (FP32, TF32, BF16)
"""Precisions a device model has a peak rate for, and the precisions a run is profiled in
(``kfacperf profile --precision``, ``run.json``'s ``precision``; what each sets on the device:
:mod:`kfacperf.runtime.precision`)."""
COMM_DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")
"""Precisions the factors may travel in."""
COMM_DTYPE_BYTES: dict[str, int] = {d: DTYPE_BYTES[d] for d in COMM_DTYPES}

# --------------------------------------------------------------------------- Fisher blocks
# Blocks beyond the Kronecker-factored layers, and how the Fisher is estimated: knobs of the
# real optimizer, of run.json and of the simulator alike (see docs/fisher-blocks.md).
BN_NONE = "none"
BN_UNIT = "unit"
BN_FULL = "full"
BN_BLOCKS: tuple[str, ...] = (BN_NONE, BN_UNIT, BN_FULL)
"""BatchNorm layers as Fisher blocks: ``none`` (their parameters are left to the first-order
optimizer), ``unit`` (a 2x2 block per channel over (gamma_c, beta_c): SP-NGD's unitBN),
``full`` (one 2C x 2C block per layer over (gamma, beta): fullBN)."""

FISHER_EMP = "emp"
FISHER_MC = "mc"
FISHER_TYPES: tuple[str, ...] = (FISHER_EMP, FISHER_MC)
"""``emp``: statistics from the true labels' backward (the empirical Fisher); ``mc``: from one
extra backward with labels sampled from the model's predictive distribution (SP-NGD's 1mc)."""

MC_FISHER_PASS = "mc_fisher"
"""The ``layer`` of the ``backward`` row of the Monte-Carlo pass (``fisher = "mc"``, factor
steps): that step has two ``backward`` rows, this one (the statistics are captured in it)
and the true labels' backward (``layer`` ``""``)."""

# --- how a published K-FAC implementation did its work (simulator setup knobs) --------------
BALANCED = "balanced"
CONTIGUOUS = "contiguous"
PLACEMENTS: tuple[str, ...] = (BALANCED, CONTIGUOUS)
"""How SP-NGD's layers get owners: ``balanced`` by cost (LPT, the real optimizer's rule) or
``contiguous``: layers sorted by name and cut into ``P`` runs of consecutive layers, as SP-NGD's
Chainer implementation assigns its Fisher blocks (``numpy.array_split`` over the sorted link
names: the first ``L mod P`` ranks get one block more), with no regard to cost."""

DISPLACEMENT = "displacement"
IM2COL = "im2col"
CONV_FACTORS: tuple[str, ...] = (DISPLACEMENT, IM2COL)
"""How a convolution's A factor is computed: this project's optimizer sums displacement Grams
of the padded input (no unfold); Chainer- and PyTorch-era K-FAC codes (SP-NGD, KAISA) unfold
the input patches and multiply (``im2col``: the patch matrix written and read once, then
``2 N r dA^2`` FLOPs)."""
