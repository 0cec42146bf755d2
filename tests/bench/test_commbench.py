"""commbench: fits recover known alpha-beta and algorithms; one real gloo run writes a model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers.synthetic_commbench import TRUE, synthetic_result
from kfacperf.bench import commbench as cb
from kfacperf.bench import results, timing
from kfacperf.calibrate import cluster as cbf
from kfacperf.sim.costs.collectives import algorithm_us
from kfacperf.sim.models.cluster import OPS, load_cluster_model


def test_fit_cluster_recovers_alpha_beta_and_algorithm(tmp_path: Path) -> None:
    model, tried = cbf.fit_cluster(synthetic_result(), name="synthetic")
    for op, (algo, alpha, gbps) in TRUE.items():
        prm = model.intra.params(op)
        assert prm.algorithm == algo, op
        assert prm.alpha_us == pytest.approx(alpha, rel=1e-6)
        assert prm.bandwidth_GBps == pytest.approx(gbps, rel=1e-6)
        assert tried[op][0].algorithm == algo and tried[op][0].max_rel_error < 1e-9
    # slowdown(r) = (1 + c (r-1)) max(1, r/2): 1.2 -> c = 0.2, 2.8 / 2 = 1.4 -> c = 0.133
    assert model.host.contention == pytest.approx((1 * 0.2 + 3 * 0.4) / (1 + 9), rel=1e-9)
    assert model.host.cores_per_node == 2 and model.gpus_per_node == 64
    path = tmp_path / "c.toml"
    from kfacperf.sim.models.cluster import save_cluster_model

    assert load_cluster_model(save_cluster_model(model, path)) == model


def test_fit_cluster_writes_contention_per_stage_kind(tmp_path: Path) -> None:
    from dataclasses import replace

    from kfacperf.sim.models.cluster import save_cluster_model

    per_stage = {2: {"forward": 1.07, "factor_compute": 1.48},
                 4: {"forward": 2.28, "factor_compute": 3.6}}
    result = replace(synthetic_result(), stage_slowdowns=per_stage)
    model, _ = cbf.fit_cluster(result, name="synthetic")
    # same least squares as the single factor: x = r - 1, y = slowdown / max(1, r/2) - 1
    assert model.host.contention_by_stage["forward"] == pytest.approx(
        (0.07 + 3 * 0.14) / 10, rel=1e-3)
    assert model.host.contention_by_stage["factor_compute"] == pytest.approx(
        (0.48 + 3 * 0.8) / 10, rel=1e-3)
    assert set(model.host.contention_by_stage) == {"forward", "factor_compute"}
    assert "per stage kind: 2: forward 1.07, factor_compute 1.48" in model.source
    assert load_cluster_model(save_cluster_model(model, tmp_path / "c.toml")) == model
    # without per-stage measurements the model has no table, as before
    assert cbf.fit_cluster(synthetic_result(), name="s")[0].host.contention_by_stage == {}


def test_probe_has_one_workload_per_stage_kind() -> None:
    import torch

    from kfacperf.bench.probe import stage_workloads
    from kfacperf.sim.models.device import STAGE_KINDS

    work = stage_workloads(torch.device("cpu"))
    assert tuple(work) == STAGE_KINDS
    for fn in work.values():
        fn()  # runs (and twice: backward keeps its graph)
        fn()


def test_fit_with_noise_stays_close() -> None:
    model, _ = cbf.fit_cluster(synthetic_result(noise=0.05), name="noisy")
    for op, (algo, alpha, gbps) in TRUE.items():
        prm = model.intra.params(op)
        t_true = algorithm_us(op, algo, 4, 1 << 20, alpha, 1 / (gbps * 1e3))
        t_fit = algorithm_us(op, prm.algorithm, 4, 1 << 20, prm.alpha_us, prm.beta_us_per_byte)
        assert t_fit == pytest.approx(t_true, rel=0.08), op


def test_a_repetition_times_one_call_alone_or_a_batch() -> None:
    assert timing.calls_per_repetition("per_call", 10.0) == 1
    assert timing.calls_per_repetition("batched", 10.0) == 20  # capped
    assert timing.calls_per_repetition("batched", 1000.0) == 3  # about 3 ms of calls
    assert timing.calls_per_repetition("batched", 50_000.0) == 1
    assert timing.resolve_timing("auto", "gloo") == "per_call"
    assert timing.resolve_timing("auto", "nccl") == "batched"
    assert timing.resolve_timing("batched", "gloo") == "batched"
    with pytest.raises(ValueError, match="timing must be"):
        cb.CommbenchConfig(timing="sometimes")
    with pytest.raises(ValueError, match="timing must be"):
        timing.calls_per_repetition("auto", 10.0)


def test_config_and_size_parsing() -> None:
    assert (results.parse_size("4KiB") == 4096 and results.parse_size("1.5MiB") == 1572864
            and results.parse_size("100") == 100)
    with pytest.raises(ValueError, match="cannot read size 'big'"):
        results.parse_size("big")
    with pytest.raises(ValueError, match="world sizes must be >= 2"):
        cb.CommbenchConfig(world_sizes=(1,))
    with pytest.raises(ValueError, match="unknown collective"):
        cb.CommbenchConfig(ops=("all_to_all",))
    partial = results.CommbenchResult(backend="gloo", points=synthetic_result().points[:16])
    with pytest.raises(ValueError, match="not measured"):
        cbf.fit_cluster(partial, name="x")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--sizes", "big"], "cannot read size 'big'"),
     (["--world-sizes", "1"], "world sizes must be >= 2"),
     (["--ops", "all_to_all"], "unknown collective"),
     (["--timeout", "nan"], "--timeout must be a number of seconds > 0"),
     (["--timeout", "inf"], "--timeout must be a number of seconds > 0"),
     (["--world-sizes", "2,5000"], "at most 1,024 ranks"),
     (["--world-sizes", "2", "--sizes", "1,2"], "are one buffer on 2 ranks")],
)
def test_commbench_command_bad_input(args: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from kfacperf.cli import main

    assert main(["commbench", *args]) == 2
    assert message in capsys.readouterr().err


def test_points_are_recorded_at_the_bytes_their_buffer_holds() -> None:
    # whole fp32 elements, an equal block per rank: 4 KiB on 3 ranks is 342 x 3 elements
    assert timing.sent_bytes(4096, 2) == 4096
    assert timing.sent_bytes(4096, 3) == 342 * 3 * 4
    assert timing.sent_bytes(1, 8) == 32


def test_from_raw_with_no_measurement_is_an_error(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kfacperf.cli import main

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(results.CommbenchResult(backend="gloo", points=()).to_dict()))
    assert main(["commbench", "--from-raw", str(empty)]) == 2
    assert "no measurement in the file(s)" in capsys.readouterr().err


def test_a_size_too_large_to_allocate_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*_args, **_kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    monkeypatch.setattr(timing, "make_call", no_memory)
    with pytest.raises(timing.BufferTooLarge, match="all_reduce at 1,000,000,000,000 bytes on "
                                                     "cpu; give smaller --sizes"):
        timing.time_points([("all_reduce", 10**12)], ranks=[0], rank=0, group=None,
                           device="cpu", sync=lambda: None, timing="per_call", reps=1, warmup=0)


@pytest.mark.slow
def test_real_gloo_run_writes_a_loadable_cluster_model(tmp_path: Path) -> None:
    from kfacperf.cli import main

    out = tmp_path / "local.toml"
    raw = tmp_path / "raw.json"
    rc = main(["commbench", "--world-sizes", "2", "--sizes", "4KiB,256KiB,16MiB", "--reps", "2",
               "--warmup", "1", "--name", "test-cpu", "--out", str(out), "--raw", str(raw)])
    assert rc == 0
    model = load_cluster_model(out)
    assert model.name == "test-cpu" and model.intra.assumed is False
    for op in OPS:
        prm = model.intra.params(op)
        assert prm.bandwidth_GBps > 0 and prm.alpha_us >= 0
    import json

    data = json.loads(raw.read_text())
    assert len(data["points"]) == 12 and all(p["time_us"] > 0 for p in data["points"])
    # gloo times each call alone, as the optimizer issues it
    assert {p["timing"] for p in data["points"]} == {"per_call"}
    # The times are real transfers, not the launch of an asynchronous call: 16 MiB takes at
    # least as long as copying it once at 100 GB/s, far beyond memory bandwidth of this
    # machine's cores and of any loopback (load only makes it slower)
    by = {(p["op"], p["nbytes"]): p["time_us"] for p in data["points"]}
    floor_us = (16 << 20) / 100e9 * 1e6
    assert all(by[(op, 16 << 20)] >= floor_us for op in OPS), by
    # the contention probe timed every stage kind; the model carries one factor per kind
    from kfacperf.sim.models.device import STAGE_KINDS

    assert list(data["stage_slowdowns"]["2"]) == list(STAGE_KINDS)
    # and how uneven the ranks were per synchronised step: the slowest of two ranks over
    # their mean, less 1, so in [0, 1] whatever the load
    assert 0.0 <= data["stragglers"]["2"] <= 1.0 and model.host.straggler == pytest.approx(
        data["stragglers"]["2"], rel=1e-3, abs=1e-6)
    assert all(math.isfinite(v) and v > 0 for v in data["stage_slowdowns"]["2"].values())
    assert set(model.host.contention_by_stage) == set(STAGE_KINDS)
    assert "per stage kind" in model.source
    # collectives after compute against after a barrier: a ratio of two means of times
    # (how far from 1 depends on the load, so only its being measured is checked here; the
    # fit's arithmetic is checked on synthetic timings)
    ratio = data["comm_slowdowns"]["2"]
    assert math.isfinite(ratio) and ratio > 0
    assert model.host.comm_contention == pytest.approx(max(0.0, ratio - 1.0), rel=1e-3,
                                                       abs=1e-6)


@pytest.mark.slow
def test_real_contention_only_probe_merges_into_the_model(tmp_path: Path) -> None:
    """A probe-only launch measures no collective; --from-raw averages it into the model."""
    import json

    from kfacperf.cli import main

    first = tmp_path / "first.json"
    second = tmp_path / "second.json"
    assert main(["commbench", "--world-sizes", "2", "--sizes", "4KiB,1MiB", "--reps", "2",
                 "--warmup", "1", "--raw", str(first)]) == 0
    assert main(["commbench", "--world-sizes", "2", "--contention-only", "--raw", str(second)]) == 0
    probe = json.loads(second.read_text())
    assert probe["points"] == [] and probe["probes"] == {"2": 1}
    assert math.isfinite(probe["slowdowns"]["2"]) and probe["slowdowns"]["2"] > 0
    out = tmp_path / "merged.toml"
    assert main(["commbench", "--from-raw", str(first), str(second), "--out", str(out)]) == 0
    mean = (json.loads(first.read_text())["slowdowns"]["2"] + probe["slowdowns"]["2"]) / 2
    model = load_cluster_model(out)
    assert model.host.contention == pytest.approx(max(0.0, mean - 1), rel=1e-3, abs=1e-6)
    assert "mean of 2 probes" in model.source


def test_call_costs_run_from_the_last_issue_to_the_last_completion() -> None:
    from kfacperf.bench.probe import call_costs

    # call 1: issued at 0 and 3, done at 5 and 4 -> 5 - 3; call 2: 10/10, done 12/17 -> 7
    assert call_costs([[0.0, 5.0, 10.0, 12.0], [3.0, 4.0, 10.0, 17.0]]) == [2.0, 7.0]
    with pytest.raises(ValueError, match="issue and a completion"):
        call_costs([[0.0, 1.0], [0.0]])


def test_straggler_of_step_times() -> None:
    from kfacperf.bench.probe import straggler_of

    # step 1: 10 and 14 (slowest 2 over the mean 12); step 2: 12 and 12 (0): mean 1 / mean 12
    assert straggler_of([[10.0, 12.0], [14.0, 12.0]]) == pytest.approx(1.0 / 12.0)
    assert straggler_of([[5.0, 6.0], [5.0, 6.0], [5.0, 6.0]]) == 0.0  # lockstep: no wait
    with pytest.raises(ValueError, match="no steps"):
        straggler_of([[], []])
