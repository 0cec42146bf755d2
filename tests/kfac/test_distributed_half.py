"""A model whose weights are 16-bit (``model.to(torch.bfloat16)``, not autocast) trains on
2 gloo ranks as in one process on the whole batch.

Gradients and preconditioned gradients are then in the weights' dtype, while factors and
inverse state are fp32.  Every buffer a collective sends must have the dtype its receivers
allocate: KAISA with fewer gradient workers than ranks once broadcast bf16 preconditioned
gradients into fp32 buffers (gloo copied the bytes: garbage of order 1e22 on the first step,
then ``linalg.eigh`` failing on the factors of the garbage weights).  Covered: KAISA f=1/2 (the
broadcast) and f=1, SP-NGD (reduce-scatter of gradients, all-gather of preconditioned ones)
and fused SP-NGD (one all-reduce), with bf16 and fp16 weights (gloo supports both dtypes
for every collective used here).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from helpers.distributed import CasesInOneLaunch, strategy_of_case
from kfacperf.kfac.preconditioner import KFACPreconditioner
from kfacperf.workloads import rank_slice

pytestmark = pytest.mark.slow

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RTOL = {"bf16": 0.06, "fp16": 0.01}  # of the largest magnitude; rounding of the averaging
STRATEGIES = ("kaisa-f1", "kaisa-f1P", "spngd", "spngd-fused")
CASES = tuple(f"{s}/{d}" for d in DTYPES for s in STRATEGIES)


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 4)
    ).to(dtype)


def train(case: str, rank: int, world: int) -> dict[str, Any]:
    """STEPS steps (factors and inverses every step); every parameter's ``.grad`` (as fp32,
    with its dtype) after each ``precond.step()``."""
    strategy, dtype_name = case.split("/")
    dtype = DTYPES[dtype_name]
    model = make_model(dtype)
    precond = KFACPreconditioner(model, damping=1e-2, lr=0.1, factor_interval=1,
                                 inverse_interval=1, strategy=strategy_of_case(strategy, WORLD))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(500 + step)
        x = torch.randn(GLOBAL_BATCH, 6, generator=g).to(dtype)
        y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
        x, y = rank_slice(x, rank, world), rank_slice(y, rank, world)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x).float(), y).backward()
        precond.step()
        grads.append({n: (str(p.grad.dtype), p.grad.detach().float().numpy().copy())
                      for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return {"grads": grads, "dtypes": {n: str(p.dtype) for n, p in model.named_parameters()}}


LAUNCH = CasesInOneLaunch(train, CASES, WORLD, timeout_s=120)
_REFERENCE: dict[str, Any] = {}


def reference(dtype_name: str) -> dict[str, Any]:
    if dtype_name not in _REFERENCE:
        torch.set_num_threads(1)
        _REFERENCE[dtype_name] = train(f"local/{dtype_name}", 0, 1)
    return _REFERENCE[dtype_name]


@pytest.mark.parametrize("case", CASES)
def test_half_weights_match_single_process(case: str) -> None:
    dtype_name = case.split("/")[1]
    ref = reference(dtype_name)
    got = LAUNCH.values(case)
    for rank, mine in enumerate(got):
        for step, (grads, want) in enumerate(zip(mine["grads"], ref["grads"])):
            assert sorted(grads) == sorted(want), f"{case} rank {rank} step {step}"
            for param, (dtype, g) in want.items():
                where = f"{case} rank {rank} step {step}: {param}.grad"
                assert grads[param][0] == mine["dtypes"][param] == dtype, (
                    f"{where} is {grads[param][0]}, the parameter "
                    f"{mine['dtypes'][param]}")
                err = float(np.abs(grads[param][1] - g).max())
                bound = RTOL[dtype_name] * max(float(np.abs(g).max()), 1e-6)
                assert err <= bound, f"{where} differs from one process by {err:.3g}"
    # Every rank ends each step with the same update, bit for bit.
    for step in range(STEPS):
        for param, (_, g0) in got[0]["grads"][step].items():
            np.testing.assert_array_equal(got[1]["grads"][step][param][1], g0,
                                          err_msg=f"{case} step {step}: {param}")
