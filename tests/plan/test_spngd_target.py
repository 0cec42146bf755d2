"""The plan against the SP-NGD paper's headline: ResNet-50 on 1,024 V100s of ABCI, global
batch 32,768, 1,760 steps of 0.187 s, 5.5 minutes (Osawa et al., TPAMI 2020, Table 1).

The plan searches SP-NGD at that scale with the paper's compute settings (mixed-precision
compute: the V100's fp16 tensor-core rate, its ``bf16`` here; Cholesky inverses) and the
SP-NGD convergence preset, whose statistics interval at that batch (12 steps, from the
paper's Table 2) bounds the intervals; its time to solution must be within 15% of 5.5
minutes.  That needs device and cluster models fitted to the paper's step times: with the
datasheet presets (every efficiency assumed) the step is far off, so the test is expected to
fail until the presets are calibrated.
"""
from __future__ import annotations

import pytest

from kfacperf.plan import plan
from kfacperf.sim.models import load_cluster, load_device

PAPER_S = 1760 * 0.187  # 329 s: Table 1, 1,024 GPUs


def presets_calibrated() -> bool:
    """Whether the v100 device and abci-v100 cluster presets hold fitted values."""
    device, cluster = load_device("v100"), load_cluster("abci-v100")
    fitted_device = any(not s.assumed for s in device.stages.values())
    fitted_cluster = not (cluster.intra.assumed and cluster.inter.assumed)
    return fitted_device and fitted_cluster


def spngd_at_1024() -> object:
    result = plan("resnet50", "v100", "abci-v100", gpus=[1024], strategies=["spngd"],
                  batch_per_gpu=[32], convergence=["spngd-resnet50"], dtype="bf16",
                  inverse_method="cholesky")
    best = result.best(1024, "kfac")
    assert best is not None
    return best


def test_the_setup_is_the_papers() -> None:
    best = spngd_at_1024()
    assert best.global_batch == 32768 and best.steps == 1760 and not best.extrapolated
    assert (best.factor_interval, best.inverse_interval) == (12, 12)
    assert best.time_s == pytest.approx(1760 * best.step_us / 1e6)


@pytest.mark.xfail(not presets_calibrated(), strict=False,
                   reason="the v100 and abci-v100 presets are datasheet values (every "
                          "efficiency assumed); they predict 62 ms per SP-NGD step here "
                          "against the paper's 187 ms, until fitted to the published SP-NGD "
                          "measurements")
def test_spngd_time_to_solution_is_the_papers_within_15_percent() -> None:
    best = spngd_at_1024()
    assert abs(best.time_s - PAPER_S) / PAPER_S <= 0.15, (best.step_us, best.time_s)
