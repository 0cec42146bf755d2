"""kfacperf.bench.kernels: timing logic on a fake clock, results against float64 numpy."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from kfacperf.bench import kernels as K
from kfacperf.bench.kernels.timing import HOLD_CYCLES
from kfacperf.kfac.layers import KFACLayer

CPU = torch.device("cpu")
TINY = K.KernelPlan(inverse_sizes=(8, 16), gemm_sizes=(16,), factor_layers=("conv1", "fc"),
                    factor_batches=(2,), image_size=32, repeats=2, min_repeats=1,
                    target_s=1.0, max_call_s=5.0)


class FakeTimer:
    """A call timer whose clock says what the test wants: ``durations_us`` in turn (the last
    one repeated); it runs each call and counts them."""

    def __init__(self, *durations_us: float) -> None:
        self.durations = list(durations_us)
        self.calls = 0

    def __call__(self, fn) -> float:
        fn()
        self.calls += 1
        return self.durations[min(self.calls, len(self.durations)) - 1]


# --------------------------------------------------------------------------- timing logic


def test_measure_leaves_the_warm_up_out_and_takes_the_median():
    timer = FakeTimer(900.0, 10.0, 30.0, 20.0)
    t = K.measure(lambda: None, timer=timer, warmup=1, repeats=3, min_repeats=1)
    assert timer.calls == 4
    assert (t.median_us, t.min_us, t.max_us, t.repeats, t.warmup) == (20.0, 10.0, 30.0, 3, 1)


def test_measure_repeats_fewer_long_calls_down_to_the_minimum():
    # warm-up 0.4 s, target 1 s: 2 repeats; a 5 s call still gets min_repeats
    long = FakeTimer(400_000.0)
    assert K.measure(lambda: None, timer=long, warmup=1, repeats=10, min_repeats=1,
                     target_s=1.0).repeats == 2
    longer = FakeTimer(5_000_000.0)
    assert K.measure(lambda: None, timer=longer, warmup=1, repeats=10, min_repeats=3,
                     target_s=1.0).repeats == 3
    short = FakeTimer(10.0)
    assert K.measure(lambda: None, timer=short, warmup=2, repeats=10, min_repeats=3,
                     target_s=1.0).repeats == 10
    with pytest.raises(ValueError):
        K.measure(lambda: None, timer=short, repeats=2, min_repeats=3)


def test_budget_on_a_fake_clock():
    now = [100.0]
    b = K.Budget(30.0, clock=lambda: now[0])
    assert b.left() == 30.0 and b.allows(30.0) and not b.allows(30.5)
    now[0] = 125.0
    assert b.left() == 5.0 and not b.allows(6.0)
    assert K.Budget(None).left() == float("inf")


def test_cpu_timer_reads_its_clock_around_the_call():
    ticks = iter([1_000, 251_000])
    order = []
    timer = K.cpu_call_timer(clock=lambda: order.append("clock") or next(ticks))
    assert timer(lambda: order.append("call")) == 250.0
    assert order == ["clock", "call", "clock"]


def test_cuda_timer_records_around_the_call_and_waits_before_reading(monkeypatch):
    log = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.name = "start" if not any(isinstance(x, FakeEvent) for x in log) else "end"
            log.append(self)

        def record(self) -> None:
            log.append(f"record {self.name}")

        def synchronize(self) -> None:
            log.append(f"sync {self.name}")

        def elapsed_time(self, other: FakeEvent) -> float:
            log.append("elapsed")
            return 1.5  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    # the stream is held busy first, so the start event waits for the host's launch
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(f"hold {cycles}"),
                        raising=False)
    timer = K.cuda_call_timer()
    assert timer(lambda: log.append("call")) == 1500.0
    assert [x for x in log if isinstance(x, str)] == [
        f"hold {HOLD_CYCLES}", "record start", "call", "record end", "sync end", "elapsed"]


def test_a_size_predicted_too_slow_or_past_the_budget_is_skipped():
    skipped: list[K.Skipped] = []
    plan = K.KernelPlan(repeats=2, min_repeats=1, warmup=1, max_call_s=2.0, target_s=1.0)
    # 0.5 s per call at n=8: n=16 is predicted at 4 s > 2 s, and n=32 at 32 s
    got = K.time_eigh((8, 16, 32), dtype="fp32", device=CPU, timer=FakeTimer(500_000.0),
                      plan=plan, skipped=skipped)
    assert [r.n for r in got] == [8]
    assert [s.what for s in skipped] == ["n=16 fp32", "n=32 fp32"]
    assert "4.0 s per call" in skipped[0].reason
    now = [0.0]
    spent = K.Budget(0.0, clock=lambda: now[0])
    skipped.clear()
    plan = K.KernelPlan(repeats=2, min_repeats=1, max_call_s=100.0)
    got = K.time_eigh((8, 16), dtype="fp32", device=CPU, timer=FakeTimer(500_000.0),
                      plan=plan, budget=spent, skipped=skipped)
    assert [r.n for r in got] == [8]  # nothing timed yet: the first size is predicted at 0 s
    assert "time budget" in skipped[0].reason


# --------------------------------------------------------------------------- correctness


def test_random_spd_is_symmetric_well_conditioned_and_never_zero():
    for dtype in (torch.float32, torch.float64):
        a = K.random_spd(64, dtype=dtype, device=CPU)
        m = a.double().numpy()
        assert a.dtype == dtype and np.array_equal(m, m.T)
        w = np.linalg.eigvalsh(m)
        assert w.min() >= 1.0 - 1e-5 and w.max() < 6.0
    assert not torch.equal(K.random_spd(8, dtype=torch.float32, device=CPU, seed=1),
                           K.random_spd(8, dtype=torch.float32, device=CPU, seed=2))


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("fp64", 1e-10)])
def test_the_timed_eigh_is_the_right_decomposition(monkeypatch, dtype, tol):
    seen = []
    real = torch.linalg.eigh

    def spy(a):
        w, q = real(a)
        seen.append((a.clone(), w, q))
        return w, q

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    plan = K.KernelPlan(repeats=2, min_repeats=1, warmup=1)
    got = K.time_eigh((16, 48), dtype=dtype, device=CPU, timer=K.cpu_call_timer(), plan=plan)
    assert [(r.op, r.n, r.dtype) for r in got] == [("eigh", 16, dtype), ("eigh", 48, dtype)]
    assert {a.shape[0] for a, _, _ in seen} == {16, 48}
    for a, w, q in seen:
        assert a.dtype == K.torch_dtype(dtype)
        ref = np.linalg.eigvalsh(a.double().numpy())
        np.testing.assert_allclose(w.double().numpy(), ref, rtol=tol, atol=tol)
        qd = q.double().numpy()
        np.testing.assert_allclose(qd.T @ qd, np.eye(a.shape[0]), atol=10 * tol)
    for r in got:
        assert 0 <= r.residual < tol and r.nominal_flops == 9.0 * r.n**3
        assert r.timing.repeats == 2 and r.timing.median_us > 0


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("fp64", 1e-10)])
def test_the_timed_cholesky_inverse_is_the_inverse(monkeypatch, dtype, tol):
    seen = []
    real = torch.cholesky_inverse

    def spy(chol, *args, **kw):
        inv = real(chol, *args, **kw)
        seen.append((chol.clone(), inv))
        return inv

    monkeypatch.setattr(torch, "cholesky_inverse", spy)
    plan = K.KernelPlan(repeats=2, min_repeats=1, warmup=1)
    got = K.time_cholesky((24,), dtype=dtype, device=CPU, timer=K.cpu_call_timer(), plan=plan,
                          damping=0.5)
    assert [r.op for r in got] == ["spd_inverse", "cholesky_ex", "cholesky_inverse"]
    damped = K.random_spd(24, dtype=K.torch_dtype(dtype), device=CPU).double().numpy()
    damped += 0.5 * np.eye(24)
    want = np.linalg.inv(damped)
    assert len(seen) == 2 * (1 + 2)  # every call (warm-up + 2) of both ops that invert
    for _chol, inv in seen:
        assert inv.dtype == K.torch_dtype(dtype)
        np.testing.assert_allclose(inv.double().numpy(), want, rtol=20 * tol, atol=tol)
    for r in got:
        assert 0 <= r.residual < tol
    assert got[0].nominal_flops == 24.0**3


def test_factor_timings_use_the_layers_own_shapes(monkeypatch):
    calls = []
    real = KFACLayer.compute_batch_factors

    def spy(self, x, g):
        calls.append((self.name, tuple(x.shape), tuple(g.shape), x.dtype))
        return real(self, x, g)

    monkeypatch.setattr(KFACLayer, "compute_batch_factors", spy)
    names = ("conv1", "layer2.0.conv2", "layer3.0.downsample.0", "fc")
    shapes = K.network_layer_shapes(names, image_size=64)
    # the shapes each layer really sees in ResNet-50 at batch 3
    from kfacperf.workloads import get_workload

    w = get_workload("resnet50", image_size=64)
    model = w.build_model(seed=0)
    real_shapes = {}
    modules = dict(model.named_modules())
    for n in names:
        modules[n].register_forward_hook(
            lambda m, i, o, n=n: real_shapes.__setitem__(n, (tuple(i[0].shape), tuple(o.shape))))
    with torch.no_grad():
        model(torch.zeros(3, 3, 64, 64))
    plan = K.KernelPlan(repeats=1, min_repeats=1, warmup=1)
    got = K.time_factors(shapes, batches=(3,), precisions=("fp32", "bf16"), device=CPU,
                         timer=K.cpu_call_timer(), plan=plan)
    assert [(r.layer, r.precision) for r in got] == [(n, p) for n in names
                                                      for p in ("fp32", "bf16")]
    for r in got:
        assert (r.input_shape, r.output_shape) == real_shapes[r.layer]
        assert r.activation_dtype == ("bfloat16" if r.precision == "bf16" else "float32")
        module = modules[r.layer]
        assert r.dim_g == module.weight.shape[0]
        assert r.dim_a == module.weight[0].numel() + (module.bias is not None)
        if isinstance(module, nn.Conv2d):
            assert r.kind == "conv2d" and r.rows == 3 * r.output_shape[2] * r.output_shape[3]
            assert r.kernel_size == tuple(module.kernel_size) and r.stride == tuple(module.stride)
        else:
            assert r.kind == "linear" and r.rows == 3
        layer = K.kfac_layer(next(s for s in shapes if s.name == r.layer))
        x, g = torch.zeros(r.input_shape), torch.zeros(r.output_shape)
        assert r.flops == layer.factor_flops(x, g)
    timed = {(n, s, gs, d) for n, s, gs, d in calls}
    assert timed == {(r.layer, r.input_shape, r.output_shape,
                      torch.bfloat16 if r.precision == "bf16" else torch.float32) for r in got}
    with pytest.raises(ValueError, match="no layer"):
        K.network_layer_shapes(("layer9",), image_size=32)


def test_gemm_rate_is_two_n_cubed_over_the_median():
    got = K.time_gemm((32, 64), precisions=("fp32", "bf16"), device=CPU,
                      timer=FakeTimer(1000.0), plan=K.KernelPlan(repeats=2, min_repeats=1))
    assert [(g.precision, g.n) for g in got] == [("fp32", 32), ("fp32", 64), ("bf16", 32),
                                                ("bf16", 64)]
    for g in got:
        assert g.tflops == pytest.approx(2 * g.n**3 / 1e-3 / 1e12)


def test_run_all_writes_every_measurement_as_json(tmp_path):
    lines: list[str] = []
    report = K.run_all(tmp_path, device=CPU, plan=TINY, log=lines.append)
    data = json.loads((tmp_path / K.OUTPUT_FILE).read_text())
    assert data["format"] == K.FORMAT and data["clock"] == "perf_counter"
    assert data["device"]["type"] == "cpu" and data["device"]["torch_version"]
    for dtype in TINY.inverse_dtypes:
        assert sorted(r["n"] for r in data["eigh"] if r["dtype"] == dtype) == [8, 16]
        for op in ("spd_inverse", "cholesky_ex", "cholesky_inverse"):
            assert sorted(r["n"] for r in data["cholesky"]
                          if r["dtype"] == dtype and r["op"] == op) == [8, 16]
    assert {(f["layer"], f["batch"], f["precision"]) for f in data["factors"]} == {
        (n, 2, p) for n in ("conv1", "fc") for p in K.FACTOR_PRECISIONS}
    assert {(g["n"], g["precision"]) for g in data["gemm"]} == {
        (16, p) for p in K.GEMM_PRECISIONS}
    for rec in data["eigh"] + data["cholesky"] + data["factors"] + data["gemm"]:
        t = rec["timing"]
        assert 0 < t["min_us"] <= t["median_us"] <= t["max_us"]
    assert data["skipped"] == [] and report.elapsed_s > 0
    assert any("eigh fp32" in line for line in lines)
    assert K.summary_lines(report)[0].startswith("eigh fp32: 8: ")


def test_a_group_that_fails_is_recorded_and_costs_neither_earlier_nor_later_ones(
        tmp_path, monkeypatch):
    """A GEMM failure after the inverses and factors were timed: kernels.json still holds
    them, and the failure is named in ``skipped``; a failing eigh group does not stop the
    Cholesky timings after it."""
    import kfacperf.bench.kernels.run as run_mod

    def broken(*args, **kwargs):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED\nsecond line")

    monkeypatch.setattr(run_mod, "time_gemm", broken)
    lines: list[str] = []
    report = K.run_all(tmp_path, device=CPU, plan=TINY, log=lines.append)
    data = json.loads((tmp_path / K.OUTPUT_FILE).read_text())
    assert data["gemm"] == [] and report.gemm == []
    assert len(data["eigh"]) == 2 * len(TINY.inverse_dtypes) and data["factors"]
    assert data["skipped"] == [{"measurement": "gemm", "what": "every size", "reason":
                                "failed: RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED"}]
    assert any("gemm: failed: RuntimeError" in line for line in lines)

    monkeypatch.setattr(run_mod, "time_eigh", broken)
    report = K.run_all(tmp_path, device=CPU, plan=TINY, log=lines.append)
    assert report.eigh == [] and report.cholesky and report.factors
    assert [s.measurement for s in report.skipped] == [
        f"eigh {d}" for d in TINY.inverse_dtypes] + ["gemm"]


def test_kernels_json_is_on_disk_after_the_first_group(tmp_path, monkeypatch):
    """The file is written as each group ends: a process stopped during the factor timings
    keeps the inverse timings."""
    import kfacperf.bench.kernels.run as run_mod

    def stopped(*args, **kwargs):
        data = json.loads((tmp_path / K.OUTPUT_FILE).read_text())
        assert len(data["eigh"]) == 2 * len(TINY.inverse_dtypes) and data["cholesky"]
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "time_factors", stopped)
    with pytest.raises(KeyboardInterrupt):
        K.run_all(tmp_path, device=CPU, plan=TINY, log=lambda line: None)
    data = json.loads((tmp_path / K.OUTPUT_FILE).read_text())
    assert data["factors"] == [] and data["gemm"] == [] and data["eigh"]


def test_the_preconditioners_float64_inverses_are_timed_first(tmp_path, monkeypatch):
    """The budget cuts from the end: eigh and Cholesky in float64 (the dtype K-FAC inverts
    in, and what the landing fits the inverse terms to) come before anything in float32."""
    import kfacperf.bench.kernels.run as run_mod

    order: list[tuple[str, str]] = []

    def recorder(op):
        def timed(sizes, *, dtype, **kwargs):
            order.append((op, dtype))
            return []
        return timed

    monkeypatch.setattr(run_mod, "time_eigh", recorder("eigh"))
    monkeypatch.setattr(run_mod, "time_cholesky", recorder("cholesky"))
    plan = replace(TINY, inverse_dtypes=K.FULL_PLAN.inverse_dtypes)
    K.run_all(tmp_path, device=CPU, plan=plan, log=lambda line: None)
    assert order == [("eigh", "fp64"), ("cholesky", "fp64"), ("eigh", "fp32"),
                     ("cholesky", "fp32")]


def test_json_outputs_read_back_with_the_strict_reader(tmp_path):
    """A NaN (a median of nothing, a thread clock that did not tick) is written as null:
    the landing reads these files with the strict reader, which refuses a whole file for
    one NaN."""
    from kfacperf.bench.overhead import Paired
    from kfacperf.safety import load_json_file

    paired = Paired(off_s=(1.0, 1.0), on_s=(1.01, 1.02), off_cpu_s=(0.0, 0.0),
                    on_cpu_s=(0.0, 0.0))
    assert paired.cpu_overhead_median != paired.cpu_overhead_median  # NaN
    data = {"cpu_overhead_median": paired.cpu_overhead_median, "worst": [float("inf")],
            "timing": K.Timing.of([2.0, 1.0, 3.0], warmup=1)}
    path = K.write_json(tmp_path / "out.json", data)
    assert load_json_file(path) == {
        "cpu_overhead_median": None, "worst": [None],
        "timing": {"median_us": 2.0, "min_us": 1.0, "max_us": 3.0, "repeats": 3, "warmup": 1}}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left
