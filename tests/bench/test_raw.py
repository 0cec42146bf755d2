"""commbench raw files: read back exactly, merged as a weighted mean of probes, bad ones named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.synthetic_commbench import synthetic_result
from kfacperf.bench import raw, results
from kfacperf.calibrate import cluster as cbf
from kfacperf.sim.models.cluster import load_cluster_model


def probe(slowdown: float, forward: float, *, probes: int = 1) -> results.CommbenchResult:
    return results.CommbenchResult(backend="gloo", points=(), cores=2, slowdowns={2: slowdown},
                              stage_slowdowns={2: {"forward": forward, "update": 2.0}},
                              probes={2: probes})


def test_round_trip_through_json() -> None:
    res = synthetic_result()
    res = results.CommbenchResult(backend=res.backend, points=res.points, cores=2,
                             slowdowns={2: 1.2}, stage_slowdowns={2: {"forward": 1.1}},
                             probes={2: 3})
    back = raw.result_from_dict(json.loads(json.dumps(res.to_dict())))
    assert back == res


def test_merge_weights_every_probe_and_every_repetition() -> None:
    full = synthetic_result()
    full = results.CommbenchResult(backend="gloo", points=full.points, cores=2, slowdowns={2: 1.1},
                              stage_slowdowns={2: {"forward": 1.0, "update": 2.0}}, probes={2: 1})
    slower = results.CommbenchResult(backend="gloo", cores=2, points=tuple(
        results.Point(op=p.op, world_size=p.world_size, nbytes=p.nbytes, time_us=p.time_us * 3,
                 reps=3 * p.reps) for p in full.points))
    merged = raw.merge_results([full, probe(1.4, 1.3, probes=3), slower,
                                probe(1.2, 1.1)])
    # 1 + 3 + 1 probes: (1.1 + 3 * 1.4 + 1.2) / 5
    assert merged.slowdowns[2] == pytest.approx((1.1 + 4.2 + 1.2) / 5)
    assert merged.stage_slowdowns[2]["forward"] == pytest.approx((1.0 + 3 * 1.3 + 1.1) / 5)
    assert merged.stage_slowdowns[2]["update"] == pytest.approx(2.0)
    assert merged.probes == {2: 5}
    # the mean over every repetition: (r * t + 3r * 3t) / 4r = 2.5 t (a median of the two
    # files would say 2 t)
    by = {(p.op, p.world_size, p.nbytes): p for p in merged.points}
    for p in full.points:
        assert by[(p.op, p.world_size, p.nbytes)].time_us == pytest.approx(2.5 * p.time_us)
        assert by[(p.op, p.world_size, p.nbytes)].reps == 4 * p.reps
    model, _ = cbf.fit_cluster(merged, name="m")
    # on 2 cores and 2 ranks: slowdown = 1 + c, so c is the mean slowdown - 1
    assert model.host.contention == pytest.approx(merged.slowdowns[2] - 1, rel=1e-3)
    assert "mean of 5 probes" in model.source


def test_merge_refuses_mixed_backends_and_nothing() -> None:
    with pytest.raises(ValueError, match="different backends"):
        raw.merge_results([probe(1.1, 1.0), results.CommbenchResult(backend="nccl", points=())])
    with pytest.raises(ValueError, match="nothing to merge"):
        raw.merge_results([])


def test_merge_refuses_collectives_timed_two_ways() -> None:
    """A call timed alone includes the stalls and completion skew that back-to-back calls
    hide: averaging the two would be neither."""
    batched = synthetic_result()
    alone = results.CommbenchResult(backend="gloo", points=tuple(
        results.Point(op=p.op, world_size=p.world_size, nbytes=p.nbytes, time_us=p.time_us,
                 reps=p.reps, timing="per_call") for p in batched.points))
    with pytest.raises(ValueError, match="timed as batched and per_call"):
        raw.merge_results([batched, alone])
    assert {p.timing for p in raw.merge_results([alone, alone]).points} == {"per_call"}


def test_timing_is_read_back_and_defaults_to_batched_for_older_files() -> None:
    point = {"op": "all_reduce", "world_size": 2, "nbytes": 4, "time_us": 3.0, "reps": 1}
    old = raw.result_from_dict({"backend": "gloo", "points": [point]})
    assert old.points[0].timing == "batched"
    new = raw.result_from_dict({"backend": "gloo", "points": [dict(point, timing="per_call")]})
    assert new.points[0].timing == "per_call"


@pytest.mark.parametrize(("content", "message"), [
    ("{", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"backend": "gloo", "speed": 1}', "key 'speed': unknown key"),
    ('{"backend": "mpi"}', "key 'backend': 'mpi' is not one of 'gloo', 'nccl'"),
    ('{"backend": "gloo", "slowdowns": {"2": -1.0}}', "key 'slowdowns.2': must be > 0, got -1"),
    ('{"backend": "gloo", "slowdowns": {"one": 1.2}}',
     "key 'slowdowns.one': a world size must be an integer"),
    ('{"backend": "gloo", "probes": {"1": 3}}', "key 'probes.1': a world size must be >= 2"),
    ('{"backend": "gloo", "stage_slowdowns": {"2": {"warp": 1.0}}}',
     "key 'stage_slowdowns.2.warp': unknown stage kind"),
    ('{"backend": "gloo", "points": [{"op": "all_reduce"}]}', "missing key 'points[0].world_size'"),
    ('{"backend": "gloo", "points": [{"op": "all_reduce", "world_size": 2, "nbytes": 4, '
     '"time_us": -3, "reps": 1}]}', "key 'points[0].time_us': must be > 0"),
    ('{"backend": "gloo", "points": [{"op": "all_reduce", "world_size": 2, "nbytes": 4, '
     '"time_us": 3, "reps": 1, "note": "x"}]}', "key 'points[0].note': unknown key"),
    ('{"backend": "gloo", "stragglers": {"2": -0.1}}', "key 'stragglers.2': must be >= 0"),
    ('{"backend": "gloo", "comm_slowdowns": {"2": 0}}', "key 'comm_slowdowns.2': must be > 0"),
    ('{"backend": "gloo", "points": [{"op": "all_reduce", "world_size": 2, "nbytes": 4, '
     '"time_us": 3, "reps": 1, "timing": "lazy"}]}',
     "key 'points[0].timing': 'lazy' is not one of"),
])
def test_bad_raw_file_is_named(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "probe.json"
    f.write_text(content)
    with pytest.raises(ValueError) as err:
        raw.load_raw(f)
    assert str(f) in str(err.value) and message in str(err.value)
    with pytest.raises(ValueError, match="missing.json does not exist"):
        raw.load_raw(tmp_path / "missing.json")


def test_command_fits_a_model_from_raw_files(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from kfacperf.cli import main

    full = synthetic_result()
    full = results.CommbenchResult(backend="gloo", points=full.points, cores=2, slowdowns={2: 1.1},
                              probes={2: 1})
    files = []
    for i, res in enumerate([full, probe(1.3, 1.2), probe(1.5, 1.4)]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(res.to_dict()))
    out = tmp_path / "merged.toml"
    assert main(["commbench", "--from-raw", *map(str, files), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 ranks 1.30x (mean of 3 probes)" in text
    model = load_cluster_model(out)
    assert model.host.contention == pytest.approx(0.3, rel=1e-3)
    # the forward kind was probed twice (the full run had no per-kind table)
    assert model.host.contention_by_stage["forward"] == pytest.approx(0.3, rel=1e-3)
    # a bad file among them: exit 2, the file named, no model written
    (tmp_path / "bad.json").write_text('{"backend": "gloo", "slowdowns": {"2": 0}}')
    out2 = tmp_path / "none.toml"
    assert main(["commbench", "--from-raw", str(files[0]), str(tmp_path / "bad.json"),
                 "--out", str(out2)]) == 2
    assert "bad.json" in capsys.readouterr().err and not out2.exists()


@pytest.mark.parametrize("args", [["--contention-only", "--out", "x.toml"],
                                  ["--contention-only", "--no-contention"],
                                  ["--contention-only", "--from-raw", "a.json"]])
def test_contention_only_refuses_what_it_cannot_do(args: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from kfacperf.cli import main

    assert main(["commbench", *args]) == 2
    assert "--contention-only" in capsys.readouterr().err


def test_comm_slowdown_is_merged_over_the_probes_that_measured_it_and_fitted() -> None:
    old = probe(1.2, 1.1, probes=3)  # written before collectives were probed after compute
    new = [results.CommbenchResult(backend="gloo", points=(), cores=2, slowdowns={2: 1.1},
                              probes={2: n}, comm_slowdowns={2: s})
           for n, s in ((1, 1.1), (3, 1.3))]
    merged = raw.merge_results([old, *new])
    assert merged.comm_slowdowns == {2: pytest.approx((1.1 + 3 * 1.3) / 4)}
    assert merged.probes == {2: 7}
    back = raw.result_from_dict(json.loads(json.dumps(merged.to_dict())))
    assert back.comm_slowdowns == merged.comm_slowdowns
    assert raw.result_from_dict(json.loads(json.dumps(old.to_dict()))).comm_slowdowns == {}
    full = synthetic_result()
    model, _ = cbf.fit_cluster(results.CommbenchResult(
        backend="gloo", points=full.points, cores=2, slowdowns={2: 1.1},
        comm_slowdowns={2: 1.25}), name="s")
    assert model.host.comm_contention == pytest.approx(0.25)
    assert "after a barrier: 2: 1.25" in model.source
    # faster after compute is noise, not a speed-up: clipped at 0; nothing probed: 0
    assert cbf.fit_comm_contention({2: 0.9}) == 0.0 and cbf.fit_comm_contention({}) == 0.0
    model, _ = cbf.fit_cluster(full, name="s")
    assert model.host.comm_contention == 0.0


def test_straggler_is_merged_over_the_probes_that_measured_it_and_fitted() -> None:
    from kfacperf.sim.models.host import expected_max_normal

    old = probe(1.2, 1.1, probes=3)  # written before stragglers were probed
    new = [results.CommbenchResult(backend="gloo", points=(), cores=2, slowdowns={2: 1.1},
                              probes={2: 1}, stragglers={2: s}) for s in (0.02, 0.04)]
    merged = raw.merge_results([old, *new])
    assert merged.stragglers == {2: pytest.approx(0.03)} and merged.probes == {2: 5}
    full = synthetic_result()
    model, _ = cbf.fit_cluster(results.CommbenchResult(
        backend="gloo", points=full.points, cores=2, slowdowns={2: 1.1},
        stragglers={2: 0.03, 4: 0.03 * expected_max_normal(4) / expected_max_normal(2)}),
        name="s")
    # both world sizes say the same two-rank straggler once scaled by E[max]
    assert model.host.straggler == pytest.approx(0.03, rel=1e-4)
    assert "straggler: 2: 0.030" in model.source
    assert cbf.fit_straggler({}) == 0.0
    back = raw.result_from_dict(json.loads(json.dumps(merged.to_dict())))
    assert back.stragglers == merged.stragglers


def test_a_raw_file_given_twice_counts_once_and_a_copy_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Merged twice, one probe would weigh double in the session's mean."""
    from kfacperf.cli import main

    files = [tmp_path / "a.json", tmp_path / "b.json"]
    files[0].write_text(json.dumps(probe(1.2, 1.1).to_dict()))
    files[1].write_text(json.dumps(probe(1.6, 1.5).to_dict()))
    a = str(files[0])
    assert main(["commbench", "--from-raw", a, a, str(files[1])]) == 0
    assert "2 ranks 1.40x (mean of 2 probes)" in capsys.readouterr().out
    copy = tmp_path / "copy.json"
    copy.write_text(files[0].read_text())
    assert main(["commbench", "--from-raw", a, str(copy)]) == 2
    assert "hold the same measurement" in capsys.readouterr().err
