"""The setup knobs of published GPU runs: each changes exactly what it names."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kfacperf import vocab as S
from kfacperf.sim.costs.model import CostModel
from kfacperf.sim.costs.stage_work import factor_phases
from kfacperf.sim.graphs.placement import contiguous_placement
from kfacperf.sim.graphs.strategies.common import CommSettings
from kfacperf.sim.models import load_cluster, load_device, load_workload
from kfacperf.sim.models.device import load_device_model, save_device_model
from kfacperf.sim.sweep import simulate

W = load_workload("resnet50")


def _cost(**options):
    return CostModel(workload=W, device=load_device("v100"), cluster=load_cluster("abci"),
                     **options)


@pytest.mark.parametrize("layers,ranks", [(107, 2), (107, 64), (107, 128), (5, 3), (54, 54)])
def test_contiguous_placement_is_array_split_over_sorted_names(layers, ranks) -> None:
    names = [f"layer{(i * 37) % layers:03d}" for i in range(layers)]
    place = contiguous_placement(names, ranks)
    order = sorted(range(layers), key=lambda i: names[i])
    for rank, chunk in enumerate(np.array_split(np.array(order), ranks)):
        assert all(place.inverse_worker[i] == rank for i in chunk)


def test_statistics_fraction_scales_factor_and_inverse_work_and_bytes() -> None:
    full, stale = _cost(), _cost(statistics_fraction=0.25)
    layer = W.layers[10]
    for stage in (S.FACTOR_COMPUTE, S.INVERSE):
        assert stale.compute_us(stage, layer, batch=32) == pytest.approx(
            0.25 * full.compute_us(stage, layer, batch=32))
    for stage in (S.FORWARD, S.PRECONDITION):
        assert stale.compute_us(stage, layer, batch=32) == full.compute_us(stage, layer, batch=32)
    assert CommSettings(statistics_fraction=0.25).factor_comm_bytes(1000) == 1000 * 1000 * 4 // 4
    with pytest.raises(ValueError, match="statistics_fraction"):
        CommSettings(statistics_fraction=0.0)


def test_precond_dtype_halves_what_sp_ngd_gathers() -> None:
    fp32 = simulate(W, "v100", "abci", ["spngd"], gpus=[8], events=False)
    fp16 = simulate(W, "v100", "abci", ["spngd"], gpus=[8], events=False, precond_dtype="fp16")
    st32 = fp32.stage_times.groupby("stage")["time_us"].sum()
    st16 = fp16.stage_times.groupby("stage")["time_us"].sum()
    assert st16[S.PRECOND_COMM] < st32[S.PRECOND_COMM]
    assert st16[S.INVERSE] == st32[S.INVERSE]


def test_row_us_adds_its_time_per_factorised_row(tmp_path) -> None:
    d = load_device("v100")
    inv = d.stage(S.INVERSE, "cholesky")
    slower = dataclasses.replace(
        d, inverse_methods={"cholesky": dataclasses.replace(inv, row_us=inv.row_us + 3.0)})
    layer = W.layers[20]
    a = CostModel(workload=W, device=d, cluster=load_cluster("abci"), inverse_method="cholesky")
    b = CostModel(workload=W, device=slower, cluster=load_cluster("abci"),
                  inverse_method="cholesky")
    diff = b.compute_us(S.INVERSE, layer, batch=32) - a.compute_us(S.INVERSE, layer, batch=32)
    assert diff == pytest.approx(3.0 * (layer.dim_a + layer.dim_g))
    # eigen has no table of its own here: [stages.inverse] applies
    e = CostModel(workload=W, device=slower, cluster=load_cluster("abci"), inverse_method="eigen")
    assert e.device.stage(S.INVERSE, "eigen") == d.stages[S.INVERSE]
    path = save_device_model(slower, tmp_path / "d.toml")
    assert load_device_model(path) == slower
    path.write_text(path.read_text().replace("[inverse_method.cholesky]",
                                             "[inverse_method.lu]"))
    with pytest.raises(ValueError, match="inverse method"):
        load_device_model(path)


def test_im2col_factors_are_an_unfold_and_two_products() -> None:
    conv = next(l for l in W.layers if l.conv is not None and l.conv.kernel == (3, 3))
    rows = 32 * conv.rows_per_example
    phases = factor_phases(conv, 32, "bf16", "im2col")
    flops = sum(p.flops for p in phases)
    running = 3.0 * (conv.dim_a ** 2 + conv.dim_g ** 2)
    assert flops == pytest.approx(2.0 * rows * (conv.dim_a ** 2 + conv.dim_g ** 2) + running)
    assert phases[0].nbytes == pytest.approx(2 * 2 * rows * conv.dim_a)  # patches written, read
    with pytest.raises(ValueError, match="conv_factors"):
        factor_phases(conv, 32, "bf16", "fft")
