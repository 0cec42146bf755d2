"""A K-FAC layer that gets no gradient in a step ends it as it does in one process.

A branch of the model is taken by every example on step 0, by rank 0's examples only on
step 1 (a non-factor step: factor statistics of a layer some ranks skip are not exchanged),
and by no example on steps 2 (a factor and inverse step) and 3; a second branch, ``late``,
by no example before step 2 (so on the inverse step 0 it has no statistics, hence no inverse
state to share) and by every example from then on.  In one process on the whole
batch (strategy ``local``) the branch's ``.grad`` is None on steps 2 and 3 and the first-order
optimizer (momentum and weight decay) leaves it alone; on 2 gloo ranks every distributed
strategy must do the same — not write reduced zeros, which momentum and weight decay would
turn into a change — while on step 1 the rank without the branch still gets the average over
ranks.  The same with a user-built ``DistributedDataParallel(find_unused_parameters=True)``
and KAISA with fewer gradient workers than ranks (which once failed an assertion on the
layer's gradient worker).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from helpers.distributed import CasesInOneLaunch, strategy_of_case
from helpers.routed import Routed
from kfacperf.kfac.preconditioner import KFACPreconditioner
from kfacperf.workloads import rank_slice

pytestmark = pytest.mark.slow

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 4


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    masks = torch.zeros(GLOBAL_BATCH, 2, dtype=torch.bool)  # branch, late
    if step == 0:
        masks[:, 0] = True
    elif step == 1:
        masks[: GLOBAL_BATCH // WORLD, 0] = True  # rank 0's examples only
    else:
        masks[:, 1] = True
    return x, y, masks


def train(name: str, rank: int, world: int) -> dict[str, Any]:
    """STEPS steps; every parameter's ``.grad`` after each ``precond.step()`` (None where
    there is none) and the final weights."""
    model = Routed(relu_branch=True, norm=True)
    net: nn.Module = model
    if "ddp" in name:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    precond = KFACPreconditioner(net, damping=1e-2, lr=0.1, factor_interval=2,
                                 inverse_interval=2, strategy=strategy_of_case(name, WORLD))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    grads = []
    for step in range(STEPS):
        x, y, mask = (rank_slice(t, rank, world) for t in batch(step))
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x, mask), y).backward()
        precond.step()
        grads.append({n: None if p.grad is None else p.grad.detach().numpy().copy()
                      for n, p in model.named_parameters()})
        opt.step()
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    return {"grads": grads, "weights": weights}


CASES = ("spngd", "spngd-fused", "kaisa-f1", "kaisa-f1P", "kaisa-ddp-f1", "kaisa-ddp-f1P")


LAUNCH = CasesInOneLaunch(train, CASES, WORLD, timeout_s=240)


_REFERENCE: dict[str, Any] = {}


def reference() -> dict[str, Any]:
    if not _REFERENCE:
        torch.set_num_threads(1)
        _REFERENCE.update(train("local", 0, 1))
    return _REFERENCE


def test_the_reference_skips_the_branch() -> None:
    """The premise: one process leaves a skipped branch's .grad None."""
    ref = reference()
    absent = [sorted(n for n, g in step.items() if g is None) for step in ref["grads"]]
    assert absent == [["late.bias", "late.weight"]] * 2 + [["branch.bias", "branch.weight"]] * 2


def close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> bool:
    return bool(np.abs(got - want).max() <= rtol * max(np.abs(want).max(), 1e-6))


@pytest.mark.parametrize("name", CASES)
def test_grads_match_single_process(name: str) -> None:
    ref = reference()
    for rank, got in enumerate(LAUNCH.values(name)):
        for step, (mine, want) in enumerate(zip(got["grads"], ref["grads"])):
            for param, g in want.items():
                where = f"{name} rank {rank} step {step}: {param}.grad"
                if g is None:
                    assert mine[param] is None, f"{where} is set; one process leaves it None"
                else:
                    assert mine[param] is not None, f"{where} is None"
                    assert close(mine[param], g), f"{where} differs from one process"
        for param, w in ref["weights"].items():
            assert close(got["weights"][param], w), f"{name} rank {rank}: weight {param}"
