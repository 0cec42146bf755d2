"""What a ground-truth landing produced: :class:`TraceResult` per trace, :class:`Finished` for
the whole of it (shared by the landing's parts)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TraceResult:
    """One profile run of the ground truth as it landed."""

    name: str
    precision: str
    role: str
    batch: int
    path: Path
    checks: dict[str, Any]
    problems: list[str]
    usable: bool = True
    """Whether its measured steps may calibrate or be predicted (False: the run did not
    complete, or it has no measured step)."""


@dataclass(kw_only=True)
class Finished:
    """What :func:`finish` did."""

    into: Path
    gpu: bool
    traces: list[TraceResult] = field(default_factory=list)
    validations: dict[str, Any] = field(default_factory=dict)  # precision -> ValidationResult
    device_files: dict[str, Path] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """What the run says it produced but did not come back whole (a cut archive, a trace
    missing or unreadable, an output file missing): each makes the landing incomplete."""

    @property
    def meets_targets(self) -> bool:
        """Every precision validated, each within the step and stage targets."""
        return bool(self.validations) and all(
            not v.target_misses() for v in self.validations.values())


def shown_path(path: Path) -> str:
    """``path`` as a committed file may name it: relative to the working folder where it lies
    below it, else from the landing folder's name on (never an absolute path)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        parts = path.parts
        return str(Path(*parts[-2:])) if len(parts) >= 2 else path.name
