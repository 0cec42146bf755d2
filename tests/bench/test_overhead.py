"""kfacperf.bench.overhead: the pairing on a fake clock, and one tiny real measurement."""
from __future__ import annotations

import math

import pytest

from kfacperf.bench.overhead import (
    OverheadConfig,
    Paired,
    measure_timer_overhead,
    paired_steps,
    replay_cost_us,
)


def test_pairs_alternate_who_goes_first_and_leave_the_warm_up_out():
    now = [0.0]
    log = []

    def arm(name: str, seconds: float):
        def step(i: int) -> None:
            log.append((name, i))
            now[0] += seconds
        return step

    syncs = []
    p = paired_steps(arm("off", 0.010), arm("on", 0.0105), pairs=4, warmup_pairs=2,
                     clock=lambda: now[0], cpu_clock=lambda: now[0] / 2,
                     sync=lambda: syncs.append(now[0]))
    assert log == [("off", 0), ("on", 0), ("on", 1), ("off", 1), ("off", 2), ("on", 2),
                   ("on", 3), ("off", 3), ("off", 4), ("on", 4), ("on", 5), ("off", 5)]
    assert len(syncs) == 2 * len(log)  # before and after every step
    assert len(p.off_s) == len(p.on_s) == 4
    assert p.overhead_median == pytest.approx(0.05)
    assert p.overhead_of_medians == pytest.approx(0.05)
    assert p.cpu_overhead_median == pytest.approx(0.05)
    with pytest.raises(ValueError):
        paired_steps(arm("off", 1), arm("on", 1), pairs=0)


def test_the_overhead_is_the_median_of_the_pair_ratios():
    # one pair hit by a burst of load (3x on the "on" arm) does not move the median
    p = Paired(off_s=(1.0, 1.0, 1.0), on_s=(1.01, 3.0, 1.02), off_cpu_s=(0.0,) * 3,
               on_cpu_s=(0.0,) * 3)
    assert p.overhead_median == pytest.approx(0.02)
    assert math.isnan(p.cpu_overhead_median)  # no CPU clock reading: unknown, not 0


def test_replay_cost_of_a_step_of_stage_calls(tmp_path):
    calls = [("forward", "", 1.0), ("factor_compute", "fc", 2.0), ("backward", "", 0.0)]
    assert replay_cost_us(calls, cuda=False, scratch=tmp_path, repeats=5) > 0
    assert (tmp_path / "parts").is_dir()


def test_a_real_measurement_on_the_cpu(tmp_path):
    cfg = OverheadConfig(workload="mlp", batch=4, pairs=2, warmup_pairs=1, precision="fp32",
                         workload_options={"in_features": 8, "hidden": [8]})
    r = measure_timer_overhead(cfg, device="cpu", scratch=tmp_path)
    assert r["name"] == "mlp-fp32-kfac-10-100-b4" and r["timing"] == "perf_counter_ns"
    assert r["pairs"] == 2 and len(r["step_ms_on_all"]) == len(r["step_ms_off_all"]) == 2
    assert r["rows_per_step"] > 4  # forward, backward, update, step and K-FAC's stages
    assert r["replay_us_per_step"] > 0 and r["target"] == 0.01
    assert r["meets_target"] == (r["overhead_median"] <= 0.01)
