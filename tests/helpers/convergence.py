"""Small convergence models of the mlp workload for plans in tests: SGD's steps fall from
4,000 at a global batch of 16 to 1,200 at 64; K-FAC's from 2,000 (intervals 5/5) to 700
(intervals 1/1)."""
from __future__ import annotations

from kfacperf.plan.convergence import ConvergenceModel, ConvergencePoint

MLP_SGD = ConvergenceModel(name="s", workload="mlp", optimizer="sgd", target="t", points=(
    ConvergencePoint(global_batch=16, steps=4000, source="x"),
    ConvergencePoint(global_batch=64, steps=1200, source="x")))


def mlp_kfac(target: str = "t") -> ConvergenceModel:
    """K-FAC's model, to ``target`` (a plan may compare models of different targets)."""
    return ConvergenceModel(name="k", workload="mlp", optimizer="kfac", target=target, points=(
        ConvergencePoint(global_batch=16, steps=2000, source="x", factor_interval=5,
                         inverse_interval=5),
        ConvergencePoint(global_batch=64, steps=700, source="x", factor_interval=1,
                         inverse_interval=1)))
