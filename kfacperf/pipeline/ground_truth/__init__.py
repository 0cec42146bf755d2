"""Ground truth on a real GPU: the profile matrix, the stage timer's overhead and the kernel
timings, in one run with a time budget (``scripts/gpu-ground-truth.sh`` drives it; see
``docs/gpu-ground-truth.md``).

* :mod:`~kfacperf.pipeline.ground_truth.plan`: what runs, most valuable first, and each
  profile run's settings (as a :class:`~kfacperf.runtime.config.ProfileConfig` and as the
  equivalent ``kfacperf profile`` command that its ``run.json`` records);
* :mod:`~kfacperf.pipeline.ground_truth.estimates`: each task's expected time, corrected by
  what finished runs measured;
* :mod:`~kfacperf.pipeline.ground_truth.run`: executing the plan under the time guard (a
  task that would end after the budget is skipped, said so, and the next one tried);
* :mod:`~kfacperf.pipeline.ground_truth.checks`: what a finished trace says it recorded;
* :mod:`~kfacperf.pipeline.ground_truth.report`: ``plan.txt``, ``summary.txt``,
  ``summary.json``; :mod:`~kfacperf.pipeline.ground_truth.environment`: ``env.json``;
* :mod:`~kfacperf.pipeline.ground_truth.driver`: all of it, :func:`run_ground_truth`;
* :mod:`~kfacperf.pipeline.ground_truth.archive`: the output folder as the one archive a
  device machine hands back (refreshed after every task), and opened again here;
* :mod:`~kfacperf.pipeline.ground_truth.finish`: the run landed in the project, its traces
  checked, a device model calibrated and validated per precision; what came back copied in
  (:mod:`~kfacperf.pipeline.ground_truth.landing`, what each trace became:
  :mod:`~kfacperf.pipeline.ground_truth.landed`), the preset folded
  (:mod:`~kfacperf.pipeline.ground_truth.preset_landing`).

::

    from kfacperf.pipeline.ground_truth import DRY, run_ground_truth
    outcomes = run_ground_truth(DRY, Path("/tmp/gt"), budget_s=None)   # tiny, on a CPU

From a shell: ``python -m kfacperf.pipeline.ground_truth --out DIR [--dry-run]``, then
``python -m kfacperf.pipeline.ground_truth.finish ARCHIVE --into traces/h200``.
"""
from kfacperf.pipeline.ground_truth.driver import DEFAULT_BUDGET_S, run_ground_truth
from kfacperf.pipeline.ground_truth.plan import DRY, FULL, Settings, make_plan

__all__ = ["DEFAULT_BUDGET_S", "DRY", "FULL", "Settings", "make_plan", "run_ground_truth"]
