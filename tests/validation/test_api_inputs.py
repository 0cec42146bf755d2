"""validate() and calibrate() called from Python with one trace directory (a str or a path)
where a list is taken, and with inputs they cannot use named in the error."""
from __future__ import annotations

from pathlib import Path

import pytest

from kfacperf.sim.models.cluster import ClusterModel
from kfacperf.validation import calibrate, expand_trace_paths, resolve_cluster, validate
from kfacperf.validation.model import WorkloadFinder

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "traces" / "reference"
CAL = REF / "p1" / "resnet20-sgd-b32-r1"
HELD = REF / "p2" / "resnet20-sgd-b32-r2"
CLUSTER = REF / "local-cpu.toml"
needs_reference = pytest.mark.skipif(not CAL.is_dir() or not HELD.is_dir(),
                                     reason="no committed reference traces")


@needs_reference
@pytest.mark.parametrize("as_", [str, Path])
def test_validate_takes_one_trace_directory_alone(as_) -> None:
    alone = validate(as_(CAL), as_(HELD), cluster=as_(CLUSTER))
    listed = validate([CAL], [HELD], cluster=str(CLUSTER))
    assert alone.runs.drop(columns="trace").equals(listed.runs.drop(columns="trace"))
    assert len(alone.runs) == 1 and alone.calibration.traces == (str(as_(CAL)),)
    assert alone.calibration.cluster.name == listed.calibration.cluster.name


@needs_reference
def test_calibrate_takes_one_trace_directory_alone() -> None:
    cal = calibrate(str(CAL), cluster=str(CLUSTER))
    assert cal.traces == (str(CAL),)
    assert cal.device.name == "calibrated"
    assert calibrate(CAL, cluster=CLUSTER).fit.fits == calibrate([CAL], cluster=CLUSTER).fit.fits


@needs_reference
def test_a_folder_alone_stands_for_its_traces() -> None:
    got = expand_trace_paths(str(REF / "p1"))
    assert len(got) > 1 and all(p.parent == REF / "p1" for p in got)
    assert got == expand_trace_paths([REF / "p1"])


def test_a_workload_search_path_alone_is_one_path() -> None:
    assert WorkloadFinder("models/workloads/mine.toml").search == ["models/workloads/mine.toml"]
    assert WorkloadFinder(Path("a")).search == ["a"]
    assert WorkloadFinder(["a", Path("b")]).search == ["a", "b"]


@pytest.mark.parametrize(("args", "match"), [
    ((42, [HELD]), "calibration traces: expected a trace directory, a folder of them or a "
                   "loaded trace or a list of them, got 42"),
    (([CAL], None), "held-out traces: expected a trace directory"),
])
def test_what_is_no_trace_is_named(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        validate(*args)
    if args[0] == 42:
        with pytest.raises(ValueError, match=match):
            calibrate(args[0])


def test_resolve_cluster_takes_models_names_and_paths_only(tmp_path: Path) -> None:
    model = resolve_cluster("abci-v100")
    assert isinstance(model, ClusterModel) and resolve_cluster(model) is model
    from kfacperf.sim.models.presets import models_dir

    path = models_dir() / "clusters" / "abci-v100.toml"
    assert resolve_cluster(path).name == model.name
    with pytest.raises(TypeError, match="cluster: expected a ClusterModel, a CommbenchResult, "
                                        "a preset name or the path of a cluster TOML, got int"):
        resolve_cluster(42)  # type: ignore[arg-type]
