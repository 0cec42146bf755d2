"""The host model: ranks sharing CPU cores, apart from the network; its TOML table; old files."""
from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from kfacperf.sim.costs.collectives import group_collective_us
from kfacperf.sim.costs.model import CostModel
from kfacperf.sim.models import load_cluster
from kfacperf.sim.models.cluster import load_cluster_model, save_cluster_model
from kfacperf.sim.models.device import STAGE_KINDS
from kfacperf.sim.models.host import DEDICATED, HostModel, expected_max_normal
from tests.sim.test_models import make_cluster, make_device, make_workload

HOST = HostModel(cores_per_node=2, contention=0.1)


def with_host(**changes: object):
    return replace(make_cluster(), host=replace(HOST, **changes))


def test_compute_factor_is_contention_times_oversubscription() -> None:
    assert HOST.compute_factor(None, ranks_on_node=1) == 1.0
    assert HOST.compute_factor(None, ranks_on_node=2) == pytest.approx(1.1)
    # 4 ranks on 2 cores: (1 + 3 x 0.1) x 4/2; 2 ranks of 2 threads: (1 + 0.1) x 2
    assert HOST.compute_factor(None, ranks_on_node=4) == pytest.approx(1.3 * 2)
    assert HOST.compute_factor(None, ranks_on_node=2, threads_per_rank=2) == pytest.approx(2.2)
    # no cores to share: contention alone
    assert HostModel(cores_per_node=0, contention=0.1).compute_factor(
        None, ranks_on_node=4) == pytest.approx(1.3)


def test_dedicated_devices_have_no_host_and_no_delays(tmp_path: Path) -> None:
    for name in ("abci-v100", "dgx-a100-hdr", "dgx-h100-ndr"):
        cluster = load_cluster(name)
        assert cluster.host is None and cluster.host_delays is DEDICATED
    for ranks in (1, 2, 8):
        assert DEDICATED.compute_factor("inverse", ranks_on_node=ranks, threads_per_rank=4) == 1.0
        assert DEDICATED.comm_factor(ranks) == 1.0
        assert DEDICATED.straggle(ranks) == 0.0
    gpu = replace(make_cluster(), host=None)
    text = save_cluster_model(gpu, tmp_path / "gpu.toml").read_text()
    assert "[host" not in text and "[compute" not in text
    assert load_cluster_model(tmp_path / "gpu.toml") == gpu


def test_contention_by_stage_round_trips_and_defaults_to_the_single_factor(tmp_path: Path) -> None:
    c = with_host(contention_by_stage={"factor_compute": 0.48, "forward": 0.07})
    back = load_cluster_model(save_cluster_model(c, tmp_path / "c.toml"))
    assert back == c
    h = back.host_delays
    assert h.compute_factor("factor_compute", ranks_on_node=2) == pytest.approx(1.48)
    assert h.compute_factor("forward", ranks_on_node=2) == pytest.approx(1.07)
    assert h.compute_factor("inverse", ranks_on_node=2) == pytest.approx(1.1)  # not named: 0.1
    assert h.compute_factor("forward", ranks_on_node=4) == pytest.approx((1 + 3 * 0.07) * 2)
    # without the table nothing is written and every stage uses the single factor
    text = save_cluster_model(make_cluster(), tmp_path / "plain.toml").read_text()
    assert "contention_by_stage" not in text
    assert all(HOST.compute_factor(k, ranks_on_node=2) == pytest.approx(1.1) for k in STAGE_KINDS)
    with pytest.raises(ValueError, match="not a compute stage kind"):
        HOST.compute_factor("factor_comm", ranks_on_node=2)
    with pytest.raises(ValueError, match="unknown stage kind 'optimizer'"):
        replace(HOST, contention_by_stage={"optimizer": 0.1})


C = "contention = 0.1"


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        (C, C + "\n[host.contention_by_stage]\nfactor_comm = 0.4",
         r"key 'host\.contention_by_stage\.factor_comm': unknown stage kind; "
         r"the stage kinds are: forward"),
        (C, C + "\n[host.contention_by_stage]\nforward = -0.1",
         r"key 'host\.contention_by_stage\.forward': must be >= 0"),
        (C, C + "\n[host.contention_by_stage]\nforward = \"high\"",
         r"key 'host\.contention_by_stage\.forward': expected a number, got a string"),
        (C, C + "\ncontention_by_stage = 0.3",
         r"key 'host\.contention_by_stage': expected a table"),
        (C, C + "\nstraggler = -0.02", r"key 'host\.straggler': must be >= 0"),
        (C, C + "\nstraggler = \"some\"",
         r"key 'host\.straggler': expected a number, got a string"),
        (C, C + "\ncomm_contention = -0.2", r"key 'host\.comm_contention': must be >= 0"),
        (C, C + "\ncomm_contenton = 0.2", r"key 'host\.comm_contenton': unknown key"),
        (C, "contention = true", r"key 'host\.contention': expected a number, got a bool"),
        ("cores_per_node = 2\n", "", r"missing key 'host\.cores_per_node'"),
        ("cores_per_node = 2", "cores_per_node = -1", r"key 'host\.cores_per_node': must be >= 0"),
        ("\n[host]\n", "\n[compute]\n", r"key 'compute': unknown key"),  # format 1 name
    ],
)
def test_host_table_strict_errors(tmp_path: Path, old: str, new: str, pattern: str) -> None:
    text = save_cluster_model(make_cluster(), tmp_path / "c.toml").read_text()
    assert old in text, old
    path = tmp_path / "edited.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match=pattern) as info:
        load_cluster_model(path)
    assert str(path) in str(info.value)


V1_CPU = """format = "kfacperf-cluster-1"
name = "old-cpu"
description = ""
source = ""
gpus_per_node = 64
v_collectives = "padded"

[multi_node]
all_reduce = "flat"
reduce_scatter = "flat"
all_gather = "flat"
broadcast = "flat"

[compute]
cores_per_node = 2
contention = 0.15
straggler = 0.04
comm_contention = 0.09

[compute.contention_by_stage]
update = 0.84
{tiers}"""

TIER = """
[{name}]
alpha_us = 800.0
bandwidth_GBps = 1.5
assumed = false

[{name}.all_reduce]
algorithm = "ring"

[{name}.reduce_scatter]
algorithm = "ring"

[{name}.all_gather]
algorithm = "ring"

[{name}.broadcast]
algorithm = "tree"
"""


def _v1(compute: str | None = None) -> str:
    text = V1_CPU.format(tiers=TIER.format(name="intra") + TIER.format(name="inter"))
    if compute is not None:
        start = text.index("[compute]")
        end = text.index("\n[intra]")
        text = text[:start] + compute + "\n" + text[end:]
    return text


def test_first_format_is_read_with_its_compute_table_as_the_host(tmp_path: Path) -> None:
    """Users' ``kfacperf-cluster-1`` files keep working; saved again they are format 2."""
    old = tmp_path / "old.toml"
    old.write_text(_v1())
    model = load_cluster_model(old)
    assert model.host == HostModel(cores_per_node=2, contention=0.15, straggler=0.04,
                                   comm_contention=0.09, contention_by_stage={"update": 0.84})
    assert model.intra.alpha_us == 800.0 and model.inter.bandwidth_GBps == 1.5
    new = save_cluster_model(model, tmp_path / "new.toml").read_text()
    assert 'format = "kfacperf-cluster-2"' in new and "[host]" in new and "[compute" not in new
    assert load_cluster_model(tmp_path / "new.toml") == model
    # all zero in the first format was a dedicated device: no host model
    gpu = tmp_path / "gpu.toml"
    gpu.write_text(_v1("[compute]\ncores_per_node = 0\ncontention = 0.0\n"))
    assert load_cluster_model(gpu).host is None


@pytest.mark.parametrize(
    ("compute", "pattern"),
    [
        (None, None),  # the table is required in the first format
        ("[compute]\ncores_per_node = 0\ncontention = 0.0\nstragler = 0.1\n",
         r"key 'compute\.stragler': unknown key"),
        ("[compute]\ncontention = 0.0\n", r"missing key 'compute\.cores_per_node'"),
        ("[compute]\ncores_per_node = 0\ncontention = 0.0\n[host]\ncores_per_node = 2\n"
         "contention = 0.0\n", r"key 'host': unknown key"),  # no table of the second format
    ],
)
def test_first_format_is_read_strictly(tmp_path: Path, compute: str | None,
                                       pattern: str | None) -> None:
    path = tmp_path / "old.toml"
    path.write_text(_v1("") if compute is None else _v1(compute))
    with pytest.raises(ValueError, match=pattern or r"missing key 'compute'") as info:
        load_cluster_model(path)
    assert str(path) in str(info.value)
    path.write_text(_v1().replace("kfacperf-cluster-1", "kfacperf-cluster-0"))
    with pytest.raises(ValueError, match=r"key 'format': expected 'kfacperf-cluster-2' or "
                                         r"'kfacperf-cluster-1', got 'kfacperf-cluster-0'"):
        load_cluster_model(path)


def test_expected_max_normal_matches_closed_forms() -> None:
    assert expected_max_normal(1) == 0.0
    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-9)
    assert expected_max_normal(3) == pytest.approx(1.5 / math.sqrt(math.pi), rel=1e-9)
    # Monte Carlo check of a larger n, independent of the quadrature
    rng = random.Random(0)
    draws = [max(rng.gauss(0, 1) for _ in range(16)) for _ in range(20000)]
    assert expected_max_normal(16) == pytest.approx(sum(draws) / len(draws), abs=0.02)
    with pytest.raises(ValueError, match="n must be >= 1"):
        expected_max_normal(0)


def test_comm_contention_slows_collectives_of_ranks_sharing_cores_only(tmp_path: Path) -> None:
    """(1 + comm_contention) on every collective where ranks share a node's cores; never
    without cores to share or for one rank on a node; round-trips; absent means 0."""
    h = replace(HOST, comm_contention=0.25)
    assert h.comm_factor(2) == h.comm_factor(8) == pytest.approx(1.25)
    assert h.comm_factor(1) == 1.0 and HOST.comm_factor(2) == 1.0
    assert replace(h, cores_per_node=0).comm_factor(8) == 1.0
    assert h.compute_factor(None, ranks_on_node=2) == HOST.compute_factor(None, ranks_on_node=2)
    c = with_host(comm_contention=0.25)
    w, d = make_workload(), make_device()
    for ranks, factor in ((2, 1.25), (1, 1.0)):
        cost = CostModel(workload=w, device=d, cluster=c, ranks_per_node=ranks)
        for op, nbytes in (("all_reduce", 1 << 20), ("reduce_scatter_v", (4000, 9000))):
            plain = group_collective_us(c, op, nbytes, group_size=2, nodes=1, v_form=None)
            assert cost.collective_us(op, nbytes, group_size=2, nodes=1) == pytest.approx(
                factor * plain, rel=1e-12)
    assert load_cluster_model(save_cluster_model(c, tmp_path / "c.toml")) == c
    assert "comm_contention = 0.25" in (tmp_path / "c.toml").read_text()
    assert "comm_contention" not in (
        save_cluster_model(make_cluster(), tmp_path / "b.toml").read_text())
    with pytest.raises(ValueError, match="comm_contention must be >= 0"):
        replace(HOST, comm_contention=-0.1)


def test_straggler_grows_like_the_expected_maximum(tmp_path: Path) -> None:
    h = replace(HOST, straggler=0.04)
    assert h.straggle(1) == 0.0 and HOST.straggle(8) == 0.0  # one rank waits for no one
    assert h.straggle(2) == pytest.approx(0.04)
    assert h.straggle(4) == pytest.approx(0.04 * 1.0293753730 / (1 / math.sqrt(math.pi)))
    assert h.straggle(64) == pytest.approx(0.04 * expected_max_normal(64) / expected_max_normal(2))
    # the straggler is a wait at collectives, not slower compute
    assert h.compute_factor(None, ranks_on_node=2) == pytest.approx(1.1)
    c = with_host(straggler=0.04)
    assert load_cluster_model(save_cluster_model(c, tmp_path / "c.toml")) == c
    assert "straggler = 0.04" in (tmp_path / "c.toml").read_text()
    # absent means 0, and it is not written then
    assert "straggler" not in save_cluster_model(make_cluster(), tmp_path / "b.toml").read_text()
    with pytest.raises(ValueError, match="straggler must be >= 0"):
        replace(HOST, straggler=-0.1)


def test_the_cost_model_takes_every_host_delay_through_the_host() -> None:
    """Compute, host work between stages and collectives are slowed by the cluster's host;
    a cluster without one costs exactly the device's and the network's times."""
    w, d = make_workload(), make_device(layer_host_us={"load_grad": 20.0, "write_grad": 30.0})
    shared = with_host(contention_by_stage={"inverse": 0.5}, comm_contention=0.2)
    dedicated = replace(shared, host=None)
    a = CostModel(workload=w, device=d, cluster=shared, ranks_per_node=2)
    b = CostModel(workload=w, device=d, cluster=dedicated, ranks_per_node=2)
    layer = w.layers[0]
    assert a.compute_us("inverse", layer, batch=8) == pytest.approx(
        1.5 * b.compute_us("inverse", layer, batch=8), rel=1e-12)
    assert a.compute_us("forward", None, batch=8) == pytest.approx(
        1.1 * b.compute_us("forward", None, batch=8), rel=1e-12)
    assert a.layer_host_us("write_grad") == pytest.approx(1.1 * 30.0)
    assert b.layer_host_us("write_grad") == 30.0
    assert a.collective_us("all_reduce", 1 << 20, group_size=2, nodes=1) == pytest.approx(
        1.2 * b.collective_us("all_reduce", 1 << 20, group_size=2, nodes=1), rel=1e-12)
    assert a.host is shared.host and b.host is DEDICATED
