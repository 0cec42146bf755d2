"""The Monte-Carlo Fisher: statistics from sampled labels, the true gradient, determinism."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.recording import RecordingTimer
from kfacperf import vocab
from kfacperf.kfac.fisher import MonteCarloFisher
from kfacperf.runtime.training import TrainConfig, Trainer

CLASSES = 5


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, CLASSES))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, CLASSES, (16,), generator=g)


def _trainer(fisher: str, seed: int = 0, timer: RecordingTimer | None = None) -> Trainer:
    config = TrainConfig(optimizer="kfac", strategy="local", lr=0.1, damping=1e-2,
                         bn_blocks="unit", fisher=fisher)
    return Trainer(_model(), loss_fn=F.cross_entropy, config=config, seed=seed,
                   **({"timer": timer} if timer is not None else {}))


def _statistics(trainer: Trainer) -> dict[str, torch.Tensor]:
    """After the first step: its statistics are the running averages (the first update
    copies them; the batch statistics themselves are released by then)."""
    pc = trainer.preconditioner
    assert pc is not None and pc.steps == 1
    return {f"{n}.{f.name}": getattr(l, f.factor_attr).clone()
            for n, l in pc.layers.items() for f in l.factors()}


def _step_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """One step; the (unpreconditioned) gradient each layer loaded."""
    x, y = _batch()
    trainer.train_step(x, y)
    pc = trainer.preconditioner
    assert pc is not None
    return {n: l.grad.clone() for n, l in pc.layers.items()}


def test_mc_statistics_are_those_of_the_sampled_labels_and_the_gradient_is_true() -> None:
    mc = _trainer("mc", seed=4)
    mc_grads = _step_grads(mc)
    emp = _trainer("emp")
    emp_grads = _step_grads(emp)
    for name, g in emp_grads.items():  # the gradient is the true labels' one
        torch.testing.assert_close(mc_grads[name], g, rtol=1e-6, atol=1e-7)
    mc_stats, emp_stats = _statistics(mc), _statistics(emp)
    differ = [k for k in emp_stats if not torch.allclose(mc_stats[k], emp_stats[k])]
    assert differ == ["0.g", "1.f", "4.g"]  # A (forward inputs) is shared, the rest is not
    # The same statistics come from the empirical Fisher of the labels mc sampled.
    x, _ = _batch()
    model = _model()
    sampler = MonteCarloFisher(F.cross_entropy, params=model.parameters(), seed=4)
    with torch.no_grad():
        sampled = sampler.sample_targets(model(x), step=0)
    replay = _trainer("emp")
    replay.train_step(x, sampled)
    for key, value in _statistics(replay).items():
        torch.testing.assert_close(mc_stats[key], value, rtol=1e-6, atol=1e-8)


def test_samples_are_deterministic_per_seed_and_step_and_follow_softmax() -> None:
    logits = torch.randn(4000, 3)
    logits[:, 0] += 2.0
    s = MonteCarloFisher(F.cross_entropy, params=[], seed=7)
    a, b = s.sample_targets(logits, step=3), s.sample_targets(logits, step=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, s.sample_targets(logits, step=4))
    assert not torch.equal(a, MonteCarloFisher(F.cross_entropy, params=[], seed=8)
                           .sample_targets(logits, step=3))
    freq = torch.bincount(a, minlength=3).double() / len(a)
    expected = torch.softmax(logits.double(), dim=1).mean(0)
    assert (freq - expected).abs().max() < 0.03  # 4000 samples: a few standard errors


def test_ranks_draw_the_labels_one_process_draws_for_the_global_batch() -> None:
    logits = torch.randn(12, 4)
    whole = MonteCarloFisher(F.cross_entropy, params=[], seed=1).sample_targets(logits, step=2)
    parts = [MonteCarloFisher(F.cross_entropy, params=[], seed=1, rank=r, world_size=3)
             .sample_targets(logits[4 * r:4 * (r + 1)], step=2) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_a_loss_without_a_predictive_distribution_is_refused() -> None:
    with pytest.raises(ValueError, match="mse_loss.*use fisher 'emp'"):
        MonteCarloFisher(F.mse_loss, params=[])
    config = TrainConfig(optimizer="kfac", strategy="local", fisher="mc")
    with pytest.raises(ValueError, match="cross-entropy"):
        Trainer(_model(), loss_fn=F.mse_loss, config=config)


def test_the_extra_pass_is_one_backward_row_on_factor_steps_only() -> None:
    timer = RecordingTimer()
    config = TrainConfig(optimizer="kfac", strategy="local", lr=0.1, damping=1e-2,
                         fisher="mc", factor_interval=2, inverse_interval=2)
    trainer = Trainer(_model(), loss_fn=F.cross_entropy, config=config, timer=timer)
    x, y = _batch()
    for _ in range(3):
        trainer.train_step(x, y)
    rows = [(r.step, r.stage, r.layer) for r in timer.records
            if r.stage in (vocab.BACKWARD, vocab.FACTOR_COMPUTE)]
    captured = [("0", vocab.FACTOR_COMPUTE), ("4", vocab.FACTOR_COMPUTE)]
    first = [(0, vocab.BACKWARD, vocab.MC_FISHER_PASS)]
    first += [(0, stage, layer) for layer, stage in reversed(captured)]  # hooks: last first
    first += [(0, vocab.BACKWARD, "")]
    running = [(0, vocab.FACTOR_COMPUTE, n) for n in ("0", "4")]  # running averages in step()
    assert rows[: len(first) + 2] == first + running
    assert [r for r in rows if r[0] == 1] == [(1, vocab.BACKWARD, "")]
    assert [r for r in rows if r[0] == 2][0] == (2, vocab.BACKWARD, vocab.MC_FISHER_PASS)
