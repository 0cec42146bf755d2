"""Small stand-ins for the simulator's tests: layer costs, a workload, a table cost model.

The fake collective cost depends on every input (op, bytes, group size, nodes), so a step
graph that gets any of them wrong shows a different time.
"""
from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfacperf import vocab as S
from kfacperf.sim.graphs.strategies.common import LayerCosts
from kfacperf.sim.models.host import DEDICATED, HostDelays
from kfacperf.sim.models.workload import LayerModel, WorkloadModel

OP_BASE_US = {"all_reduce": 7.0, "reduce_scatter": 5.0, "all_gather": 5.0, "broadcast": 3.0,
              "reduce_scatter_v": 6.0, "all_gather_v": 6.5}


def fake_collective_us(op: str, nbytes: Any, size: int, nodes: int) -> float:
    """``base(op) + 2 (size - 1) + 4 (nodes - 1) + bytes / 1000`` (uneven blocks: the largest
    block times the group size, as if padded)."""
    if isinstance(nbytes, (tuple, list)):
        nbytes = max(nbytes) * size
    return OP_BASE_US[op] + 2.0 * (size - 1) + 4.0 * (nodes - 1) + nbytes / 1000.0


DIMS_A = (10, 33, 65, 129, 257, 577)
DIMS_G = (8, 16, 32, 64, 128, 256)


def random_layer_costs(n_layers: int, seed: int = 0, *, other_params: int = 0) -> LayerCosts:
    """Layers with random shapes and stage times (integers, so sums are exact)."""
    rnd = random.Random(seed)
    da = [rnd.choice(DIMS_A) for _ in range(n_layers)]
    dg = [rnd.choice(DIMS_G) for _ in range(n_layers)]

    def times(lo: int, hi: int) -> tuple[float, ...]:
        return tuple(float(rnd.randint(lo, hi)) for _ in range(n_layers))

    zeros = (0.0,) * n_layers
    return LayerCosts(
        names=tuple(f"layer{i}" for i in range(n_layers)),
        fwd=times(20, 200), bwd=times(40, 400), factor=times(10, 100),
        inverse=tuple(float(max(1, (a**3 + g**3) // 100_000)) for a, g in zip(da, dg)),
        precond=times(5, 80), update=float(rnd.randint(50, 150)),
        fwd_flops=zeros, bwd_flops=zeros, factor_flops=zeros, inverse_flops=zeros,
        precond_flops=zeros, dim_a=tuple(da), dim_g=tuple(dg), other_params=other_params,
    )


def table_workload(name: str, dims: Sequence[tuple[int, int]], *,
                   other_params: int = 0) -> WorkloadModel:
    """A workload of linear K-FAC layers ``l0, l1, ...`` of these ``(dim_a, dim_g)``; a
    :class:`TableCosts` gives their times, so only their names and shapes matter."""
    layers = tuple(LayerModel(name=f"l{i}", kind="linear", dim_a=a, dim_g=g, params=a * g,
                              rows_per_example=1, fwd_flops_per_example=2.0 * a * g,
                              in_elems_per_example=a, out_elems_per_example=g)
                   for i, (a, g) in enumerate(dims))
    return WorkloadModel(name=name, layers=layers, other_params=other_params,
                         other_fwd_flops_per_example=0.0, input_shape=(dims[0][0],),
                         input_dtype="float32", source="test table")


@dataclass
class TableCosts:
    """A :class:`~kfacperf.sim.costs.interface.StepCosts` from tables: stage times
    ``per_layer[stage][name]`` and ``whole[stage]`` (us), collectives from
    :func:`fake_collective_us`; no FLOPs, no capture overhead, no host work, dedicated devices,
    the same for every GPU count."""

    per_layer: dict[str, dict[str, float]]
    whole: dict[str, float]
    calls: list[tuple[str, str]] = field(default_factory=list)
    bn_blocks: str = S.BN_NONE
    fisher: str = S.FISHER_EMP

    @property
    def options(self) -> Hashable:
        return id(self)  # one table, one set of times

    @property
    def host(self) -> HostDelays:
        return DEDICATED

    def compute_us(self, stage: str, layer: LayerModel | None, *, batch: int,
                   workload: WorkloadModel | None = None) -> float:
        self.calls.append((stage, "" if layer is None else layer.name))
        if layer is None:
            return self.whole[stage]
        return self.per_layer[stage][layer.name]

    def flops(self, stage: str, layer: LayerModel | None, *, batch: int,
              workload: WorkloadModel | None = None) -> float:
        return 0.0

    def capture_scale(self, stage: str) -> float:
        return 1.0

    def layer_host_us(self, step: str) -> float:
        return 0.0

    def collective_us(self, op: str, nbytes: float | Sequence[float], *, group_size: int,
                      nodes: int) -> float:
        return fake_collective_us(op, nbytes, group_size, nodes)

    def for_gpus(self, gpus: int) -> TableCosts:
        return self


def fake_model(workload: WorkloadModel, times: Sequence[dict[str, float]],
               whole: dict[str, float]) -> TableCosts:
    """``times[l]`` maps each per-layer stage to layer l's time."""
    per_layer: dict[str, dict[str, float]] = {}
    for layer, t in zip(workload.layers, times):
        for stage, v in t.items():
            per_layer.setdefault(stage, {})[layer.name] = v
    for stage in (S.FORWARD, S.BACKWARD, S.UPDATE):
        whole.setdefault(stage, sum(per_layer.get(stage, {}).values()))
    return TableCosts(per_layer=per_layer, whole=whole)


def real_assignment() -> Any:
    """The optimizer's assignment module, loaded from its file (its package imports torch)."""
    path = Path(__file__).resolve().parents[2] / "kfacperf" / "kfac" / "assignment.py"
    spec = importlib.util.spec_from_file_location("_kfac_assignment", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod
