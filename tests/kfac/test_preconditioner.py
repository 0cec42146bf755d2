"""Step semantics of KFACPreconditioner: intervals, running averages, hooks, errors, timing."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from kfacperf import vocab as stages
from kfacperf.kfac import KFACPreconditioner, LocalStrategy, Strategy


def _mlp() -> nn.Module:
    torch.manual_seed(20)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _train_step(model: nn.Module, precond: KFACPreconditioner, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=gen)
    model.zero_grad()
    model(x).pow(2).sum(dim=1).mean().backward()
    precond.step()


class _StatisticsSeen(LocalStrategy):
    """Local, and keeps a copy of each layer's statistics as ``step()`` receives them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, torch.Tensor] = {}

    def finish_factors(self) -> None:
        self.seen = {n: l.a_batch.clone() for n, l in self.layers.items()
                     if l.a_batch is not None}


def test_factors_and_inverses_change_only_on_their_interval_steps() -> None:
    model = _mlp()
    decay = 0.8
    seen = _StatisticsSeen()
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1, factor_interval=2,
                                 inverse_interval=4, factor_decay=decay, strategy=seen)
    state = precond.layers["0"]
    prev_a = prev_qa = None
    for step in range(9):
        seen.seen = {}
        _train_step(model, precond, step)
        a, qa = state.a_factor.clone(), state.qa.clone()
        assert state.a_batch is None and state.g_batch is None  # released after the update
        if step % 2 == 0:
            batch = seen.seen["0"]  # new statistics were computed this step
            expected = batch if step == 0 else decay * prev_a + (1 - decay) * batch
            torch.testing.assert_close(a, expected)
        else:
            assert seen.seen == {}  # hooks idle: no statistics on this step
            torch.testing.assert_close(a, prev_a, rtol=0, atol=0)
        if step % 4 == 0:
            ref = torch.linalg.eigh(a.double())[1].abs()
            torch.testing.assert_close(qa.double().abs(), ref, rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(qa, prev_qa, rtol=0, atol=0)
        prev_a, prev_qa = a, qa
    assert precond.steps == 9


class _Branches(nn.Module):
    """Two heads; ``use_b`` picks whether the second one runs in this forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.use_b = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) if self.use_b else self.a(x)


def test_a_layer_a_factor_step_skips_keeps_its_running_averages() -> None:
    """Statistics are released after the update: a layer that the next factor step's
    forward does not run is not averaged in again with the previous step's numbers."""
    model = _Branches()
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1, factor_decay=0.5)
    for step in range(2):  # two updates: the average now differs from the last statistics
        _train_step(model, precond, step)
    b = precond.layers["b"]
    kept = (b.a_factor.clone(), b.g_factor.clone())
    model.use_b = False
    _train_step(model, precond, 2)
    torch.testing.assert_close((b.a_factor, b.g_factor), kept, rtol=0, atol=0)
    assert b.a_batch is None and b.g_batch is None
    assert not torch.equal(precond.layers["a"].g_factor, kept[1])


def test_stale_inverse_is_used_between_inverse_steps() -> None:
    """On a factor-only step the gradient is preconditioned with the previous inverse."""
    model = _mlp()
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1, inverse_interval=2, kl_clip=None)
    _train_step(model, precond, 0)
    state = precond.layers["2"]
    qa, qg, da, dg, a = (t.clone() for t in (state.qa, state.qg, state.da, state.dg,
                                             state.a_factor))
    _train_step(model, precond, 1)
    v = qg.t() @ state.grad @ qa / (torch.outer(dg, da) + 1e-2)
    torch.testing.assert_close(state.precond_grad, qg @ v @ qa.t(), rtol=1e-5, atol=1e-7)
    assert not torch.equal(state.a_factor, a)  # factors did move


def test_eval_mode_and_no_grad_forwards_do_not_touch_statistics() -> None:
    model = _mlp()
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1)
    with torch.no_grad():
        model(torch.randn(3, 4))
    model.eval()
    model(torch.randn(3, 4)).sum().backward()
    assert all(layer.a_batch is None for layer in precond.layers.values())


def test_other_parameters_and_skipped_modules_are_listed(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2),
        nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 2),
    )
    with caplog.at_level(logging.INFO, logger="kfacperf.kfac.preconditioner"):
        precond = KFACPreconditioner(model, damping=1e-3, lr=0.1, skip_layers=["5"])
    assert list(precond.layers) == ["0"]
    assert precond.skipped_modules == ["2"]
    assert precond.other_params == [
        "1.weight", "1.bias", "2.weight", "2.bias", "4.weight", "4.bias", "5.weight", "5.bias",
    ]
    assert "1.weight" in caplog.text and "skips unsupported modules: 2" in caplog.text
    assert precond.layers["0"].dim_a == 3 * 9 + 1 and precond.layers["0"].dim_g == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(damping=0.0), "damping"),
        (dict(damping=-1.0), "damping"),
        (dict(damping=True), "damping"),
        (dict(lr=0), "lr"),
        (dict(factor_interval=0), "factor_interval"),
        (dict(factor_interval=1.5), "factor_interval"),
        (dict(inverse_interval=-2), "inverse_interval"),
        (dict(factor_interval=3, inverse_interval=10), "multiple of factor_interval"),
        (dict(inverse_method="svd"), "inverse_method 'svd'"),
        (dict(factor_decay=1.0), "factor_decay"),
        (dict(kl_clip=0.0), "kl_clip"),
        (dict(strategy="kaisa"), "Strategy protocol"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs: dict, message: str) -> None:
    args: dict[str, Any] = dict(damping=1e-3, lr=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        KFACPreconditioner(_mlp(), **args)


def test_model_without_supported_layers_is_rejected() -> None:
    with pytest.raises(ValueError, match="no supported layer"):
        KFACPreconditioner(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), damping=1e-3, lr=0.1)
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no supported layer"):
        KFACPreconditioner(frozen, damping=1e-3, lr=0.1)


def test_scheduled_hyperparameters_are_checked_when_used() -> None:
    model = _mlp()
    precond = KFACPreconditioner(model, damping=lambda k: 1e-2 if k == 0 else -1.0, lr=0.1)
    _train_step(model, precond, 0)
    with pytest.raises(ValueError, match="damping at step 1"):
        _train_step(model, precond, 1)


class RecordingTimer:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def stage(self, stage: str, layer: str = "", *, nbytes: int = 0,
              flops: float = 0.0) -> Iterator[None]:
        assert flops > 0
        self.rows.append((stage, layer))
        yield

    def issue_mark(self) -> Any:
        raise AssertionError("no communication on one process")

    def async_comm(self, stage: str, layer: str, nbytes: int, work: Any, *,
                   issued_at: Any = None) -> None:
        raise AssertionError("no communication on one process")

    def step_begin(self, step: int) -> None: ...

    def step_end(self) -> None: ...


def test_every_stage_is_timed_per_layer_on_the_steps_it_runs() -> None:
    model = _mlp()
    timer = RecordingTimer()
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1, factor_interval=2,
                                 inverse_interval=4, timer=timer)
    per_step = []
    for step in range(4):
        timer.rows.clear()
        _train_step(model, precond, step)
        per_step.append(list(timer.rows))
    hooks = [(stages.FACTOR_COMPUTE, "2"), (stages.FACTOR_COMPUTE, "0")]  # backward order
    average = [(stages.FACTOR_COMPUTE, "0"), (stages.FACTOR_COMPUTE, "2")]
    inverses = [(stages.INVERSE, "0"), (stages.INVERSE, "2")]
    precondition = [(stages.PRECONDITION, "0"), (stages.PRECONDITION, "2")]
    assert per_step[0] == hooks + average + inverses + precondition
    assert per_step[1] == precondition
    assert per_step[2] == hooks + average + precondition
    assert per_step[3] == precondition


class RecordingStrategy(LocalStrategy):
    """Local placement, but logs the protocol calls (and owns half of the layers)."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def setup(self, model: nn.Module, layers: Any, *, timer: Any) -> None:
        super().setup(model, layers, timer=timer)
        self.calls.append(f"setup:{','.join(layers)}")

    def on_factor_batch(self, layer: Any) -> None:
        assert layer.a_batch is not None and layer.g_batch is not None
        self.calls.append(f"batch:{layer.name}")

    def finish_factors(self) -> None:
        assert all(layer.grad is not None for layer in self.layers.values())
        self.calls.append("finish_factors")

    def needs_factors(self, name: str) -> bool:
        return name == "0"

    def inverts(self, name: str) -> bool:
        return name == "0"

    def share_inverses(self) -> None:
        self.calls.append("share_inverses")

    def reduce_gradients(self) -> None:
        self.calls.append("reduce_gradients")

    def preconditions(self, name: str) -> bool:
        return name == "0"

    def share_preconditioned(self) -> None:
        # stands in for the owner of layer "2": pass its gradient through
        layer = self.layers["2"]
        layer.precond_grad, layer.kl_term = layer.grad, (layer.grad * layer.grad).sum()
        self.calls.append("share_preconditioned")


def test_strategy_protocol_call_order_and_placement() -> None:
    model = _mlp()
    strategy = RecordingStrategy()
    assert isinstance(strategy, Strategy)
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1, factor_interval=2,
                                 inverse_interval=2, strategy=strategy, kl_clip=None)
    for step in range(2):
        _train_step(model, precond, step)
    assert strategy.calls == [
        "setup:0,2", "batch:2", "batch:0", "finish_factors", "share_inverses",
        "reduce_gradients", "share_preconditioned", "reduce_gradients", "share_preconditioned",
    ]
    assert precond.layers["0"].a_factor is not None and precond.layers["0"].qa is not None
    assert precond.layers["2"].a_factor is None and precond.layers["2"].qa is None
    raw = precond.layers["2"].grad  # written back unchanged by the stand-in owner
    torch.testing.assert_close(model[2].weight.grad, raw[:, :-1])
    assert not torch.allclose(model[0].weight.grad, precond.layers["0"].grad[:, :-1])


class _Tied(nn.Module):
    """``b`` reuses ``a``'s weight: ``out = W (W x)`` (plus a head K-FAC may take)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)))


def test_tied_layers_are_refused_naming_both() -> None:
    """Both layers would write their preconditioned gradient into the one ``.grad``, which
    write_grads would then scale twice: the preconditioner refuses them at construction."""
    with pytest.raises(ValueError, match=r"layers 'a' and 'b' share a parameter \(tied "
                       r"weights\).*untie them.*--optimizer sgd") as info:
        KFACPreconditioner(_Tied(), damping=1e-3, lr=0.1)
    assert "\n" not in str(info.value)


def test_tied_layers_left_out_keep_their_plain_gradient() -> None:
    """Skipped, the tied weight goes to the first-order optimizer with its true gradient:
    d/dW sum(v . W W x) = v (W x)^T + W^T v x^T, summed over the batch."""
    torch.manual_seed(3)
    model = _Tied()
    precond = KFACPreconditioner(model, damping=1e-3, lr=0.1, skip_layers=("a", "b"))
    assert list(precond.layers) == ["head"] and "a.weight" in precond.other_params
    x = torch.randn(5, 3)
    model(x).sum().backward()
    precond.step()
    with torch.no_grad():
        w, v = model.a.weight, model.head.weight.sum(0)  # d loss / d (b's output), per row
        expected = sum(torch.outer(v, w @ xi) + torch.outer(w.T @ v, xi) for xi in x)
    torch.testing.assert_close(model.a.weight.grad, expected)


def test_a_model_that_is_one_layer_is_named_root_layer_in_every_timed_stage() -> None:
    """``nn.Linear`` as the whole model has module path "": registered, timed (the backward
    hook's statistics too) and named by the strategy as ROOT_LAYER, never "" (the name of a
    stage of the whole step in a trace)."""
    from kfacperf.kfac.preconditioner import ROOT_LAYER

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    timer = RecordingTimer()
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1, timer=timer)
    assert list(precond.layers) == [ROOT_LAYER]
    assert precond.layers[ROOT_LAYER].name == ROOT_LAYER  # what strategies key placement by
    _train_step(model, precond, 0)
    assert {layer for _, layer in timer.rows} == {ROOT_LAYER}
    assert {stage for stage, _ in timer.rows} == {
        stages.FACTOR_COMPUTE, stages.INVERSE, stages.PRECONDITION}
