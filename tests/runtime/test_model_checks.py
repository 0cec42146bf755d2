"""What K-FAC cannot train (tied layers, a layer called twice, no K-FAC layer) refused alike by
``kfacperf profile --workload FILE.py:FUNC`` and by ``kfacperf.instrument``, while a first-order
run of the same model trains as plain torch does; misuse of the instrumented loop, and a loop
that fails or runs no step, leave a trace that says what happened."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfacperf
from kfacperf.cli import main
from kfacperf.sim.models import load_workload_model
from kfacperf.trace.store import load_trace, read_run

MODELS = '''
import torch
from torch import nn


def _batch(n, g):
    return torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class NoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x), x


def tied():
    return Tied(), _batch


def twice():
    return Twice(), _batch


def nolayer():
    return NoLayer(), _batch


def pair():
    return Pair(), _batch
'''
RUN = ["--steps", "2", "--warmup", "0", "--batch-size", "4"]


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


# --------------------------------------------------------------------- kfacperf profile


@pytest.mark.parametrize(("func", "why"), [
    ("tied", "layers 'a' and 'b' share a parameter (tied weights)"),
    ("twice", "layer 'fc' is called more than once per forward"),
    ("nolayer", "the model (NoLayer) has no layer K-FAC can precondition"),
])
def test_profile_refuses_for_kfac_what_kfac_cannot_train(tmp_path, capsys, models, func, why):
    out = tmp_path / "never"
    assert main(["profile", "--workload", f"{models}:{func}", *RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kfacperf profile: error: --workload {models}:{func}: {why}")
    assert "optimizer sgd" in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()  # refused before any process started


@pytest.mark.parametrize(("func", "layers", "other"), [
    ("tied", ("a",), 4),  # a.weight 16 + a.bias 4 listed; b's own bias 4 left over
    ("twice", ("fc",), 0),
])
def test_profile_sgd_runs_what_kfac_refuses(tmp_path, capsys, models, func, layers, other):
    out = tmp_path / func
    assert main(["profile", "--workload", f"{models}:{func}", *RUN, "--optimizer", "sgd",
                 "--out", str(out)]) == 0
    assert "K-FAC" not in capsys.readouterr().err
    trace = load_trace(out)
    assert trace.completed and trace.run["steps"] == 2
    wm = load_workload_model(out / "workload.toml")
    assert wm.layer_names == layers and wm.other_params == other
    assert wm.total_params == 24 if func == "tied" else 20  # each parameter tensor once


def test_profile_sgd_of_a_model_without_a_layer_runs_without_a_workload_model(
        tmp_path, capsys, models):
    out = tmp_path / "nolayer"
    assert main(["profile", "--workload", f"{models}:nolayer", *RUN, "--optimizer", "sgd",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no workload model in the trace" in err and "K-FAC" not in err
    trace = load_trace(out)
    assert trace.completed and not (out / "workload.toml").exists()
    assert set(trace.events["stage"].astype(str)) == {"step", "forward", "backward", "update"}


def test_a_model_the_default_loss_cannot_take_is_said_once(tmp_path, capsys, models):
    out = tmp_path / "pair"
    assert main(["profile", "--workload", f"{models}:pair", *RUN, "--optimizer", "sgd",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("the model returns a tuple of 2 (Tensor, Tensor)") == 1, err
    assert "loss_fn(outputs, targets)" in err and "\n" not in err
    run = read_run(out / "run.json")
    assert run["completed"] is False and "the model returns a tuple" in run["failure"]


# -------------------------------------------------------------------- kfacperf.instrument


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))


class _DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.fc(batch["x"])


def _data(n: int = 3, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 4, generator=gen), torch.randint(0, 4, (batch,), generator=gen))
            for _ in range(n)]


def _loop(run, optimizer, data, wrap=lambda x: x):
    for x, y in data:
        with run.step():
            loss = F.cross_entropy(run.model(wrap(x)), y)
            optimizer.zero_grad()
            run.backward(loss)
            run.update()


def _plain_sgd(model: nn.Module, data, lr: float = 0.1) -> nn.Module:
    """The reference: the same steps in plain torch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("cls", [_Tied, _Twice])
def test_instrument_sgd_trains_a_model_kfac_refuses_as_torch_does(tmp_path, cls):
    torch.manual_seed(0)
    model = cls()
    ref = _plain_sgd(copy.deepcopy(model), _data())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with kfacperf.instrument(model, opt, out=tmp_path / "t", strategy="sgd") as run:
        _loop(run, opt, _data())
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    run_json = read_run(tmp_path / "t" / "run.json")
    wm = load_workload_model(tmp_path / "t" / "workload.toml")
    assert run_json["completed"] and run_json["workload_fingerprint"] == wm.fingerprint
    assert wm.total_params == sum(p.numel() for p in model.parameters())


def test_instrument_refuses_tied_layers_for_kfac_before_writing_a_trace(tmp_path):
    model = _Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"instrument: _Tied: layers 'a' and 'b' share a "
                       r"parameter \(tied weights\).*strategy 'sgd'"):
        kfacperf.instrument(model, opt, out=tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_instrument_refuses_a_layer_called_twice_in_a_kfac_step(tmp_path):
    model = _Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"instrument: layer 'fc' \(Linear\) is called twice "
                       r"in step 0.*strategy='sgd'"):
        with kfacperf.instrument(model, opt, out=tmp_path / "t") as run:
            _loop(run, opt, _data())
    run_json = read_run(tmp_path / "t" / "run.json")
    assert run_json["completed"] is False and "called twice" in run_json["failure"]


def test_instrument_refuses_loss_backward_in_place_of_run_backward(tmp_path):
    model = _Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(1)[0]
    with pytest.raises(RuntimeError, match=r"step 0 ended without run.backward\(loss\)"):
        with kfacperf.instrument(model, opt, out=tmp_path / "t", strategy="sgd") as run:
            with run.step():
                loss = F.cross_entropy(run.model(x), y)
                loss.backward()
                run.update()
    trace = load_trace(tmp_path / "t", partial=True)
    assert "step" not in set(trace.events["stage"].astype(str))  # no step was recorded


def test_a_failing_loop_records_what_calibrate_needs(tmp_path):
    """Steps 0 and 1 finish, step 2 raises: run.json has the finished steps, the batch and
    the workload model's fingerprint, so calibrate takes the trace with its workload.toml."""
    from kfacperf.validation import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError):
        with kfacperf.instrument(model, opt, out=tmp_path / "t") as run:
            for k, (x, y) in enumerate(_data(3)):
                with run.step():
                    loss = F.cross_entropy(run.model(x), y)
                    opt.zero_grad()
                    run.backward(loss)
                    if k == 2:
                        raise FloatingPointError("diverged")
                    run.update()
    run_json = read_run(tmp_path / "t" / "run.json")
    wm = load_workload_model(tmp_path / "t" / "workload.toml")
    assert (run_json["completed"], run_json["steps"], run_json["batch_per_rank"]) == (False, 2, 6)
    assert run_json["workload_fingerprint"] == wm.fingerprint
    assert run_json["failure"] == "FloatingPointError: diverged"
    fitted = calibrate([tmp_path / "t"], workload_search=[str(tmp_path / "t" / "workload.toml")])
    assert fitted.device.name == "calibrated"


def test_a_forward_of_a_dict_says_once_why_there_is_no_workload_model(tmp_path, capsys):
    model = _DictInput()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with kfacperf.instrument(model, opt, out=tmp_path / "t") as run:
        _loop(run, opt, _data(), wrap=lambda x: {"x": x})
    err = capsys.readouterr().err
    assert err.count("no workload model for _DictInput: its forward takes a dict as its first "
                     "argument") == 1
    assert "batch_size=" in err
    run_json = read_run(tmp_path / "t" / "run.json")
    assert run_json["completed"] and run_json["batch_per_rank"] == 6  # the dict's tensor
    assert not (tmp_path / "t" / "workload.toml").exists()


def test_a_loop_that_runs_no_step_says_so(tmp_path, capsys):
    model = _Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with kfacperf.instrument(model, opt, out=tmp_path / "t", strategy="sgd"):
        pass
    assert "instrument: no step was run" in capsys.readouterr().err
    run_json = json.loads((tmp_path / "t" / "run.json").read_text())
    assert run_json["completed"] is False and run_json["steps"] == 0
    assert run_json["failure"].startswith("no step was run")


def test_a_checkpointed_forward_rerun_in_backward_is_not_a_second_call(tmp_path):
    """torch.utils.checkpoint runs a layer's forward again inside backward: one call per step
    all the same, and K-FAC trains as kfacperf's own step does without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    from kfacperf.runtime.training import TrainConfig, Trainer

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = checkpoint(lambda t: torch.tanh(self.fc1(t)), x, use_reentrant=False)
            return self.fc2(h)

    torch.manual_seed(0)
    model = Checkpointed()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with kfacperf.instrument(model, opt, out=tmp_path / "t", damping=0.01) as run:
        _loop(run, opt, _data())
    trainer = Trainer(ref, loss_fn=F.cross_entropy,
                      optimizer=torch.optim.SGD(ref.parameters(), lr=0.1),
                      config=TrainConfig(optimizer="kfac", strategy="local", damping=0.01))
    for x, y in _data():
        trainer.train_step(x, y)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
