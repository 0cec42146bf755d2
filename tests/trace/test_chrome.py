"""Chrome / Perfetto export of a recorded trace: events, tracks and telemetry counters."""
import json
from collections import Counter
from pathlib import Path

import pandas as pd

from kfacperf.trace.chrome import export_chrome
from kfacperf.trace.schema import TELEMETRY_COLUMNS
from kfacperf.trace.store import load_trace, write_trace

REFERENCE = Path(__file__).resolve().parents[2] / "traces/reference/p2/resnet20-spngd-b32-i10-r1"


def _with_telemetry(tmp_path: Path) -> Path:
    """The reference trace with a telemetry sample of every measurement on each rank."""
    ref = load_trace(REFERENCE)
    metrics = [c for c in TELEMETRY_COLUMNS if c not in ("rank", "gpu", "t_us")]
    rows = [{"rank": r, "gpu": r, "t_us": 1000.0 * (i + 1),
             **{m: 10.0 * (k + 1) + i for k, m in enumerate(metrics)}}
            for r in range(int(ref.run["world_size"])) for i in range(2)]
    return write_trace(tmp_path / "t", run=ref.run, events=ref.events,
                       telemetry=pd.DataFrame(rows))


def test_one_event_per_stage_and_every_telemetry_metric(tmp_path):
    trace = load_trace(_with_telemetry(tmp_path))
    out = export_chrome(trace, tmp_path / "trace.json")[0]
    doc = json.loads(out.read_text())
    ev = doc["traceEvents"]
    complete = [e for e in ev if e["ph"] == "X"]
    assert len(complete) == len(trace.events)  # one event per recorded stage
    assert all({"name", "ph", "ts", "dur", "pid", "tid"} <= set(e) for e in complete)
    per_rank = Counter(e["pid"] for e in complete)
    assert per_rank == Counter(int(r) for r in trace.events["rank"])
    named = {(e["pid"], e["tid"]) for e in ev if e["name"] == "thread_name"}
    assert {(e["pid"], e["tid"]) for e in complete} <= named  # every track is named

    # every telemetry measurement becomes a counter, with the values recorded
    metrics = [c for c in TELEMETRY_COLUMNS if c not in ("rank", "gpu", "t_us")]
    counters = [e for e in ev if e["ph"] == "C"]
    assert len(counters) == len(metrics) * len(trace.telemetry)
    assert {e["name"] for e in counters} == {e["name"] for e in counters[:len(metrics)]}
    assert len({e["name"] for e in counters}) == len(metrics)
    tel = trace.telemetry
    assert sorted(e["args"]["value"] for e in counters) == sorted(
        float(v) for m in metrics for v in tel[m])
