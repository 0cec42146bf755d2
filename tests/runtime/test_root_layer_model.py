"""A model that is itself one layer (``nn.Linear(4, 3)`` as the whole model, module path "")
through profile (K-FAC and SGD), calibrate, simulate and ``kfacperf.instrument``: its layer is
named ROOT_LAYER, the preconditioner's name, in the workload model and in the trace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfacperf
from kfacperf import vocab as S
from kfacperf.cli import main
from kfacperf.kfac.preconditioner import ROOT_LAYER
from kfacperf.sim.models import load_workload_model
from kfacperf.trace.store import load_trace

ONE_LAYER = '''
import torch
from torch import nn


def build():
    def make_batch(n, gen):
        return torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    return nn.Linear(4, 3), make_batch
'''
RUN = ["--steps", "3", "--warmup", "1", "--batch-size", "4"]
PER_LAYER = (S.FACTOR_COMPUTE, S.INVERSE, S.PRECONDITION)


def _per_layer_names(trace_dir) -> dict[str, set[str]]:
    ev = load_trace(trace_dir).events
    return {stage: set(ev[ev["stage"] == stage]["layer"].astype(str)) for stage in PER_LAYER}


def test_a_one_layer_model_is_profiled_calibrated_and_simulated(tmp_path, capsys):
    (tmp_path / "one.py").write_text(ONE_LAYER)
    ref = ["--workload", f"{tmp_path / 'one.py'}:build"]
    kfac, sgd = tmp_path / "kfac", tmp_path / "sgd"
    assert main(["profile", *ref, *RUN, "--out", str(kfac)]) == 0
    assert main(["profile", *ref, *RUN, "--optimizer", "sgd", "--out", str(sgd)]) == 0
    for path in (kfac, sgd):
        wm = load_workload_model(path / "workload.toml")
        assert wm.layer_names == (ROOT_LAYER,) and wm.layers[0].params == 15
    # every per-layer row names the layer; "" is a stage of the whole step
    assert _per_layer_names(kfac) == {stage: {ROOT_LAYER} for stage in PER_LAYER}
    assert _per_layer_names(sgd) == {stage: set() for stage in PER_LAYER}

    assert main(["calibrate", *ref, "--out", str(tmp_path / "one.toml")]) == 0
    assert load_workload_model(tmp_path / "one.toml").layer_names == (ROOT_LAYER,)
    assert main(["calibrate", str(kfac), str(sgd), "--out", str(tmp_path / "dev.toml")]) == 0
    capsys.readouterr()
    assert main(["simulate", "--workload", str(kfac / "workload.toml"), "--device",
                 str(tmp_path / "dev.toml"), "--cluster", "local-cpu", "--gpus", "1,2",
                 "--batch-per-gpu", "4", "--strategy", "sgd,spngd"]) == 0
    assert "spngd" in capsys.readouterr().out


def _data(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("strategy", ["local", "sgd"])
def test_instrument_takes_a_one_layer_model(tmp_path, strategy):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with kfacperf.instrument(model, opt, out=tmp_path / "t", strategy=strategy) as run:
        for x, y in _data():
            with run.step():
                loss = F.cross_entropy(run.model(x), y)
                opt.zero_grad()
                run.backward(loss)
                run.update()
    wm = load_workload_model(tmp_path / "t" / "workload.toml")
    assert wm.layer_names == (ROOT_LAYER,)
    expect = {ROOT_LAYER} if strategy == "local" else set()
    assert _per_layer_names(tmp_path / "t") == {stage: expect for stage in PER_LAYER}
