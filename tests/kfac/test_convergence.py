"""K-FAC reaches SGD's loss in at most half the steps on the learnable teacher task."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kfacperf.kfac import KFACPreconditioner
from kfacperf.workloads import get_workload

SEED = 0
STEPS = 100  # S: SGD's loss after S steps is the target
BATCH = 128
SGD_LRS = (0.03, 0.05, 0.1)  # SGD (momentum 0.9) gets the best of these; 0.05 wins


def _eval_losses(*, kfac: dict | None, lr: float, momentum: float, seed: int) -> list[float]:
    """Held-out loss after every step."""
    workload = get_workload("teacher")
    x_eval, y_eval = workload.make_batch(2048, seed=10_000 + seed, step=0)
    model = workload.build_model(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    precond = None if kfac is None else KFACPreconditioner(model, lr=lr, **kfac)
    losses = []
    for step in range(STEPS):
        x, y = workload.make_batch(BATCH, seed=seed, step=step)
        opt.zero_grad()
        workload.loss_fn(model(x), y).backward()
        if precond is not None:
            precond.step()
        opt.step()
        with torch.no_grad():
            losses.append(float(workload.loss_fn(model(x_eval), y_eval)))
    return losses


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one thread is fastest and avoids oversubscribing a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sgd_target() -> tuple[float, float]:
    """(best SGD learning rate, its held-out loss after STEPS steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sgd = {lr: _eval_losses(kfac=None, lr=lr, momentum=0.9, seed=SEED) for lr in SGD_LRS}
    finally:
        torch.set_num_threads(before)
    best = min(sgd, key=lambda lr: sgd[lr][-1])
    assert min(sgd[best][: STEPS // 2]) > sgd[best][-1]  # SGD itself is still improving
    return best, sgd[best][-1]


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_kfac_reaches_sgd_loss_in_half_the_steps(method: str,
                                                 sgd_target: tuple[float, float]) -> None:
    best, target = sgd_target
    kfac = dict(damping=0.03, kl_clip=1e-2, inverse_method=method)
    losses = _eval_losses(kfac=kfac, lr=0.1, momentum=0.5, seed=SEED)
    reached = next((i + 1 for i, v in enumerate(losses) if v <= target), None)
    assert reached is not None and reached <= STEPS // 2, (
        f"K-FAC ({method}) reached SGD's step-{STEPS} loss {target:.3f} (lr {best}) "
        f"at step {reached}"
    )
