"""Model TOMLs: round trips, presets, aliases, and strict loading errors that name file and key."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from kfacperf.sim.models import (
    list_presets,
    load_cluster,
    load_device,
    load_workload,
    presets,
)
from kfacperf.sim.models.cluster import (
    OPS,
    ClusterModel,
    Tier,
    load_cluster_model,
    save_cluster_model,
)
from kfacperf.sim.models.device import (
    STAGE_KINDS,
    DeviceModel,
    MeasuredTime,
    StageEfficiency,
    load_device_model,
    save_device_model,
)
from kfacperf.sim.models.host import HostModel
from kfacperf.sim.models.toml_io import dumps_toml
from kfacperf.sim.models.workload import LayerModel, WorkloadModel
from kfacperf.sim.models.workload_file import (
    load_workload_model,
    save_workload_model,
    workload_model_from_description,
)


def make_workload() -> WorkloadModel:
    return WorkloadModel(
        name="tiny",
        layers=(
            LayerModel(name="conv1", kind="conv2d", dim_a=28, dim_g=16, params=448,
                       rows_per_example=1024, fwd_flops_per_example=917504.0,
                       in_elems_per_example=3072, out_elems_per_example=16384),
            LayerModel(name="fc", kind="linear", dim_a=17, dim_g=10, params=170,
                       rows_per_example=1, fwd_flops_per_example=320.0,
                       in_elems_per_example=16, out_elems_per_example=10),
        ),
        other_params=32, other_fwd_flops_per_example=0.0, input_shape=(3, 32, 32),
        input_dtype="float32", source="test", description='quotes " and \\ and\nnewline',
    )


def make_device(**kw) -> DeviceModel:
    stages = {k: StageEfficiency(efficiency=0.5, mem_efficiency=0.25, overhead_us=3.0,
                                 assumed=False)
              for k in STAGE_KINDS}
    args = dict(name="dev", fp32_tflops=10.0, tf32_tflops=0.0, bf16_tflops=40.0,
                mem_bandwidth_GBps=500.0, stages=stages)
    args.update(kw)
    return DeviceModel(**args)


def make_cluster() -> ClusterModel:
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    return ClusterModel(
        name="c", gpus_per_node=4,
        intra=Tier(alpha_us=1.0, bandwidth_GBps=100.0, algorithms=algos,
                   overrides={"all_reduce": (2.5, 80.0)}, assumed=False),
        inter=Tier(alpha_us=5.0, bandwidth_GBps=10.0, algorithms=algos),
        multi_node={op: "hierarchical" for op in OPS}, v_collectives="pipelined",
        host=HostModel(cores_per_node=2, contention=0.1),
    )


def test_round_trips(tmp_path: Path) -> None:
    w = make_workload()
    assert load_workload_model(save_workload_model(w, tmp_path / "w.toml")) == w
    d = make_device(measured=(MeasuredTime(workload="tiny", stage="inverse", layer="fc", batch=8,
                                           inverse_method="eigen", time_us=12.5),))
    assert load_device_model(save_device_model(d, tmp_path / "d.toml")) == d
    d = make_device(measured=(MeasuredTime(workload="model.py:build", fingerprint="f" * 64,
                                           stage="inverse", layer="fc", batch=8,
                                           inverse_method="eigen", time_us=12.5),))
    back = load_device_model(save_device_model(d, tmp_path / "dfp.toml"))
    assert back == d and back.measured[0].fingerprint == "f" * 64
    d = make_device(capture_overhead={"backward": 0.2})
    back = load_device_model(save_device_model(d, tmp_path / "d2.toml"))
    assert (back == d and back.capture_scale("backward") == 1.2
            and back.capture_scale("forward") == 1.0)
    d = make_device(layer_host_us={"load_grad": 20.5, "write_grad": 35.0})
    back = load_device_model(save_device_model(d, tmp_path / "d3.toml"))
    assert back == d and back.host_us("write_grad") == 35.0
    assert make_device().host_us("load_grad") == 0.0  # absent: no host work
    c = make_cluster()
    assert load_cluster_model(save_cluster_model(c, tmp_path / "c.toml")) == c


@pytest.mark.parametrize(
    ("table", "value", "pattern"),
    [
        ("capture_overhead", {"update": 0.1}, r"capture_overhead has 'update'; known: forward"),
        ("capture_overhead", {"forward": -0.1}, r"capture_overhead\.forward must be a finite"),
        ("layer_host_us", {"zero_grad": 1.0}, r"layer_host_us has 'zero_grad'; known: load_grad"),
        ("layer_host_us", {"write_grad": float("inf")}, r"layer_host_us\.write_grad must be"),
    ],
)
def test_device_optional_tables_are_checked_when_built(table: str, value: dict,
                                                       pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make_device(**{table: value})


def test_presets_load_and_aliases_resolve() -> None:
    for name in ("v100-sxm2", "a100-sxm4", "h100-sxm5", "h200"):
        d = load_device(name)
        fitted = [k for k, s in d.stages.items() if not s.assumed]
        # a fitted term names what it was fitted to; the others are marked assumed
        assert not fitted or "fitted to published cases" in d.source, name
    assert not any(s.assumed for s in (load_device("v100").stages["forward"],
                                       load_device("v100").inverse_methods["cholesky"]))
    assert all(s.assumed for s in load_device("h100").stages.values())
    assert load_device("h100").name == "h100-sxm5"
    assert load_device("v100").fp32_tflops == pytest.approx(15.7)
    for name in ("abci-v100", "dgx-a100-hdr", "dgx-h100-ndr"):
        assert load_cluster(name).name == name
    assert load_cluster("abci").gpus_per_node == 4
    from kfacperf.plan.convergence import load_convergence

    loaders = {"workloads": load_workload, "devices": load_device, "clusters": load_cluster,
               "convergence": load_convergence}
    for kind in presets.KINDS:
        for name in list_presets(kind):
            loaders[kind](name)


def test_preset_measured_times_keep_applying_to_registry_workloads(tmp_path: Path) -> None:
    """local-cpu's [[measured]] entries (no fingerprint: registry workloads) are written back
    byte for byte and price resnet20, the registry model, and no same-named other model."""
    from dataclasses import replace

    from kfacperf.calibrate.device import null_cluster
    from kfacperf.sim.costs.model import CostModel
    from kfacperf.sim.models.presets import models_dir

    preset = models_dir() / "devices" / "local-cpu.toml"
    d = load_device_model(preset)
    assert d.measured and {m.fingerprint for m in d.measured} == {""}
    out = save_device_model(d, tmp_path / "same.toml")
    assert out.read_bytes() == preset.read_bytes()
    entry = next(m for m in d.measured if m.workload == "resnet20" and m.stage == "inverse")
    w = load_workload("resnet20")
    layer = w.layer(entry.layer)
    on = CostModel(workload=w, device=d, cluster=null_cluster(),
                   inverse_method=entry.inverse_method)
    # one entry per calibration trace: entries of the same key are averaged
    same = [m.time_us for m in d.measured if (m.workload, m.stage, m.layer, m.batch,
            m.inverse_method) == (entry.workload, entry.stage, entry.layer, entry.batch,
                                  entry.inverse_method)]
    assert on.compute_us("inverse", layer, batch=entry.batch) == pytest.approx(
        sum(same) / len(same))
    mine = replace(w, fingerprint="c" * 64)  # a user's network that calls itself resnet20
    off = CostModel(workload=mine, device=d, cluster=null_cluster(),
                    inverse_method=entry.inverse_method)
    analytic = CostModel(workload=w, device=d, cluster=null_cluster(), use_measured=False,
                         inverse_method=entry.inverse_method)
    assert off.compute_us("inverse", layer, batch=entry.batch) == pytest.approx(
        analytic.compute_us("inverse", layer, batch=entry.batch))


def test_unknown_preset_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown device preset 'h300'.*h100-sxm5"):
        load_device("h300")
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_cluster(str(tmp_path / "nope.toml"))
    path = save_device_model(make_device(), tmp_path / "mine.toml")
    assert load_device(str(path)).name == "dev"


def _edit(tmp_path: Path, text: str, old: str, new: str) -> Path:
    assert old in text, old
    p = tmp_path / "edited.toml"
    p.write_text(text.replace(old, new, 1))
    return p


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("bandwidth_GBps = 10.0", "bandwidth_GBps = -10.0",
         r"key 'inter\.bandwidth_GBps': must be > 0"),
        ("bandwidth_GBps = 10.0", "bandwidth_GBps = 0",
         r"key 'inter\.bandwidth_GBps': must be > 0"),
        ("alpha_us = 5.0", "alpha_ms = 0.005",
         r"key 'inter\.alpha_ms': wrong unit 'ms'.*'alpha_us'"),
        ("bandwidth_GBps = 10.0", "bandwidth_Gbps = 80.0",
         r"inter\.bandwidth_Gbps': wrong unit 'Gbps'"),
        ("gpus_per_node = 4", 'gpus_per_node = "4"',
         r"key 'gpus_per_node': expected an integer, got a string"),
        ("gpus_per_node = 4", "gpus_per_node = 4\nspeed = 3", r"key 'speed': unknown key"),
        ("gpus_per_node = 4\n", "", r"missing key 'gpus_per_node'"),
        ('algorithm = "tree"', 'algorithm = "fast"',
         r"key 'intra\.broadcast\.algorithm': 'fast' is not one of"),
        ("alpha_us = 2.5\n", "", r"missing key 'intra\.all_reduce\.alpha_us'"),
        ("contention = 0.1", "contention = true",
         r"key 'host\.contention': expected a number, got a bool"),
    ],
)
def test_cluster_strict_errors(tmp_path: Path, old: str, new: str, pattern: str) -> None:
    text = save_cluster_model(make_cluster(), tmp_path / "c.toml").read_text()
    path = _edit(tmp_path, text, old, new)
    with pytest.raises(ValueError, match=pattern) as info:
        load_cluster_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("efficiency = 0.5", "efficiency = 1.5", r"stages\.forward\.efficiency': must be <= 1"),
        ("efficiency = 0.5", "efficiency = 0", r"stages\.forward\.efficiency': must be > 0"),
        ("mem_bandwidth_GBps = 500.0", "mem_bandwidth_GBps = -1",
         r"peak\.mem_bandwidth_GBps': must be > 0"),
        ("fp32_tflops = 10.0", "fp32_gflops = 10000.0", r"peak\.fp32_gflops': wrong unit 'gflops'"),
        ("assumed = false", "assumed = 1", r"stages\.forward\.assumed': expected true or false"),
        ("[stages.update]", "[stages.optimizer]\nefficiency = 1\n[stages.update]",
         r"'stages\.optimizer': unknown key"),
        ('format = "kfacperf-device-1"', 'format = "other"', r"key 'format': expected"),
        ('mode = "roofline"', 'mode = "fast"', r"key 'mode': 'fast' is not one of"),
        ("mem_efficiency = 0.25", "mem_efficiency = 2.0",
         r"stages\.forward\.mem_efficiency': must be <= 1"),
        ("forward = 0.1", "forward = -0.1", r"capture_overhead\.forward': must be >= 0"),
        ("forward = 0.1", "update = 0.1", r"capture_overhead\.update': unknown key"),
        ("load_grad = 20.0", "load_grad = -1.0", r"layer_host_us\.load_grad': must be >= 0"),
        ("load_grad = 20.0", "zero_grad = 1.0", r"layer_host_us\.zero_grad': unknown key"),
    ],
)
def test_device_strict_errors(tmp_path: Path, old: str, new: str, pattern: str) -> None:
    text = save_device_model(make_device(capture_overhead={"forward": 0.1},
                                         layer_host_us={"load_grad": 20.0}),
                             tmp_path / "d.toml").read_text()
    path = _edit(tmp_path, text, old, new)
    with pytest.raises(ValueError, match=pattern) as info:
        load_device_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ('kind = "linear"', 'kind = "lstm"', r"layers\[1\]\.kind': 'lstm' is not one of"),
        ("dim_a = 17", "dim_a = 0", r"layers\[1\]\.dim_a': must be >= 1"),
        ('name = "fc"', 'name = "conv1"', r"layers\[1\]\.name': duplicate layer name"),
        ("rows_per_example = 1\n", "", r"missing key 'layers\[1\]\.rows_per_example'"),
        ("shape = [3, 32, 32]", "shape = [3, -1]", r"input\.shape': every entry must be >= 1"),
    ],
)
def test_workload_strict_errors(tmp_path: Path, old: str, new: str, pattern: str) -> None:
    text = save_workload_model(make_workload(), tmp_path / "w.toml").read_text()
    path = _edit(tmp_path, text, old, new)
    with pytest.raises(ValueError, match=pattern) as info:
        load_workload_model(path)
    assert str(path) in str(info.value)


def with_batchnorm() -> WorkloadModel:
    """make_workload with a BatchNorm after conv1 (its 32 parameters are the other ones)."""
    bn = LayerModel(name="bn1", kind="batchnorm", dim_a=2, dim_g=16, params=32,
                    rows_per_example=1024, fwd_flops_per_example=0.0,
                    in_elems_per_example=16384, out_elems_per_example=16384, follows="conv1")
    return replace(make_workload(), batchnorm=(bn,))


def test_batchnorm_layers_round_trip_in_forward_order(tmp_path: Path) -> None:
    w = with_batchnorm()
    path = save_workload_model(w, tmp_path / "w.toml")
    text = path.read_text()
    assert 'format = "kfacperf-workload-2"' in text
    assert text.index('name = "conv1"') < text.index('name = "bn1"') < text.index('name = "fc"')
    assert load_workload_model(path) == w
    assert [l.name for l in w.fisher_layers("unit")] == ["conv1", "bn1", "fc"]
    assert w.fisher_layers("none") == w.layers and w.layer_names == ("conv1", "fc")
    assert (w.other_params_with("none"), w.other_params_with("full")) == (32, 0)
    assert w.total_params == make_workload().total_params and w.layer("bn1").channels == 16


def test_format_1_files_are_read_and_ask_for_regeneration_for_bn_blocks(tmp_path: Path) -> None:
    text = save_workload_model(make_workload(), tmp_path / "w.toml").read_text()
    old = _edit(tmp_path, text, "kfacperf-workload-2", "kfacperf-workload-1")
    w = load_workload_model(old)
    assert w == make_workload() and w.fisher_layers("none") == w.layers
    with pytest.raises(ValueError, match="no batchnorm layers.*regenerate it with kfacperf "
                                         "calibrate --workload tiny"):
        w.fisher_layers("unit")


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("channels = 16\nparams = 32", "channels = 16\nparams = 30",
         r"layers\[1\]\.params': a batchnorm layer has 2 x channels = 32"),
        ("channels = 16", "dim_g = 16", r"missing key 'layers\[1\]\.channels'"),
        ("other_params = 32", "other_params = 8", r"other_params': must include the batchnorm"),
        ("kfacperf-workload-2", "kfacperf-workload-1", r"layers\[1\]\.kind': 'batchnorm' is "
                                                      "not one of"),
    ],
)
def test_batchnorm_strict_errors(tmp_path: Path, old: str, new: str, pattern: str) -> None:
    text = save_workload_model(with_batchnorm(), tmp_path / "w.toml").read_text()
    with pytest.raises(ValueError, match=pattern):
        load_workload_model(_edit(tmp_path, text, old, new))


def test_unparsable_toml_names_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("name = \n")
    with pytest.raises(ValueError, match=r"bad\.toml: not valid TOML"):
        load_cluster_model(p)


def test_writer_output_parses_back_to_the_same_data() -> None:
    data = {"a": 1, "b": -2.5e-300, "s": "x\ty\u0001", "flag": False, "xs": [1, 2],
            "t": {"k": "v", "u": {"z": 0.1}}, "arr": [{"q": 1}, {"q": 2, "sub": {"r": "s"}}],
            "weird key": 3}
    assert read_toml_text(dumps_toml(data, header=["hello"])) == data
    with pytest.raises(ValueError, match="non-finite"):
        dumps_toml({"x": float("nan")})


def read_toml_text(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def test_workload_from_description_and_properties() -> None:
    w = make_workload()
    desc = {
        "name": "tiny", "other_params": 32, "input_shape": [3, 32, 32],
        "input_dtype": "torch.float32",
        "layers": [
            {f: getattr(l, f) for f in ("name", "kind", "dim_a", "dim_g", "params",
                                        "rows_per_example", "fwd_flops_per_example",
                                        "in_elems_per_example", "out_elems_per_example")}
            for l in w.layers
        ],
    }
    got = workload_model_from_description(desc)
    assert got.layers == w.layers and got.input_dtype == "float32"
    assert got.total_params == 448 + 170 + 32 and got.layer("fc").dim_g == 10
    del desc["layers"][0]["dim_a"]
    with pytest.raises(ValueError, match=r"layer 0 \('conv1'\) lacks dim_a"):
        workload_model_from_description(desc)
    with pytest.raises(ValueError, match="no K-FAC layer 'nope'"):
        w.layer("nope")


def test_sim_models_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import kfacperf.sim.models, kfacperf.sim.costs.model, kfacperf.sim.costs.collectives, "
        "kfacperf.calibrate.device, kfacperf.calibrate.alpha_beta, kfacperf.calibrate.host_gaps, "
        "kfacperf.sim.models.presets, kfacperf.workloads.reference\n"
        "bad = [m for m in ('torch', 'pandas') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_workload_for_run_matches_registry_name_and_options(tmp_path: Path) -> None:
    from kfacperf.sim.models import workload_for_run

    assert workload_for_run("resnet50", {}).name == "resnet50"
    assert workload_for_run("resnet50", {"image_size": 224}).name == "resnet50"
    with pytest.raises(ValueError, match=r"no workload model for 'resnet50'.*kfacperf calibrate "
                                         r"--workload resnet50 --workload-option image_size=64"):
        workload_for_run("resnet50", {"image_size": 64})
    # a name no built-in has (a kfacperf.instrument trace's model class): the trace's own
    # workload.toml is named first, not only a command that works for built-ins alone
    with pytest.raises(ValueError, match=r"no workload model for 'Sequential'.*TRACE/workload"
                                         r"\.toml: pass it with --workload-model\); for a "
                                         r"built-in workload"):
        workload_for_run("Sequential", {})
    small = WorkloadModel(
        name="tiny[width=2]", layers=make_workload().layers, other_params=0,
        other_fwd_flops_per_example=0.0, input_shape=(3,), input_dtype="float32", source="t",
        workload="tiny", options={"width": 2, "depth": 3}, custom_options=("width",))
    default = WorkloadModel(
        name="tiny", layers=make_workload().layers, other_params=0, other_fwd_flops_per_example=0.0,
        input_shape=(3,), input_dtype="float32", source="t", workload="tiny",
        options={"width": 1, "depth": 3})
    save_workload_model(small, tmp_path / "a.toml")
    save_workload_model(default, tmp_path / "b.toml")
    # a run with default options never picks the model built with width=2, whatever the order
    assert workload_for_run("tiny", {}, search=[tmp_path]).name == "tiny"
    assert workload_for_run("tiny", {"depth": 3}, search=[tmp_path]).name == "tiny"
    assert workload_for_run("tiny", {"width": 2}, search=[tmp_path]).name == "tiny[width=2]"
    assert not small.matches_run("tiny", {"width": True})  # a bool is not the integer 1 or 2




@pytest.mark.parametrize(("old", "new", "pattern"), [
    ("in_channels = 3\n", "in_channels = 5\n",
     r"'conv1': dim_a 147 is not in_channels x kernel = 5 x 7 x 7 = 245"),
    ("output = [112, 112]", "output = [56, 56]",
     r"'conv1': rows_per_example 12,544 is not the output's 56 x 56 positions"),
])
def test_a_conv_geometry_that_contradicts_the_layers_dims_is_refused(
        tmp_path: Path, old: str, new: str, pattern: str) -> None:
    """conv1 of ResNet-50 with in_channels 5 (dim_a still 147 = 3 x 7 x 7) loaded and changed
    the prediction: the A factor's cost reads the geometry, the rest the dims."""
    from kfacperf.sim.models import models_dir

    text = (models_dir() / "workloads" / "resnet50.toml").read_text()
    assert text.count(old) >= 1
    path = tmp_path / "w.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match=pattern) as info:
        load_workload_model(path)
    assert str(path) in str(info.value)
