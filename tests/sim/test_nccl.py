"""NCCL's tuning model: latencies and choices against hand-computed values of its formulas."""
from __future__ import annotations

import dataclasses
import math

import pytest

from kfacperf.sim.costs.collectives import group_collective_us
from kfacperf.sim.costs.nccl import PROFILES, nccl_choice
from kfacperf.sim.models import load_cluster

V28 = PROFILES["2.8"]


def test_multi_node_latencies_match_the_formulas() -> None:
    # 256 nodes x 4 GPUs, 8 bytes: the tree's LL latency, NVLink hops x1.8 across nodes
    tree_ll = 4.4 + 2 * (3 * 0.52 * 1.8 + 8 * 5.0)
    got = nccl_choice(V28, "all_reduce", 8, ranks=1024, nodes=256, intra_GBps=126,
                      node_net_GBps=24)
    assert (got.algorithm, got.protocol) == ("tree", "LL")
    assert got.time_us == pytest.approx(tree_ll + 8 / (0.5 * 0.92 / 3.8 * 24 * 1e3))
    assert tree_ll == pytest.approx(90.0, abs=0.05)


def test_tree_latency_counts_whole_doublings_of_the_nodes_as_nccl_does() -> None:
    """NCCL's tree latency takes log2i(nodes), the floor (its utils.h: log2Down): 540 nodes
    pay 9 network hops each way, as 512 do, not 10 as 1,024 do."""
    def tree_ll(nodes: int) -> float:
        got = nccl_choice(V28, "all_reduce", 8, ranks=8 * nodes, nodes=nodes, intra_GBps=126,
                          node_net_GBps=24)
        assert (got.algorithm, got.protocol) == ("tree", "LL")
        return got.time_us - 8 / (0.5 * 0.92 / 3.8 * 24 * 1e3)

    hops = {n: (tree_ll(n) - 4.4 - 2 * 7 * 0.52 * 1.8) / (2 * 5.0) for n in (512, 540, 1024)}
    assert hops == pytest.approx({512: 9.0, 540: 9.0, 1024: 10.0})


def test_single_node_large_message_is_a_simple_ring() -> None:
    n, p, bus = 256 * 2**20, 4, 126.0
    got = nccl_choice(V28, "all_reduce", n, ranks=p, nodes=1, intra_GBps=bus, node_net_GBps=0)
    assert (got.algorithm, got.protocol) == ("ring", "Simple")
    ring = 8.4 + 2 * (p - 1) * 3.4 + n * 2 * (p - 1) / (p * bus * 1e3)
    assert got.time_us == pytest.approx(ring)


def test_ring_simple_across_nodes_pays_the_plateau() -> None:
    p, nodes, n = 64, 16, 64 * 2**20
    lat = (8.4 + (2 * 63 - 2 * 15) * 3.4 + 2 * 15 * 9.6) * 1.9
    ring = lat + n * 2 * (p - 1) / (p * 24.0 * 1e3)
    got = nccl_choice(V28, "all_reduce", n, ranks=p, nodes=nodes, intra_GBps=126,
                      node_net_GBps=24)
    assert got.time_us <= ring + 1e-9  # tree may be faster; never slower than the ring


def test_reduce_scatter_and_broadcast_stay_on_rings() -> None:
    for op in ("reduce_scatter", "all_gather", "broadcast"):
        got = nccl_choice(V28, op, 1e6, ranks=64, nodes=16, intra_GBps=126, node_net_GBps=24)
        assert got.algorithm == "ring", op
    n, bus = 2**26, 24.0
    bc = nccl_choice(V28, "broadcast", n, ranks=64, nodes=16, intra_GBps=126, node_net_GBps=bus)
    assert bc.protocol == "Simple"
    assert bc.time_us == pytest.approx(8.4 + 9.6 + n / (bus * 1e3))  # a pipelined chain


def test_choice_is_the_fastest_of_all_pairs() -> None:
    for n in (8, 4096, 2**20, 2**24, 2**28):
        best = nccl_choice(V28, "all_reduce", n, ranks=256, nodes=64, intra_GBps=126,
                           node_net_GBps=24)
        for algo in ("ring", "tree"):
            for proto in ("LL", "LL128", "Simple"):
                forced = dataclasses.replace(
                    V28, base={k: (v if k == (algo, proto) else math.inf)
                               for k, v in V28.base.items()})
                t = nccl_choice(forced, "all_reduce", n, ranks=256, nodes=64, intra_GBps=126,
                                node_net_GBps=24).time_us
                assert best.time_us <= t + 1e-9


def test_cluster_runs_its_collectives_through_nccl() -> None:
    c = load_cluster("abci-v100")
    assert c.nccl == "2.8"
    n = 50e6
    want = nccl_choice(V28, "all_reduce", n, ranks=64, nodes=16,
                       intra_GBps=c.intra.bandwidth_GBps,
                       node_net_GBps=c.inter.bandwidth_GBps * 4).time_us
    assert group_collective_us(c, "all_reduce", n, group_size=64, nodes=16) == pytest.approx(want)
    # SP-NGD's form: a reduce-scatter-v as one all-reduce of every block
    blocks = [1e6, 3e6, 0.0, 2e6]
    fused = group_collective_us(c, "reduce_scatter_v", blocks, group_size=4, nodes=1,
                                v_form="allreduce")
    assert fused == pytest.approx(group_collective_us(c, "all_reduce", 6e6, group_size=4,
                                                      nodes=1))


def test_unknown_nccl_version_is_refused(tmp_path) -> None:
    from kfacperf.sim.models.cluster import load_cluster_model, save_cluster_model

    path = save_cluster_model(load_cluster("abci-v100"), tmp_path / "c.toml")
    assert load_cluster_model(path).nccl == "2.8"
    path.write_text(path.read_text().replace('nccl = "2.8"', 'nccl = "2.3"'))
    with pytest.raises(ValueError, match="nccl"):
        load_cluster_model(path)


def test_a_latency_what_if_scales_nccls_own_latencies() -> None:
    """--latency-scale on an NCCL cluster: a tiny message's time is its latency, so it scales
    exactly; a 256 MiB all-reduce is bandwidth-bound and barely moves."""
    abci = load_cluster("abci-v100")
    for op in ("all_reduce", "reduce_scatter", "all_gather", "broadcast"):
        base = group_collective_us(abci, op, 1, group_size=1024, nodes=256)
        for k in (0.0, 0.5, 3.0):
            got = group_collective_us(abci.scaled(alpha=k), op, 1, group_size=1024, nodes=256)
            assert got == pytest.approx(k * base, rel=1e-3, abs=1e-3), (op, k)
    big = 256 * 2**20
    base = group_collective_us(abci, "all_reduce", big, group_size=1024, nodes=256)
    slow = group_collective_us(abci.scaled(alpha=3.0), "all_reduce", big, group_size=1024,
                               nodes=256)
    assert base < slow < 1.1 * base
    # SP-NGD's pipelined all-gather-v pays NCCL's ring latency, scaled too
    blocks = [1.0] * 64
    v = group_collective_us(abci, "all_gather_v", blocks, group_size=64, nodes=16)
    assert group_collective_us(abci.scaled(alpha=2.0), "all_gather_v", blocks, group_size=64,
                               nodes=16) == pytest.approx(2 * v, rel=1e-4)
    with pytest.raises(ValueError, match="scaled together"):
        abci.scaled(alpha=2.0, tier="inter")


@pytest.mark.parametrize("edit, key", [
    (("[inter]\n", "[inter]\nalpha_us = 5.0\n"), "inter.alpha_us"),
    (("[intra]\n", "[intra.all_reduce]\nalgorithm = \"tree\"\n\n[intra]\n"), "intra.all_reduce"),
    (("[intra]\n", "[multi_node]\nall_reduce = \"flat\"\n\n[intra]\n"), "multi_node"),
])
def test_an_nccl_cluster_file_refuses_what_nccl_would_ignore(tmp_path, edit, key) -> None:
    """Latencies, algorithms and multi-node forms have no effect where NCCL's model runs the
    collectives: a file that sets them is refused, naming the key (never silently ignored)."""
    from kfacperf.sim.models.cluster import load_cluster_model, save_cluster_model
    from kfacperf.sim.models.presets import models_dir

    preset = models_dir() / "clusters" / "abci-v100.toml"
    path = save_cluster_model(load_cluster("abci-v100"), tmp_path / "c.toml")
    assert path.read_text() == preset.read_text()  # the preset is what the writer writes
    path.write_text(path.read_text().replace(*edit, 1))
    with pytest.raises(ValueError, match=f"key '{key}': has no effect .*--latency-scale"):
        load_cluster_model(path)


def test_fitting_a_latency_nccl_does_not_have_is_refused() -> None:
    from kfacperf.calibrate.published import get_term, parse_term
    from kfacperf.sim.models import load_device

    with pytest.raises(ValueError, match="no alpha_us to fit"):
        get_term(load_device("v100-spngd"), parse_term("cluster.inter.alpha_us"),
                 load_cluster("abci-v100"))
