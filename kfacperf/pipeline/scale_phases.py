"""The demo's scale phases: the workload simulated on cluster presets and planned on one."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from kfacperf.pipeline.config import SCALE_STRATEGIES, DemoConfig, DemoPaths
from kfacperf.pipeline.phases import PhaseRunner


def simulate_cluster(config: DemoConfig, paths: DemoPaths, index: int) -> list[tuple[Path, Any]]:
    """Simulate ``scale_workload`` on the ``index``-th cluster of ``config`` (the first also
    with its bandwidth what-ifs): each prediction's directory and the prediction."""
    from kfacperf.sim.prediction import write_prediction
    from kfacperf.sim.sweep import simulate

    target = config.clusters[index]
    variants: list[tuple[str, dict[str, Any]]] = [("", {})]
    if index == 0:
        variants += [(f"-bw{s:g}x", {"bandwidth_scale": float(s), "events": False})
                     for s in config.whatif_bandwidth]
    out = []
    for suffix, extra in variants:
        pred = simulate(config.scale_workload, target.device, target.cluster,
                        list(SCALE_STRATEGIES), gpus=list(config.scale_gpus),
                        batch_per_gpu=config.scale_batch_per_gpu,
                        factor_interval=config.scale_factor_interval,
                        inverse_interval=config.scale_inverse_interval, **extra)
        pred.meta["command"] = (
            f"kfacperf simulate --workload {config.scale_workload} --device {target.device} "
            f"--cluster {target.cluster} --strategy {','.join(SCALE_STRATEGIES)} --gpus "
            f"{','.join(map(str, config.scale_gpus))} --batch-per-gpu "
            f"{config.scale_batch_per_gpu} --factor-interval {config.scale_factor_interval} "
            f"--inverse-interval {config.scale_inverse_interval}"
            + (f" --bandwidth-scale {extra['bandwidth_scale']:g}" if extra else ""))
        path = paths.scale_prediction(config.scale_workload, target.cluster, suffix)
        write_prediction(pred, path, force=True)
        out.append((path, pred))
    return out


def simulate_all(runner: PhaseRunner, config: DemoConfig, paths: DemoPaths
                  ) -> tuple[list[tuple[Path, Any]], list[tuple[Path, Any]]]:
    """Each cluster's prediction, and the what-ifs (on the first cluster)."""
    scale_preds: list[tuple[Path, Any]] = []
    whatifs: list[tuple[Path, Any]] = []
    for i, target in enumerate(config.clusters):
        got = runner.run(
            f"simulate {config.scale_workload} on {target.cluster}",
            partial(simulate_cluster, config, paths, i),
            note=lambda r: f"{len(r)} prediction(s), up to {max(config.scale_gpus):,} GPUs")
        scale_preds.append(got[0])
        whatifs.extend(got[1:])
    return scale_preds, whatifs


def plan_on_cluster(config: DemoConfig, paths: DemoPaths) -> Any:
    """The plan of ``scale_workload`` on ``config.plan``, written to ``plan.json``."""
    from kfacperf.plan import plan
    from kfacperf.plan.result import save_plan

    assert config.plan is not None
    result = plan(config.scale_workload, config.plan.device, config.plan.cluster,
                  gpus=list(config.plan_gpus), convergence=list(config.plan_convergence),
                  batch_per_gpu=[config.scale_batch_per_gpu])
    save_plan(result, paths.plan, force=True)  # the demo replaces its own files
    return result
