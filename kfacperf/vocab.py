"""The one vocabulary shared by the optimizer, the profiler, the simulator and the reports.

Every stage of a training step has a name, a lane (``compute`` or ``comm``; the whole-step
stage ``step`` has neither) and a place in the canonical order of a step.  Traces and
predictions are rows of the same event table keyed by ``(stage, layer)``, so everything that
names a stage must use these constants.
"""
from __future__ import annotations

from dataclasses import dataclass

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


# Fisher blocks beyond the Kronecker-factored layers, and how the Fisher is estimated: knobs
# of the real optimizer, of run.json and of the simulator alike (see docs/fisher-blocks.md).
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


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming ``key``."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value
