"""commbench across nodes: two "nodes" of one rank on this machine, a c10d rendezvous."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kfacperf.bench import multinode, raw
from kfacperf.bench.config import CommbenchConfig
from kfacperf.bench.results import CommbenchResult, Point
from kfacperf.runtime.net import free_port
from kfacperf.sim.models.cluster import OPS, load_cluster_model


def test_points_keep_the_nodes_they_spanned_through_raw_files(tmp_path: Path) -> None:
    within = Point(op="all_reduce", world_size=2, nbytes=4096, time_us=10.0, reps=2)
    across = Point(op="all_reduce", world_size=2, nbytes=4096, time_us=30.0, reps=2, nodes=2)
    result = CommbenchResult(backend="gloo", points=(within, across))
    back = raw.result_from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.points == (within, across)
    # merged apart: the same collective, size and ranks within a node and across two nodes
    merged = raw.merge_results([back, back])
    assert sorted((p.nodes, p.time_us, p.reps) for p in merged.points) == [(1, 10.0, 4),
                                                                           (2, 30.0, 4)]
    data = result.to_dict()
    data["points"][1]["nodes"] = 3
    with pytest.raises(ValueError, match=r"key 'points\[1\]\.nodes': a group of 2 ranks cannot "
                                         r"span 3 nodes"):
        raw.result_from_dict(data, source="x.json")
    del data["points"][1]["nodes"]  # files written before runs across nodes: within one
    assert raw.result_from_dict(data).points[1].nodes == 1


def test_config_across_nodes_is_checked() -> None:
    with pytest.raises(ValueError, match="needs --rdzv-endpoint HOST:PORT"):
        CommbenchConfig(nnodes=2)
    with pytest.raises(ValueError, match="are for runs across nodes"):
        CommbenchConfig(rdzv_endpoint="node0:29400")
    with pytest.raises(ValueError, match="--nnodes must be a positive integer"):
        CommbenchConfig(nnodes=0)
    cfg = CommbenchConfig(nnodes=2, rdzv_endpoint="node0:29400", nproc_per_node=4)
    cmd = multinode.torchrun_command(cfg, per_node=4, job_json="{}")
    joined = " ".join(cmd)
    assert "--nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0:29400" in joined
    assert "--node-rank" not in joined  # c10d orders the nodes itself
    assert cmd[-3:] == ["-m", "kfacperf.bench.multinode", "{}"]


def test_a_failed_torchrun_is_one_error_with_its_output_passed_on(monkeypatch) -> None:
    cfg = CommbenchConfig(nnodes=2, rdzv_endpoint="127.0.0.1:1", timeout_s=5)
    monkeypatch.setattr(multinode, "torchrun_command", lambda *a, **k: [
        sys.executable, "-c", "import sys; print('rendezvous timed out'); sys.exit(3)"])
    seen: list[str] = []
    with pytest.raises(RuntimeError, match=r"torchrun exited with status 3 .* --nnodes 2 "
                                           r"--rdzv-endpoint 127\.0\.0\.1:1 within 5 s"):
        multinode.run_across_nodes(cfg, backend="gloo", timing="per_call", progress=seen.append)
    assert "rendezvous timed out" in seen


@pytest.mark.slow
def test_two_nodes_of_one_rank_fit_the_inter_tier(tmp_path: Path) -> None:
    """The same command twice (two "nodes" on localhost): node 0 writes a model whose inter
    tier was measured between the nodes; node 1 writes nothing."""
    port = free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")

    def node(rank: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "kfacperf.cli", "commbench", "--nnodes", "2",
             "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", f"test-{port}", "--backend", "gloo", "--sizes", "4KiB,1MiB",
             "--reps", "1", "--warmup", "0", "--timeout", "60", "--name", "two-nodes",
             "--out", str(tmp_path / f"model{rank}.toml"),
             "--raw", str(tmp_path / f"raw{rank}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [node(0), node(1)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not (tmp_path / "model1.toml").exists() and not (tmp_path / "raw1.json").exists()
    data = json.loads((tmp_path / "raw0.json").read_text())
    assert {(p["op"], p["world_size"], p["nodes"]) for p in data["points"]} == {
        (op, 2, 2) for op in OPS}
    assert len(data["points"]) == 8 and all(p["time_us"] > 0 for p in data["points"])
    model = load_cluster_model(tmp_path / "model0.toml")
    assert model.name == "two-nodes" and model.gpus_per_node == 1
    assert not model.inter.assumed and model.intra.assumed  # nothing within a node of one
    assert "groups spanning nodes: 2 nodes x 1 rank" in model.source
    for op in OPS:
        assert model.inter.params(op).bandwidth_GBps > 0
    assert "inter" in outputs[0] and "collective" in outputs[0]  # both print the fits


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--nnodes", "2"], "needs --rdzv-endpoint HOST:PORT"),
     (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2"],
      "--node-rank must be in 0 .. 1"),
     (["--nproc-per-node", "2"], "are for runs across nodes"),
     (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--from-raw", "a.json"],
      "cannot go with --nnodes")],
)
def test_commbench_across_nodes_bad_input(args: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from kfacperf.cli import main

    assert main(["commbench", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
