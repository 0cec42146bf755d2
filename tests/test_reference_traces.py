"""The committed reference traces reproduce the README's accuracy table, without re-running."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "traces" / "reference"


def _readme_table() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("run ") and "strategy" in ln)
    out = []
    for ln in lines[start:]:
        if not ln.strip() or ln.startswith("```"):
            break
        out.append(ln)
    return out


@pytest.mark.skipif(not (REF / "p1").is_dir(), reason="no committed reference traces")
def test_validate_on_the_committed_traces_gives_the_readme_table() -> None:
    from kfacperf.validation import validate
    from kfacperf.validation.text import text_table

    result = validate([REF / "p1"], [REF / "p2"], cluster=REF / "local-cpu.toml")
    table = text_table(result).splitlines()
    readme = _readme_table()
    assert len(readme) == 1 + 10
    assert table[: len(readme)] == readme
    summary = next(ln for ln in table if ln.startswith("10 held-out run(s)"))
    assert summary in (ROOT / "README.md").read_text()
    # every held-out configuration pools its eight recordings; nothing leaked into calibration
    assert set(result.runs["recordings"]) == {8}
    assert len(result.calibration.traces) == 80
    assert not any("/p2/" in t for t in result.calibration.traces)
    assert result.target_misses() == []  # the README says all three targets are met
    tight = replace(result, runs=result.runs.assign(error_pct=result.runs["error_pct"] * 2))
    assert [m.split(" |")[0] for m in tight.target_misses()] == ["median", "worst"]  # 8.0, 14.6%


@pytest.mark.skipif(not (REF / "p1").is_dir(), reason="no committed reference traces")
def test_the_reference_cluster_model_is_the_fit_of_the_sessions_probes() -> None:
    """local-cpu.toml is what `commbench --from-raw` makes of commbench.json and probes/."""
    from kfacperf.bench.raw import load_raw, merge_results
    from kfacperf.calibrate.cluster import fit_cluster
    from kfacperf.sim.models.cluster import load_cluster_model

    raws = [REF / "commbench.json", *sorted((REF / "probes").glob("probe-*.json"))]
    assert len(raws) > 20  # probes spread over the whole recording session
    merged = merge_results([load_raw(p) for p in raws])
    model, _ = fit_cluster(merged, name="local-cpu")
    committed = load_cluster_model(REF / "local-cpu.toml")
    assert committed == model
    assert (committed.host is not None and committed.host.straggler > 0
            and committed.host.contention > 0)
    # collectives timed one call at a time, as the optimizer issues them, in every file
    assert {p.timing for p in merged.points} == {"per_call"}
