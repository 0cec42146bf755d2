"""CostModel: roofline stage times from analytic FLOPs/bytes, measured times, what-ifs."""
from __future__ import annotations

import numpy as np
import pytest

from kfacperf.sim.costs.collectives import group_collective_us
from kfacperf.sim.costs.model import CostModel, dtype_bytes, factor_elements
from kfacperf.sim.models.cluster import OPS, ClusterModel, Tier
from kfacperf.sim.models.device import (
    STAGE_KINDS,
    DeviceModel,
    MeasuredTime,
    StageEfficiency,
)
from kfacperf.sim.models.host import HostModel
from kfacperf.sim.models.workload import LayerModel, WorkloadModel

CONV = LayerModel(name="conv", kind="conv2d", dim_a=28, dim_g=16, params=448, rows_per_example=1024,
                  fwd_flops_per_example=2 * 27 * 16 * 1024, in_elems_per_example=3072,
                  out_elems_per_example=16384)
FC = LayerModel(name="fc", kind="linear", dim_a=513, dim_g=1000, params=513000, rows_per_example=1,
                fwd_flops_per_example=2 * 512 * 1000, in_elems_per_example=512,
                out_elems_per_example=1000)
BIG = LayerModel(name="big", kind="conv2d", dim_a=577, dim_g=64, params=577 * 64,
                 rows_per_example=1024,
                 fwd_flops_per_example=2 * 576 * 64 * 1024, in_elems_per_example=65536,
                 out_elems_per_example=65536)  # compute-bound forward and factor statistics
W = WorkloadModel(name="w", layers=(CONV, FC), other_params=100, other_fwd_flops_per_example=5e5,
                  input_shape=(3, 32, 32), input_dtype="float32", source="test")
W0 = WorkloadModel(name="w0", layers=(CONV, FC, BIG), other_params=0,
                   other_fwd_flops_per_example=0.0, input_shape=(3, 32, 32),
                   input_dtype="float32", source="test")
EFF = {"forward": (0.5, 2.0), "backward": (0.4, 3.0), "factor_compute": (0.6, 4.0),
       "inverse": (0.1, 50.0), "precondition": (0.7, 5.0), "update": (0.8, 6.0)}
PEAK = 10e6  # FLOP per us (10 TFLOP/s)
BW = 100e3  # bytes per us (100 GB/s)


def device(measured=(), mode: str = "roofline") -> DeviceModel:
    return DeviceModel(
        name="d", fp32_tflops=10.0, tf32_tflops=0.0, bf16_tflops=40.0, mem_bandwidth_GBps=100.0,
        stages={k: StageEfficiency(efficiency=e, mem_efficiency=e, overhead_us=o, assumed=False)
                for k, (e, o) in EFF.items()},
        measured=measured, mode=mode,
    )


def cluster(cores: int = 0, contention: float = 0.0) -> ClusterModel:
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    return ClusterModel(
        name="c", gpus_per_node=8,
        intra=Tier(alpha_us=1.0, bandwidth_GBps=100.0, algorithms=algos),
        inter=Tier(alpha_us=5.0, bandwidth_GBps=10.0, algorithms=algos),
        multi_node={op: "hierarchical" for op in OPS}, v_collectives="padded",
        host=HostModel(cores_per_node=cores, contention=contention),
    )


def with_host(c: ClusterModel, **changes) -> ClusterModel:
    """``c`` with its host model changed."""
    from dataclasses import replace

    assert c.host is not None
    return replace(c, host=replace(c.host, **changes))


def cost(**kw) -> CostModel:
    return CostModel(workload=kw.pop("workload", W), device=kw.pop("device", device()),
                     cluster=kw.pop("cluster", cluster()), **kw)


def roof(kind: str, flops: float, nbytes: float, peak: float = PEAK) -> float:
    eff, over = EFF[kind]
    return over + max(flops / peak, nbytes / BW) / eff


def expected(stage: str, l: LayerModel, n: int, method: str = "eigen") -> float:
    a, g = l.dim_a, l.dim_g
    if stage == "forward":
        return roof(stage, n * l.fwd_flops_per_example,
                    4 * (n * (l.in_elems_per_example + l.out_elems_per_example) + l.params))
    if stage == "backward":
        return roof(stage, 2 * n * l.fwd_flops_per_example,
                    8 * (n * (l.in_elems_per_example + l.out_elems_per_example) + l.params))
    if stage == "factor_compute":
        rows = n * l.rows_per_example
        return roof(stage, 2 * rows * (a * a + g * g), 4 * (rows * (a + g) + 3 * (a * a + g * g)))
    if stage == "inverse":  # one call, each factor on its own roofline
        k = 9 if method == "eigen" else 1
        return (roof(stage, k * a ** 3, 12 * a * a) + roof(stage, k * g ** 3, 12 * g * g)
                - EFF[stage][1])
    if stage == "precondition":
        return roof(stage, (4 if method == "eigen" else 2) * a * g * (a + g),
                    4 * (a * a + g * g + 3 * a * g))
    return roof(stage, 4 * l.params, 20 * l.params)


@pytest.mark.parametrize("stage", STAGE_KINDS)
@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_per_layer_times_are_the_roofline_of_the_analytic_work(stage: str, method: str) -> None:
    c = cost(workload=W0, inverse_method=method)
    for layer in W0.layers:
        for n in (1, 32, 256):
            assert c.compute_us(stage, layer, batch=n) == pytest.approx(
                expected(stage, layer, n, method), rel=1e-12)


def test_both_roofline_regimes_are_exercised() -> None:
    c = cost(workload=W0)
    n = 32
    # ridge point 100 FLOP per byte: big's forward, factor statistics and fc's inverse are
    # compute-bound; a thin conv's factor statistics and every update are memory-bound
    for stage, l in (("forward", BIG), ("factor_compute", BIG), ("inverse", FC)):
        assert c.flops(stage, l, batch=n) / PEAK > c.bytes_moved(stage, l, batch=n) / BW, stage
    for stage, l in (("factor_compute", CONV), ("update", FC), ("forward", FC)):
        assert c.flops(stage, l, batch=n) / PEAK < c.bytes_moved(stage, l, batch=n) / BW, stage


def test_whole_model_stages_are_the_sum_of_layer_shares() -> None:
    c = cost()
    n = 16
    kfac_flops = CONV.fwd_flops_per_example + FC.fwd_flops_per_example
    for stage, mult, nb in (("forward", 1, 4), ("backward", 2, 8)):
        want = 0.0
        for l in (CONV, FC):  # each layer carries its FLOP share of the 5e5 non-K-FAC FLOPs
            flops = mult * n * (l.fwd_flops_per_example * (1 + 5e5 / kfac_flops))
            nbytes = nb * (n * (l.in_elems_per_example + l.out_elems_per_example) + l.params)
            share = roof(stage, flops, nbytes)
            assert c.compute_us(stage, l, batch=n) == pytest.approx(share, rel=1e-12)
            want += share
        assert c.compute_us(stage, None, batch=n) == pytest.approx(want, rel=1e-12)
    # update: one fused call over all parameters (K-FAC layers and the rest)
    params = 448 + 513000 + 100
    assert c.compute_us("update", None, batch=n) == pytest.approx(
        roof("update", 4 * params, 20 * params))


def test_dtype_selects_the_peak_and_unsupported_dtypes_fail() -> None:
    n = 256
    fp32 = cost(workload=W0).compute_us("forward", BIG, batch=n)
    bf16 = cost(workload=W0, dtype="bf16").compute_us("forward", BIG, batch=n)
    flops = n * BIG.fwd_flops_per_example
    nbytes = 2 * (n * 2 * 65536 + BIG.params)
    assert bf16 == pytest.approx(roof("forward", flops, nbytes, peak=4 * PEAK))
    assert fp32 == pytest.approx(roof("forward", flops, 2 * nbytes))
    assert bf16 < fp32 / 2  # 4x the peak, but bf16 turns memory-bound
    with pytest.raises(ValueError, match="has no tf32 rate"):
        cost(dtype="tf32").compute_us("forward", FC, batch=n)
    with pytest.raises(ValueError, match="unknown dtype .fp8.; use one of fp32, tf32, bf16"):
        cost(dtype="fp8")


def test_measured_times_are_reproduced_and_scaled() -> None:
    n_m = 32
    measured = (
        MeasuredTime(workload="w", stage="factor_compute", layer="conv", batch=n_m,
                     inverse_method="eigen", time_us=999.0),
        MeasuredTime(workload="w", stage="backward", layer="", batch=n_m,
                     inverse_method="eigen", time_us=5000.0),
        MeasuredTime(workload="w", stage="inverse", layer="fc", batch=n_m,
                     inverse_method="cholesky", time_us=700.0),
        MeasuredTime(workload="other", stage="forward", layer="", batch=n_m,
                     inverse_method="eigen", time_us=1.0),
    )
    c = cost(device=device(measured))
    assert c.compute_us("factor_compute", CONV, batch=n_m) == pytest.approx(999.0)
    ratio = 999.0 / expected("factor_compute", CONV, n_m)
    assert c.compute_us("factor_compute", CONV, batch=64) == pytest.approx(
        expected("factor_compute", CONV, 64) * ratio)
    assert c.compute_us("backward", None, batch=n_m) == pytest.approx(5000.0)
    # per-layer backward gets its share of the measured whole-model time
    model_whole = cost().compute_us("backward", None, batch=n_m)
    share = c.compute_us("backward", FC, batch=n_m)
    assert share == pytest.approx(expected("backward", FC, n_m) * 5000.0 / model_whole)
    # the inverse was measured with cholesky: not used for eigen
    assert c.compute_us("inverse", FC, batch=n_m) == pytest.approx(expected("inverse", FC, n_m))
    assert (cost(device=device(measured), inverse_method="cholesky")
            .compute_us("inverse", FC, batch=8) == pytest.approx(700.0))
    # another workload's measurement is ignored; use_measured=False ignores all of them
    assert c.compute_us("forward", None, batch=n_m) == pytest.approx(
        cost().compute_us("forward", None, batch=n_m))
    off = cost(device=device(measured), use_measured=False)
    assert off.compute_us("factor_compute", CONV, batch=n_m) == pytest.approx(
        expected("factor_compute", CONV, n_m))


def test_measured_times_apply_to_the_same_workload_model_only() -> None:
    """[[measured]] times are keyed by the workload model's name and fingerprint: a user's
    model of the same FILE.py:FUNC name but another file (or an edited one) is priced by the
    roofline alone, and one cache does not mix two models of one name."""
    from dataclasses import replace

    n_m = 32
    mine = replace(W, name="model.py:build", workload="/a/model.py:build", fingerprint="a" * 64)
    other = replace(mine, workload="/b/model.py:build", fingerprint="b" * 64)
    measured = (
        MeasuredTime(workload="model.py:build", fingerprint="a" * 64, stage="inverse",
                     layer="fc", batch=n_m, inverse_method="eigen", time_us=7000.0),
        MeasuredTime(workload="model.py:build", fingerprint="a" * 64, stage="forward",
                     layer="", batch=n_m, inverse_method="eigen", time_us=3000.0),
    )
    c = cost(device=device(measured), workload=mine)
    assert c.has_measured() and not c.has_measured(other)
    assert c.compute_us("inverse", FC, batch=n_m) == pytest.approx(7000.0)
    assert c.compute_us("forward", None, batch=n_m) == pytest.approx(3000.0)
    # the other model of that name: the analytic times, also through the same CostModel
    assert c.compute_us("inverse", FC, batch=n_m, workload=other) == pytest.approx(
        expected("inverse", FC, n_m))
    o = cost(device=device(measured), workload=other)
    assert o.compute_us("inverse", FC, batch=n_m) == pytest.approx(expected("inverse", FC, n_m))
    assert o.compute_us("forward", None, batch=n_m) == pytest.approx(
        cost(workload=other).compute_us("forward", None, batch=n_m))
    # nor to a registry model of that name (no fingerprint), nor the reverse
    plain = replace(mine, fingerprint="")
    assert cost(device=device(measured), workload=plain).compute_us(
        "inverse", FC, batch=n_m) == pytest.approx(expected("inverse", FC, n_m))
    registry = (replace(measured[0], fingerprint=""),)
    assert cost(device=device(registry), workload=mine).compute_us(
        "inverse", FC, batch=n_m) == pytest.approx(expected("inverse", FC, n_m))
    assert cost(device=device(registry), workload=plain).compute_us(
        "inverse", FC, batch=n_m) == pytest.approx(7000.0)


def test_contention_and_compute_scale() -> None:
    base = cost().compute_us("inverse", FC, batch=1)
    shared = cost(cluster=cluster(cores=2, contention=0.1), ranks_per_node=4)
    assert shared.compute_us("inverse", FC, batch=1) == pytest.approx(base * (1 + 0.1 * 3) * 2)
    assert (cost(cluster=cluster(cores=2, contention=0.1)).for_gpus(2)
            .compute_us("inverse", FC, batch=1) == pytest.approx(base * 1.1))
    assert cost(compute_scale=2.0).compute_us("inverse", FC, batch=1) == pytest.approx(base / 2)
    assert cost().for_gpus(64).options.ranks_per_node == 8


def test_collectives_go_through_the_cluster_with_what_ifs() -> None:
    c = cost()
    assert c.collective_us("all_reduce", 1e6, group_size=32, nodes=4) == pytest.approx(
        group_collective_us(cluster(), "all_reduce", 1e6, group_size=32, nodes=4))
    fast = cost(bandwidth_scale=4.0, alpha_scale=0.0)
    assert fast.collective_us("reduce_scatter", 1e6, group_size=8, nodes=1) == pytest.approx(
        7 / 8 * 1e6 / 400e3)
    blocks = [10.0, 20.0, 30.0, 0.0]
    piped = cost(v_form="pipelined").collective_us("all_gather_v", blocks, group_size=4, nodes=1)
    assert piped == pytest.approx(3 * 1.0 + 60.0 / 100e3)
    assert c.nodes_spanned(9) == 2


def test_v_collective_given_one_number_is_a_value_error() -> None:
    # a *_v op takes per-rank block sizes: one number is a bad argument (ValueError), not a
    # TypeError from building the cache key
    with pytest.raises(ValueError, match="list of per-rank block sizes"):
        cost().collective_us("all_gather_v", 1e6, group_size=4, nodes=1)
    with pytest.raises(ValueError, match="list of per-rank block sizes"):  # a numpy integer
        cost().collective_us("all_gather_v", np.int64(10**6), group_size=4, nodes=1)


def test_payload_helpers() -> None:
    c = cost()
    assert factor_elements(4) == 16 and factor_elements(4, symmetric=True) == 10
    assert c.factor_bytes(CONV) == 4 * (28 * 28 + 16 * 16)
    half = cost(comm_dtype="bf16", symmetric_factors=True)
    assert half.factor_bytes(CONV) == 2 * (28 * 29 // 2 + 16 * 17 // 2)
    assert c.inverse_bytes(CONV) == 4 * (28 * 28 + 16 * 16 + 28 + 16)
    assert cost(inverse_method="cholesky").inverse_bytes(CONV) == 4 * (28 * 28 + 16 * 16)
    assert c.grad_bytes(None) == 4 * (448 + 513000 + 100) and half.grad_bytes(FC) == 2 * 513000
    assert dtype_bytes("fp16") == 2
    assert c.with_overrides(comm_dtype="fp16").comm_dtype == "fp16"


@pytest.mark.parametrize(
    ("args", "kw", "pattern"),
    [
        (("factor_comm", CONV), dict(batch=1), "is not a compute stage"),
        (("inverse", None), dict(batch=1), "is per layer"),
        (("forward", CONV), dict(batch=0), "batch must be a positive int"),
    ],
)
def test_bad_arguments(args: tuple, kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        cost().compute_us(*args, **kw)


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(TypeError, match="unknown CostModel option"):
        cost(bandwith_scale=2.0)
    with pytest.raises(ValueError, match="v_form must be one of"):
        cost(v_form="chunked")
    with pytest.raises(ValueError, match="bandwidth_scale must be > 0"):
        cost(bandwidth_scale=0.0)


def test_conv_factor_cost_follows_the_displacement_gram_algorithm() -> None:
    from kfacperf.sim.models.workload import ConvGeometry

    geo = ConvGeometry(in_channels=16, kernel=(3, 3), stride=(1, 1), dilation=(1, 1),
                       padded=(34, 34), output=(32, 32))
    conv = LayerModel(name="c", kind="conv2d", dim_a=144, dim_g=16, params=2304,
                      rows_per_example=1024,
                      fwd_flops_per_example=2 * 144 * 16 * 1024, in_elems_per_example=16384,
                      out_elems_per_example=16384, conv=geo)
    w = WorkloadModel(name="wc", layers=(conv,), other_params=0, other_fwd_flops_per_example=0.0,
                      input_shape=(16, 32, 32), input_dtype="float32", source="test")
    c = cost(workload=w)
    taps = [(i, j) for i in range(3) for j in range(3)]
    # tap pairs whose displacement lies in the computed half (di > 0, or di == 0 and dj >= 0)
    pairs = [(a, b) for a in taps for b in taps
             if (b[0] - a[0] > 0) or (b[0] == a[0] and b[1] - a[1] >= 0)]
    shifts = {(b[0] - a[0], b[1] - a[1]) for a, b in pairs}
    assert len(pairs) == 45 and len(shifts) == 13
    C, pos, out = 16, 34 * 34, 32 * 32
    for n in (8, 64):
        phases = [
            # positions-major copy
            (0.0, 4 * 2 * n * C * pos),
            # displacement Grams
            (2 * n * C * C * pos * 13, 4 * 13 * (2 * n * C * pos + pos * C * C)),
            # window sums
            (45 * out * C * C, 4 * 45 * out * C * C),
            # G
            (2 * n * out * 16 * 16, 4 * 2 * n * out * 16),
            # running averages
            (3 * (144 ** 2 + 16 ** 2), 12 * (144 ** 2 + 16 ** 2)),
        ]
        want = (EFF["factor_compute"][1]
                + sum(max(f / PEAK, b / BW) for f, b in phases) / EFF["factor_compute"][0])
        assert c.compute_us("factor_compute", conv, batch=n) == pytest.approx(want, rel=1e-12)
        assert c.flops("factor_compute", conv, batch=n) == pytest.approx(sum(f for f, _ in phases))
    # the window sums do not grow with the batch: 8x the batch is far less than 8x the time
    t8, t64 = (c.compute_us("factor_compute", conv, batch=n) for n in (8, 64))
    assert t64 < 4 * t8


def test_additive_mode_sums_compute_and_memory_terms_with_their_own_efficiencies() -> None:
    stages = {k: StageEfficiency(efficiency=e, mem_efficiency=e / 2, overhead_us=o, assumed=False)
              for k, (e, o) in EFF.items()}
    add = DeviceModel(name="a", fp32_tflops=10.0, tf32_tflops=0.0, bf16_tflops=40.0,
                      mem_bandwidth_GBps=100.0, stages=stages, mode="additive")
    c = cost(workload=W0, device=add)
    for stage in STAGE_KINDS:
        for l in W0.layers:
            e, over = EFF[stage]
            f, b = c.flops(stage, l, batch=16), c.bytes_moved(stage, l, batch=16)
            assert c.compute_us(stage, l, batch=16) == pytest.approx(
                over + f / (PEAK * e) + b / (BW * e / 2))
    reg = c.regressors("inverse", FC, batch=1)
    assert reg.compute_us == pytest.approx(c.flops("inverse", FC, batch=1) / PEAK)
    assert reg.roofline_us == pytest.approx(max(reg.compute_us, reg.memory_us)) and reg.calls == 1
    assert c.regressors("forward", None, batch=4).calls == 3


def test_each_stage_uses_its_own_contention() -> None:

    by_stage = {"factor_compute": 0.5, "forward": 0.05}
    shared = cost(cluster=with_host(cluster(cores=8, contention=0.1), contention_by_stage=by_stage),
                  ranks_per_node=2)
    for stage, layer in (("factor_compute", CONV), ("forward", CONV), ("inverse", FC),
                         ("update", FC)):
        base = cost().compute_us(stage, layer, batch=4)
        c = by_stage.get(stage, 0.1)  # a stage the table does not name keeps the single factor
        assert shared.compute_us(stage, layer, batch=4) == pytest.approx(
            base * (1 + c), rel=1e-12), stage
    # an absent table predicts exactly what the single factor did
    single = cost(cluster=cluster(cores=8, contention=0.1), ranks_per_node=2)
    explicit = cost(cluster=with_host(cluster(cores=8, contention=0.1),
                                      contention_by_stage={k: 0.1 for k in STAGE_KINDS}),
                    ranks_per_node=2)
    for stage in STAGE_KINDS:
        assert explicit.compute_us(stage, CONV, batch=4) == single.compute_us(stage, CONV, batch=4)
