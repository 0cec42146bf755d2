"""kfacperf.instrument: a user's own training loop, profiled into the same trace as
`kfacperf profile` writes."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfacperf
from helpers.distributed import run_distributed
from kfacperf.runtime.training import TrainConfig, Trainer
from kfacperf.sim.models import load_workload_model
from kfacperf.trace.schema import RUN_KEYS
from kfacperf.trace.store import load_trace

ROOT = Path(__file__).resolve().parents[2]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _batches(n: int, batch: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 2, 4, 4, generator=gen),
             torch.randint(0, 5, (batch,), generator=gen))
            for _ in range(n)]


def _loop(run, batches, optimizer):
    for x, y in batches:
        with run.step():
            loss = F.cross_entropy(run.model(x), y)
            optimizer.zero_grad()
            run.backward(loss)
            run.update()


def test_the_loop_trains_as_the_profiler_trains_and_writes_its_trace(tmp_path):
    batches = _batches(4)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with kfacperf.instrument(model, opt, out=tmp_path / "t", warmup=1, damping=0.01) as run:
        assert run.model is model and run.preconditioner is not None  # local K-FAC, no DDP
        _loop(run, batches, opt)
    # the reference: kfacperf's own instrumented step on a copy of the same model and data
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(ref, loss_fn=F.cross_entropy, optimizer=ref_opt,
                      config=TrainConfig(optimizer="kfac", strategy="local", damping=0.01))
    for x, y in batches:
        trainer.train_step(x, y)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    trace = load_trace(tmp_path / "t")
    run_json = trace.run
    assert not [k for k in RUN_KEYS if k not in run_json]
    assert run_json["completed"] is True and run_json["workload"] == "Net"
    assert (run_json["steps"], run_json["warmup"], run_json["batch_per_rank"]) == (3, 1, 6)
    assert (run_json["strategy"], run_json["optimizer"], run_json["damping"]) == (
        "local", "kfac", 0.01)
    assert (run_json["lr"], run_json["momentum"], run_json["first_order"]) == (0.1, 0.9, "SGD")
    ev = trace.events
    assert sorted(ev[ev["stage"] == "step"]["step"]) == [0, 1, 2, 3]
    per_step = ev[ev["step"] == 2]
    assert {"forward", "backward", "factor_compute", "inverse", "precondition", "update",
            "step"} == set(per_step["stage"].astype(str))
    assert set(per_step[per_step["stage"] == "inverse"]["layer"].astype(str)) == {"conv", "fc"}
    spans = ev[ev["stage"] == "step"].set_index("step")
    for r in ev[ev["stage"] != "step"].itertuples():
        s = spans.loc[r.step]
        assert s.start_us - 1 <= r.start_us and r.start_us + r.dur_us <= s.start_us + s.dur_us + 1
    order = per_step.sort_values("start_us")["stage"].astype(str).tolist()
    assert order.index("forward") < order.index("backward") < order.index("inverse") \
        < order.index("update")

    wm = load_workload_model(tmp_path / "t" / "workload.toml")
    assert wm.fingerprint == run_json["workload_fingerprint"] and wm.layer_names == ("conv", "fc")
    assert wm.layer("conv").rows_per_example == 16 and wm.input_shape == (2, 4, 4)
    assert run.workload_model == wm
    from kfacperf.validation import calibrate

    assert calibrate([tmp_path / "t"]).device.name == "calibrated"  # finds the trace's model


def test_a_loop_that_fails_keeps_its_finished_steps(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="diverged"):
        with kfacperf.instrument(model, opt, out=tmp_path / "t", strategy="sgd") as run:
            for k, (x, y) in enumerate(_batches(4)):
                with run.step():
                    loss = F.cross_entropy(run.model(x), y)
                    run.backward(loss)
                    if k == 2:
                        raise FloatingPointError("diverged")
                    run.update()
    trace = load_trace(tmp_path / "t")
    assert trace.completed is False
    assert sorted(trace.events[trace.events["stage"] == "step"]["step"]) == [0, 1]
    report = (tmp_path / "t" / "parts" / "error-rank00000.txt").read_text()
    assert "FloatingPointError: diverged" in report


def test_misuse_is_a_clear_error(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="unknown setting.*lr, momentum and weight_decay come"):
        kfacperf.instrument(model, opt, out=tmp_path / "a", lr=0.1)
    with pytest.raises(ValueError, match="only the empirical Fisher"):
        kfacperf.instrument(model, opt, out=tmp_path / "a", fisher="mc")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        kfacperf.instrument(model, "sgd", out=tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="pass force=True"):
        kfacperf.instrument(model, opt, out=tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
    for bad, said in ((dict(warmup=-1), "instrument: warmup must be a non-negative integer"),
                      (dict(timeout_s=0), "instrument: timeout_s must be > 0"),
                      (dict(factor_interval=0), "factor_interval must be a positive integer")):
        with pytest.raises(ValueError, match=said):  # keywords, not profile's flags
            kfacperf.instrument(model, opt, out=tmp_path / "kw", **bad)
    x, y = _batches(1)[0]
    with pytest.raises(RuntimeError, match="without run.update"):
        with kfacperf.instrument(model, opt, out=tmp_path / "b", strategy="sgd") as run:
            with run.step():
                run.backward(F.cross_entropy(run.model(x), y))
    with kfacperf.instrument(model, opt, out=tmp_path / "c", strategy="sgd") as run:
        with pytest.raises(RuntimeError, match="outside a step"):
            run.backward(F.cross_entropy(run.model(x), y))
        _loop(run, [(x, y)], opt)


def _two_rank_loop(rank: int, world: int, out: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(3, batch=8)[0]
    with kfacperf.instrument(model, opt, out=out, strategy="kaisa", warmup=1) as run:
        assert isinstance(run.model, nn.parallel.DistributedDataParallel)
        _loop(run, [(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])] * 3, opt)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
def test_two_ranks_join_the_process_group_and_write_one_trace(tmp_path):
    params = run_distributed(_two_rank_loop, 2, args=(str(tmp_path / "t"),), timeout_s=180)
    for a, b in zip(*params):
        torch.testing.assert_close(a, b)  # the ranks stay in step
    trace = load_trace(tmp_path / "t")
    assert trace.completed and trace.run["world_size"] == 2 and trace.run["batch_per_rank"] == 4
    ev = trace.events
    assert ev[ev["stage"] == "step"].groupby("rank")["step"].nunique().to_dict() == {0: 3, 1: 3}
    assert {"grad_comm", "factor_comm"} <= set(ev["stage"].astype(str))


def test_the_example_script_runs(tmp_path, monkeypatch, capsys):
    """examples/own_loop.py at tiny sizes: train with kfacperf.instrument, simulate 1,024 GPUs."""
    out = tmp_path / "own"
    monkeypatch.setattr(sys, "argv", ["own_loop.py", "--steps", "3", "--warmup", "1",
                                      "--batch-size", "4", "--width", "4", "--out", str(out)])
    runpy.run_path(str(ROOT / "examples" / "own_loop.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert f"trace: {out} (3 steps on 1 process(es)" in printed
    rows = [line.split() for line in printed.splitlines()
            if line.split()[:1] in (["sgd"], ["spngd"], ["kaisa"])]
    assert {(r[0], r[1]) for r in rows} >= {("sgd", "1024"), ("spngd", "1024"), ("kaisa", "1024")}
    assert load_trace(out).completed and (out / "workload.toml").is_file()


def test_the_example_script_refuses_an_earlier_trace_without_force(tmp_path, monkeypatch,
                                                                   capsys):
    """A second run of examples/own_loop.py into the same --out is refused (exit 2, one line,
    the folder untouched) unless --force, as `kfacperf profile` does."""
    out = tmp_path / "own"
    out.mkdir()
    (out / "run.json").write_text("{}")  # an earlier trace (or anything else) there
    (out / "notes.txt").write_text("mine")
    argv = ["own_loop.py", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--width", "4",
            "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "examples" / "own_loop.py"), run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"own_loop.py: error: --out {out} already exists and is not empty; pass "
                   "--force to overwrite it\n")
    assert (out / "run.json").read_text() == "{}" and (out / "notes.txt").read_text() == "mine"
    monkeypatch.setattr(sys, "argv", [*argv, "--force"])
    runpy.run_path(str(ROOT / "examples" / "own_loop.py"), run_name="__main__")
    assert load_trace(out).completed and (out / "notes.txt").read_text() == "mine"


def test_a_step_that_raises_inside_a_loop_that_goes_on_is_recorded_once(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with kfacperf.instrument(model, opt, out=tmp_path / "t") as run:
        for k, (x, y) in enumerate(_batches(3)):
            try:
                with run.step():
                    loss = F.cross_entropy(run.model(x), y)
                    opt.zero_grad()
                    run.backward(loss)
                    if k == 1:
                        raise FloatingPointError("a bad batch, skipped by the loop")
                    run.update()
            except FloatingPointError:
                continue
    ev = load_trace(tmp_path / "t").events
    assert sorted(ev[ev["stage"] == "step"]["step"]) == [0, 1]
    per_stage = ev.groupby(["step", "stage"], observed=True).size().unstack("stage")
    assert (per_stage[["forward", "backward", "update", "step"]] == 1).all().all(), per_stage
    # nothing of the failed attempt lands in the step recorded after it
    steps = ev[ev["stage"] == "step"].set_index("step")
    for r in ev[ev["stage"] != "step"].itertuples():
        s = steps.loc[r.step]
        assert s.start_us - 1 <= r.start_us and r.start_us + r.dur_us <= s.start_us + s.dur_us + 1


def test_a_run_of_warm_up_steps_only_says_it_has_no_measured_step(tmp_path, capsys):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with kfacperf.instrument(model, opt, out=tmp_path / "t", strategy="sgd", warmup=5) as run:
        _loop(run, _batches(2), opt)
    assert "all 2 step(s) were warm-up (warmup=5)" in capsys.readouterr().err


class SeqFirst(nn.Module):
    """Token ids ``[T, N]`` -> an embedding ``[T, N, E]`` -> a Linear per position -> the
    mean over positions ``[N, C]``: examples along the second dimension."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(tokens)).mean(dim=0)


def test_a_sequence_first_loop_counts_its_examples_along_the_second_dimension(tmp_path):
    """batch_first=False: the batch is N (not T), the K-FAC step is the profiler's own step
    with the same setting, and not the one that counts examples along T."""
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, 11, (7, 3), generator=gen),
                torch.randint(0, 5, (3,), generator=gen)) for _ in range(3)]
    model = SeqFirst()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with kfacperf.instrument(model, opt, out=tmp_path / "t", warmup=1, damping=0.01,
                             batch_first=False) as run:
        assert run.preconditioner is not None and run.preconditioner.batch_first is False
        _loop(run, batches, opt)
    run_json = load_trace(tmp_path / "t").run
    assert (run_json["batch_per_rank"], run_json["batch_first"]) == (3, False)

    def reference(batch_first: bool) -> list[torch.Tensor]:
        ref = SeqFirst()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        trainer = Trainer(ref, loss_fn=F.cross_entropy, optimizer=ref_opt,
                          config=TrainConfig(optimizer="kfac", strategy="local", damping=0.01,
                                             batch_first=batch_first))
        for x, y in batches:
            trainer.train_step(x, y)
        return [p.detach() for p in ref.parameters()]

    for a, b in zip(model.parameters(), reference(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), reference(True)))
