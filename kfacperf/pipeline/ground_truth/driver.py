"""The whole ground-truth run (:func:`run_ground_truth`): the plan printed first, the
machine described, every task under the time guard, the summary kept current."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from kfacperf.bench.kernels import Budget, write_json
from kfacperf.errors import UserError
from kfacperf.pipeline.ground_truth.archive import hand_back
from kfacperf.pipeline.ground_truth.environment import environment
from kfacperf.pipeline.ground_truth.estimates import CostGuess
from kfacperf.pipeline.ground_truth.plan import Settings, make_plan
from kfacperf.pipeline.ground_truth.report import plan_text, write_summary
from kfacperf.pipeline.ground_truth.run import Context, Outcome, execute

DEFAULT_BUDGET_S = 450.0
"""The driver's budget when none is given (the script passes what it has left of 480 s)."""


def run_ground_truth(settings: Settings, out: Path, *, budget_s: float | None,
                     argv: Sequence[str] = (), plan_only: bool = False,
                     returned: Path | None = None,
                     log: Callable[[str], None] = print) -> list[Outcome]:
    """Write ``plan.txt`` (and log it), then, unless ``plan_only``, ``env.json``, every task's
    outputs, ``summary.txt`` and ``summary.json`` into ``out``; the outcomes, in plan order.
    ``budget_s`` None: no time guard.  ``returned``: a folder that gets, after every task,
    the archive of ``out`` (:mod:`~kfacperf.pipeline.ground_truth.archive`) and a copy of the
    summary.  A CUDA plan without a CUDA device is a :class:`~kfacperf.errors.UserError`."""
    budget = Budget(budget_s)  # from here: importing torch and starting CUDA count too
    (out / "logs").mkdir(parents=True, exist_ok=True)
    plan = make_plan(settings)
    guess = CostGuess()
    text = plan_text(plan, guess, budget_s)
    (out / "plan.txt").write_text(text + "\n")
    log(text)
    if plan_only:
        return []
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device here (use --dry-run on a CPU)")
    torch.set_num_threads(1)  # as kfacperf profile's ranks (--threads-per-rank 1)
    try:
        env = environment(settings, argv)
    except Exception as exc:  # describing the machine must never cost the measurements
        env = {"error": f"{type(exc).__name__}: {exc}"}
    write_json(out / "env.json", env)

    def keep_returned() -> None:
        if returned is None:
            return
        try:
            hand_back(out, returned)
        except Exception as exc:  # the next task's hand-back may succeed; never stop here
            log(f"  handing back into {returned} failed ({type(exc).__name__}: {exc})")

    def summarize(outcomes: list[Outcome]) -> str:
        text = write_summary(out, plan, outcomes, guess=guess, budget_s=budget_s,
                             dry_run=settings.dry_run)
        keep_returned()
        return text

    ctx = Context(settings=settings, out=out, budget=budget, guess=guess, log=log)
    _kept(summarize, [], log)  # every task not reached yet, before the first one can hang
    outcomes = execute(plan, ctx, after_each=summarize)
    text = _kept(summarize, outcomes, log)
    if text:
        log("\n" + text)
    return outcomes


def _kept(summarize: Callable[[list[Outcome]], str], outcomes: list[Outcome],
          log: Callable[[str], None]) -> str:
    """``summarize(outcomes)``, or "" where writing it failed (said): every task's outputs
    are on disk already."""
    try:
        return summarize(outcomes)
    except Exception as exc:
        log(f"writing the summary failed ({type(exc).__name__}: {exc})")
        return ""
