"""BatchNorm Fisher blocks against independent references, in float64.

* per-example gradients of (γ, β) against torch.func (vmap over examples of grad), with the
  batch statistics computed here from the input;
* unit-wise and full Fisher blocks against the dense (1/N) Σ v vᵀ of those gradients;
* the preconditioned gradient against a dense solve (F + λI)⁻¹ ∇.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from kfacperf.kfac import KFACPreconditioner
from kfacperf.kfac.assignment import LayerShape, blocks_cost, spngd_assignment
from kfacperf.kfac.batchnorm import BatchNormLayer
from kfacperf.kfac.strategies.base import layer_shapes

DAMPING = 1e-2
N, C, CLASSES = 6, 3, 4


@pytest.fixture(autouse=True)
def _float64_default() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _model(dims: int) -> nn.Sequential:
    """conv/linear -> BatchNorm -> in-place ReLU -> (pool) -> linear: the head treats every
    example on its own, so each example's loss depends on its own BN output only."""
    torch.manual_seed(3)
    if dims == 2:
        return nn.Sequential(nn.Conv2d(2, C, 3, padding=1), nn.BatchNorm2d(C),
                             nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(4 * C, CLASSES))
    return nn.Sequential(nn.Linear(5, C), nn.BatchNorm1d(C), nn.ReLU(inplace=True),
                         nn.Linear(C, CLASSES))


def _batch(dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 2, 5, 5, generator=g) if dims == 2 else torch.randn(N, 5, generator=g)
    return x, torch.randint(0, CLASSES, (N,), generator=g)


def _reference_per_example(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_γ, g_β), each [N, C], by torch.func: vmap over examples of grad of that example's
    loss with respect to (γ, β), with x̂ normalised by the batch's statistics (biased var)."""
    bn, linear = model[1], model[-1]
    z = model[0](x).detach()
    dims = (0, *range(2, z.dim()))
    shape = (1, -1) + (1,) * (z.dim() - 2)
    mean = z.mean(dim=dims)
    var = ((z - mean.view(shape)) ** 2).mean(dim=dims)
    xhat = (z - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    weight, bias = linear.weight.detach(), linear.bias.detach()

    def loss(gamma: torch.Tensor, beta: torch.Tensor, xh: torch.Tensor, t: torch.Tensor
             ) -> torch.Tensor:
        """One example through the head, written out (the modules carry K-FAC hooks)."""
        h = torch.relu(gamma.view(shape[1:]) * xh + beta.view(shape[1:]))
        if h.dim() == 3:
            h = F.adaptive_avg_pool2d(h, 2)
        logits = F.linear(h.reshape(1, -1), weight, bias)
        return F.cross_entropy(logits, t.unsqueeze(0))

    g_gamma, g_beta = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        bn.weight.detach(), bn.bias.detach(), xhat, y)
    return g_gamma, g_beta


def _run(model: nn.Sequential, mode: str, method: str = "eigen", dims: int = 2
         ) -> KFACPreconditioner:
    pc = KFACPreconditioner(model, damping=DAMPING, lr=0.1, bn_blocks=mode,
                            inverse_method=method, kl_clip=None, factor_decay=0.5)
    x, y = _batch(dims)
    F.cross_entropy(model(x), y).backward()
    return pc


@pytest.mark.parametrize("dims", [1, 2])
def test_per_example_gradients_match_torch_func(dims: int) -> None:
    model = _model(dims)
    x, y = _batch(dims)
    z = model[0](x).detach()
    out = model[1](z)
    seen: list[torch.Tensor] = []
    out.register_hook(seen.append)  # the gradient of the BN output, before the in-place ReLU
    loss = F.cross_entropy(model[2:](out), y)
    loss.backward()
    (g_out,) = seen
    layer = BatchNormLayer(name="bn", module=model[1], inverse_method="eigen", mode="unit")
    g_gamma, g_beta = layer.per_example_grads(z, g_out)
    ref_gamma, ref_beta = _reference_per_example(model, x, y)
    torch.testing.assert_close(g_gamma, ref_gamma, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_beta, ref_beta, rtol=1e-10, atol=1e-12)
    # the batch gradient is the mean of the per-example ones
    torch.testing.assert_close(model[1].weight.grad, ref_gamma.mean(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("mode", ["unit", "full"])
def test_fisher_blocks_match_dense_outer_products(mode: str, dims: int) -> None:
    model = _model(dims)
    pc = _run(model, mode, dims=dims)
    x, y = _batch(dims)
    g_gamma, g_beta = _reference_per_example(model, x, y)
    v = torch.cat([g_gamma, g_beta], dim=1)  # [N, 2C], the (γ, β) concatenation
    dense = v.t() @ v / N
    got = pc.layers["1"].f_batch
    if mode == "full":
        torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-12)
    else:
        for c in range(C):
            idx = torch.tensor([c, C + c])
            torch.testing.assert_close(got[c], dense[idx][:, idx], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
@pytest.mark.parametrize("mode", ["unit", "full"])
def test_preconditioned_gradient_matches_dense_solve(mode: str, method: str) -> None:
    model = _model(2)
    pc = _run(model, mode, method)
    x, y = _batch(2)
    g_gamma, g_beta = _reference_per_example(model, x, y)
    v = torch.cat([g_gamma, g_beta], dim=1)
    dense = v.t() @ v / N
    if mode == "unit":  # keep only each channel's 2x2 block
        mask = torch.zeros(2 * C, 2 * C, dtype=torch.bool)
        for c in range(C):
            for i in (c, C + c):
                mask[i, c] = mask[i, C + c] = True
        dense = dense * mask
    bn = model[1]
    gradient = torch.cat([bn.weight.grad, bn.bias.grad])
    expected = torch.linalg.solve(dense + DAMPING * torch.eye(2 * C), gradient)
    pc.step()
    got = pc.layers["1"].precond_grad  # [C, 2]: columns (γ, β)
    torch.testing.assert_close(got.t().reshape(-1), expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(torch.cat([bn.weight.grad, bn.bias.grad]), expected,
                               rtol=1e-8, atol=1e-12)


def test_none_leaves_batchnorm_to_the_first_order_optimizer() -> None:
    model = _model(2)
    pc = KFACPreconditioner(model, damping=DAMPING, lr=0.1)
    assert list(pc.layers) == ["0", "5"]
    assert pc.other_params == ["1.weight", "1.bias"]
    with_blocks = KFACPreconditioner(_model(2), damping=DAMPING, lr=0.1, bn_blocks="full")
    assert list(with_blocks.layers) == ["0", "1", "5"] and with_blocks.other_params == []


def test_bad_option_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown bn_blocks .diag.; use one of none, unit, full"):
        KFACPreconditioner(_model(2), damping=DAMPING, lr=0.1, bn_blocks="diag")


def test_placement_cost_of_batchnorm_blocks() -> None:
    """A block stack costs count * n**3: 8C unit-wise, (2C)**3 full, next to A**3 + G**3."""
    for mode, cost in (("unit", 8 * C), ("full", (2 * C) ** 3)):
        pc = KFACPreconditioner(_model(2), damping=DAMPING, lr=0.1, bn_blocks=mode)
        shapes = {s.name: s for s in layer_shapes(pc.layers)}
        assert shapes["1"].cost == cost
        assert shapes["0"].cost == 19 ** 3 + C ** 3  # conv: A = 2*3*3 + bias, G = C
    assert blocks_cost([(2, 64), (3, 1)]) == 8 * 64 + 27
    owner = spngd_assignment([LayerShape(name="conv", dim_a=5, dim_g=5),
                              LayerShape(name="bn", dim_a=2, dim_g=200, blocks=((400, 1),))],
                             2).inverse_worker
    assert owner == {"conv": 1, "bn": 0}  # the full 2C x 2C block is the larger job
