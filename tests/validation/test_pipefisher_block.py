"""The held-out PipeFisher check of the V100 model: one BERT-Large block, per stage."""
from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from kfacperf.validation import pipefisher_block as P


def test_the_published_numbers_are_the_sources():
    """The table's numbers are those of the published-measurements file, where there is one."""
    here = Path(__file__).resolve()
    found = [p / "shared" / "published" / "measurements.toml" for p in here.parents]
    shared = next((p for p in found if p.is_file()), None)
    if shared is None:
        pytest.skip("the published-measurements file is not beside this checkout")
    case = tomllib.loads(shared.read_text())["pipefisher_bert_block_ms"]
    assert dict(zip(case["stages"], case["bert_large_v100"])) == P.PUBLISHED_MS


def test_the_check_prints_predicted_against_published_per_stage(capsys):
    result = P.check("v100")
    assert set(result.predicted_ms) >= set(P.PUBLISHED_MS)
    # 5 x (1025^2 + 1024^2) + 4097^2 + 4096^2 fp32 values of A and G: the source's 168 MB
    assert result.factor_mib * 2**20 == 4 * (5 * (1025**2 + 1024**2) + 4097**2 + 4096**2)
    # a forward pass is its FLOPs over the device's fp32 rate at its efficiency, plus overhead
    from kfacperf.sim.models import load_device, load_workload

    d, w = load_device("v100"), load_workload("bert-large-block")
    fwd = d.stage("forward")
    flops = P.MICRO_BATCH * w.fwd_flops_per_example
    assert result.predicted_ms["forward"] == pytest.approx(
        (flops / (d.fp32_tflops * 1e12 * fwd.efficiency) * 1e6 + fwd.overhead_us) / 1e3, rel=0.02)
    assert P.main([]) == 0
    out = capsys.readouterr().out
    for stage, published in P.PUBLISHED_MS.items():
        assert f"{stage:<15} {published:12.2f}" in out
    assert "factor memory: 168.1 MiB predicted, 168 MB published" in out
