"""The report on a real simulator output (not a synthetic fixture)."""
import base64

import numpy as np

from kfacperf.report.build import build_sections
from kfacperf.report.inputs import load_predictions, load_runs


def test_sections_from_a_simulated_prediction(synth, tmp_path):
    from kfacperf.sim.prediction import write_prediction
    from kfacperf.sim.sweep import simulate

    pred = simulate("mlp", "h100-sxm5", "dgx-h100-ndr", ["sgd", "spngd", "kaisa:0.5"],
                    gpus=[2, 4, 16], batch_per_gpu=32, factor_interval=1, inverse_interval=2)
    path = write_prediction(pred, tmp_path / "pred")
    trace = synth.write_trace_dir(tmp_path / "kaisa-2", synth.run_json(
        strategy="kaisa", world_size=2, grad_worker_fraction=0.5, factor_interval=1,
        inverse_interval=2),
        synth.make_events(strategy="kaisa", world_size=2))
    runs, preds = load_runs([trace]), load_predictions([path])
    secs = {s.key: s for s in build_sections(runs, preds)}

    scaling = secs["scaling"].figures[0].to_dict()
    step = {t["name"]: t for t in scaling["data"] if t.get("xaxis", "x") == "x"}
    assert set(step) == {"sgd", "spngd", "kaisa:0.5"}
    s = pred.summary[pred.summary["strategy"] == "kaisa:0.5"].sort_values("gpus")
    y = step["kaisa:0.5"]["y"]
    if isinstance(y, dict):  # plotly >= 6 stores arrays as base64
        y = np.frombuffer(base64.b64decode(y["bdata"]), dtype=y["dtype"])
    np.testing.assert_allclose(np.asarray(y, float), s["step_us"].to_numpy() / 1000)

    # the measured kaisa f=0.5 run is matched to the kaisa:0.5 row at 2 GPUs
    assert len(secs["comparison"].figures) == 1
    sim = [f.layout.title.text for f in secs["timelines"].figures
           if f.layout.title.text.startswith("simulated")]
    assert len(sim) == 3 and all("at 16 GPUs" in t for t in sim)
    lanes = [f for f in secs["timelines"].figures
             if "spngd at 16" in f.layout.title.text][0].layout.yaxis.categoryarray
    # representative ranks say how many ranks they stand for
    assert all("(×" in lane for lane in lanes)


def test_predicted_overhead_is_the_predicted_step_shown_over_sgds(synth, tmp_path):
    """The headline's predicted K-FAC overhead is its predicted step (over the measured mix of
    kinds of step) over the predicted SGD step, not the simulated cycle's ratio."""
    from kfacperf.report.matching import headline
    from kfacperf.sim.prediction import write_prediction
    from kfacperf.sim.sweep import simulate

    pred = simulate("mlp", "h100-sxm5", "dgx-h100-ndr", ["sgd", "spngd"], gpus=[2],
                    batch_per_gpu=32, factor_interval=1, inverse_interval=4)
    path = write_prediction(pred, tmp_path / "pred")
    # 3 measured steps, one inverting: a mix unlike the simulated cycle's (1 in 4)
    trace = synth.write_trace_dir(tmp_path / "spngd-2", synth.run_json(
        strategy="spngd", world_size=2, factor_interval=1, inverse_interval=4),
        synth.make_events(strategy="spngd", world_size=2, inverse_interval=4))
    head = headline(load_runs([trace]), load_predictions([path])).iloc[0]
    s = pred.summary.set_index("strategy")
    sgd_step = float(s.loc["sgd", "step_us"])
    assert np.isfinite(head["predicted_step_us"])
    assert head["predicted_step_us"] != float(s.loc["spngd", "step_us"])  # another mix
    np.testing.assert_allclose(head["kfac_overhead_predicted"],
                               head["predicted_step_us"] / sgd_step, rtol=1e-9)
