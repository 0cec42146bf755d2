"""Collective costs against the closed forms (Thakur et al. 2005; Chan et al. 2007), written
out here independently of kfacperf.sim.costs.collectives."""
from __future__ import annotations

import math

import pytest

from kfacperf.sim.costs import collectives as C
from kfacperf.sim.models.cluster import OPS, ClusterModel, Tier

A, BETA = 3.0, 2e-3  # us per step, us per byte (500 MB/s)
PS = (2, 3, 4, 5, 8, 16, 100, 1024)
NS = (1.0, 4096.0, 3e7)


def lg(p: int) -> int:
    return math.ceil(math.log2(p))


CLOSED = {
    ("all_reduce", "ring"): lambda p, n: 2 * (p - 1) * A + 2 * (p - 1) / p * n * BETA,
    ("all_reduce", "tree"): lambda p, n: 2 * lg(p) * A + 2 * n * BETA,
    ("all_reduce", "halving_doubling"): lambda p, n: 2 * lg(p) * A + 2 * (p - 1) / p * n * BETA,
    ("reduce_scatter", "ring"): lambda p, n: (p - 1) * A + (p - 1) / p * n * BETA,
    ("reduce_scatter", "halving_doubling"): lambda p, n: lg(p) * A + (p - 1) / p * n * BETA,
    ("all_gather", "ring"): lambda p, n: (p - 1) * A + (p - 1) / p * n * BETA,
    ("all_gather", "halving_doubling"): lambda p, n: lg(p) * A + (p - 1) / p * n * BETA,
    ("broadcast", "tree"): lambda p, n: lg(p) * (A + n * BETA),
    ("broadcast", "halving_doubling"): lambda p, n: 2 * lg(p) * A + 2 * (p - 1) / p * n * BETA,
}


@pytest.mark.parametrize(("op", "algo"), sorted(CLOSED))
def test_flat_algorithms_match_closed_forms(op: str, algo: str) -> None:
    for p in PS:
        for n in NS:
            assert C.algorithm_us(op, algo, p, n, A, BETA) == pytest.approx(
                CLOSED[(op, algo)](p, n), rel=1e-12)
            a, b = C.coefficients(op, algo, p, n)
            assert a * A + b * BETA == pytest.approx(CLOSED[(op, algo)](p, n), rel=1e-12)


def test_ring_broadcast_is_the_best_pipelined_chain() -> None:
    for p in PS:
        for n in NS:
            got = C.algorithm_us("broadcast", "ring", p, n, A, BETA)
            brute = min((p - 2 + k) * (A + n * BETA / k) for k in range(1, 20001))
            assert got <= brute * (1 + 1e-12)  # continuous k >= 1 is at least as good
            assert got >= brute * 0.97  # and integer k is within a few percent of it
    assert C.algorithm_us("broadcast", "ring", 2, 1000.0, A, BETA) == pytest.approx(A + 1000 * BETA)
    assert C.algorithm_us("broadcast", "ring", 9, 1000.0, 0.0, BETA) == pytest.approx(1000 * BETA)


def test_trivial_groups_and_bad_names() -> None:
    for op, algo in CLOSED:
        assert C.algorithm_us(op, algo, 1, 1e6, A, BETA) == 0.0
        assert C.algorithm_us(op, algo, 8, 0, A, BETA) == 0.0
    with pytest.raises(ValueError, match="no algorithm 'tree' for 'all_gather'"):
        C.algorithm_us("all_gather", "tree", 4, 10, A, BETA)
    with pytest.raises(ValueError, match="not linear"):
        C.coefficients("broadcast", "ring", 4, 10)


# ------------------------------------------------------------------ two tiers
AI, BI = 1.0, 100.0  # intra: us, GB/s per GPU
AE, BE = 5.0, 6.25  # inter: us, GB/s per GPU (node NIC / gpus_per_node)
G = 4


def cluster(multi: str = "hierarchical", v_form: str = "padded", **algo_over: str) -> ClusterModel:
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    algos.update(algo_over)
    return ClusterModel(
        name="t", gpus_per_node=G,
        intra=Tier(alpha_us=AI, bandwidth_GBps=BI, algorithms=algos),
        inter=Tier(alpha_us=AE, bandwidth_GBps=BE, algorithms=algos),
        multi_node={op: multi for op in OPS}, v_collectives=v_form,
    )


def us_per_byte(gbps: float) -> float:
    return 1.0 / (gbps * 1e3)


def test_single_node_uses_intra_tier() -> None:
    n = 8e6
    got = C.group_collective_us(cluster(), "all_reduce", n, group_size=4, nodes=1)
    assert got == pytest.approx(2 * 3 * AI + 2 * 3 / 4 * n * us_per_byte(BI))


def test_hierarchical_all_reduce_matches_two_level_formula() -> None:
    # T = 2(g-1)a_i + 2(g-1)/g n/B_i + 2(N-1)a_e + 2(N-1)/N n/B_net, B_net = g * per-GPU share
    n, N = 1e8, 16
    expect = (2 * (G - 1) * AI + 2 * (G - 1) / G * n * us_per_byte(BI)
              + 2 * (N - 1) * AE + 2 * (N - 1) / N * n * us_per_byte(G * BE))
    got = C.group_collective_us(cluster(), "all_reduce", n, group_size=G * N, nodes=N)
    assert got == pytest.approx(expect, rel=1e-12)


def test_hierarchical_reduce_scatter_all_gather_broadcast() -> None:
    n, N = 4e7, 8
    p = G * N
    rs = ((G - 1) * AI + (G - 1) / G * n * us_per_byte(BI)
          + (N - 1) * AE + (N - 1) / N * (n / G) * us_per_byte(BE))
    assert (C.group_collective_us(cluster(), "reduce_scatter", n, group_size=p, nodes=N)
            == pytest.approx(rs))
    assert (C.group_collective_us(cluster(), "all_gather", n, group_size=p, nodes=N)
            == pytest.approx(rs))
    bc = lg(N) * (AE + n * us_per_byte(BE)) + lg(G) * (AI + n * us_per_byte(BI))
    assert (C.group_collective_us(cluster(), "broadcast", n, group_size=p, nodes=N)
            == pytest.approx(bc))


def test_flat_ring_is_paced_by_the_slowest_link() -> None:
    n, N = 1e8, 4
    p = G * N
    b_net = G * BE  # 25 GB/s per node < 100 GB/s intra
    expect = 2 * (p - 1) * AE + 2 * (p - 1) / p * n / (min(BI, b_net) * 1e3)
    assert (C.group_collective_us(cluster("flat"), "all_reduce", n, group_size=p, nodes=N)
            == pytest.approx(expect))
    # one rank per node: hierarchical degenerates to the inter tier alone
    one = C.group_collective_us(cluster(), "all_reduce", n, group_size=N, nodes=N)
    assert one == pytest.approx(2 * (N - 1) * AE + 2 * (N - 1) / N * n * us_per_byte(BE))


def test_v_collectives_padded_and_pipelined() -> None:
    blocks = [4e6, 1e6, 0.0, 2.5e6]
    p, mmax, total, mmin = 4, 4e6, 7.5e6, 0.0
    beta = us_per_byte(BI)
    padded = C.group_collective_us(cluster(), "reduce_scatter_v", blocks, group_size=p, nodes=1)
    assert padded == pytest.approx((p - 1) * (AI + mmax * beta))
    piped = C.group_collective_us(cluster(v_form="pipelined"), "all_gather_v", blocks,
                                  group_size=p, nodes=1)
    assert piped == pytest.approx((p - 1) * AI + (total - mmin) * beta)
    # the v_form argument overrides the cluster's setting
    assert C.group_collective_us(cluster(), "all_gather_v", blocks, group_size=p, nodes=1,
                                 v_form="pipelined") == pytest.approx(piped)
    assert piped < padded
    even = C.group_collective_us(cluster(), "all_gather_v", [1e6] * 4, group_size=4, nodes=1)
    assert even == pytest.approx(C.group_collective_us(cluster(), "all_gather", 4e6,
                                                       group_size=4, nodes=1))


def test_per_collective_override_applies_to_that_collective_only() -> None:
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    c = ClusterModel(
        name="o", gpus_per_node=8,
        intra=Tier(alpha_us=AI, bandwidth_GBps=BI, algorithms=algos,
                   overrides={"all_gather": (7.0, 10.0)}),
        inter=Tier(alpha_us=AE, bandwidth_GBps=BE, algorithms=algos),
        multi_node={op: "hierarchical" for op in OPS}, v_collectives="padded",
    )
    n = 1e6
    assert C.group_collective_us(c, "all_gather", n, group_size=8, nodes=1) == pytest.approx(
        7 * 7.0 + 7 / 8 * n * us_per_byte(10.0))
    assert C.group_collective_us(c, "reduce_scatter", n, group_size=8, nodes=1) == pytest.approx(
        7 * AI + 7 / 8 * n * us_per_byte(BI))


def test_bandwidth_scale_what_if() -> None:
    n = 1e9
    base = C.group_collective_us(cluster().scaled(alpha=0.0), "all_reduce", n, group_size=64,
                                 nodes=16)
    fast = C.group_collective_us(cluster().scaled(bandwidth=2.0, alpha=0.0), "all_reduce", n,
                                 group_size=64, nodes=16)
    assert fast == pytest.approx(base / 2, rel=1e-12)


@pytest.mark.parametrize(
    ("op", "nbytes", "kw", "pattern"),
    [
        ("all_to_all", 10, dict(group_size=4, nodes=1), "unknown collective 'all_to_all'"),
        ("all_reduce", 10, dict(group_size=4, nodes=5), "nodes must be an int in"),
        ("all_reduce", -1, dict(group_size=4, nodes=1), "nbytes must be a number >= 0"),
        ("all_reduce", 10, dict(group_size=0, nodes=1), "group_size must be a positive int"),
        ("all_gather_v", [1, 2], dict(group_size=4, nodes=1), "2 block sizes for a group of 4"),
        ("all_gather_v", 10, dict(group_size=4, nodes=1), "list of per-rank block sizes"),
    ],
)
def test_bad_arguments(op: str, nbytes: object, kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        C.group_collective_us(cluster(), op, nbytes, **kw)  # type: ignore[arg-type]


def test_degenerate_groups_cost_nothing() -> None:
    for op in C.ALL_OPS:
        size = [5.0] if op.endswith("_v") else 1e6
        assert C.group_collective_us(cluster(), op, size, group_size=1, nodes=1) == 0.0
