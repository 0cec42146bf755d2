"""Small stand-ins for the simulator's tests: layer costs, a workload, a cost model.

The fake collective cost depends on every input (op, bytes, group size, nodes), so a step
graph that gets any of them wrong shows a different time.
"""
from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfacperf import vocab as S
from kfacperf.sim.graphs.strategies.common import LayerCosts

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


@dataclass(frozen=True)
class FakeLayer:
    name: str
    dim_a: int
    dim_g: int
    params: int = 0


@dataclass(frozen=True)
class FakeWorkload:
    name: str
    layers: tuple[FakeLayer, ...]
    other_params: int = 0


@dataclass
class FakeCostModel:
    """Stage times from tables: ``per_layer[stage][name]`` and ``whole[stage]`` (us)."""

    per_layer: dict[str, dict[str, float]]
    whole: dict[str, float]
    calls: list[tuple[str, str]] = field(default_factory=list)

    def compute_us(self, stage: str, layer: Any, *, batch: int, workload: Any = None) -> float:
        self.calls.append((stage, "" if layer is None else layer.name))
        if layer is None:
            return self.whole[stage]
        return self.per_layer[stage][layer.name]

    def collective_us(self, op: str, nbytes: Any, *, group_size: int, nodes: int) -> float:
        return fake_collective_us(op, nbytes, group_size, nodes)


def fake_model(workload: FakeWorkload, times: Sequence[dict[str, float]],
               whole: dict[str, float]) -> FakeCostModel:
    """``times[l]`` maps each per-layer stage to layer l's time."""
    per_layer: dict[str, dict[str, float]] = {}
    for layer, t in zip(workload.layers, times):
        for stage, v in t.items():
            per_layer.setdefault(stage, {})[layer.name] = v
    for stage in (S.FORWARD, S.BACKWARD, S.UPDATE):
        whole.setdefault(stage, sum(per_layer.get(stage, {}).values()))
    return FakeCostModel(per_layer=per_layer, whole=whole)


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
