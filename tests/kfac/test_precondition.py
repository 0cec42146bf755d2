"""Preconditioned gradients against a dense float64 solve; degenerate factors; KL clip."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from kfacperf.kfac import KFACPreconditioner, inverse

DAMPING = 1e-3


def _grad_matrix(layer: nn.Module) -> torch.Tensor:
    g = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        g = torch.cat([g, layer.bias.grad[:, None]], dim=1)
    return g.double()


def _layer_and_batch(kind: str, bias: bool) -> tuple[nn.Module, torch.Tensor]:
    if kind == "linear":
        return nn.Linear(9, 6, bias=bias), torch.randn(64, 9)
    return nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=bias), torch.randn(16, 3, 8, 8)


def _dense_solve(g_mat: torch.Tensor, a_mat: torch.Tensor, grad: torch.Tensor,
                 damping: float) -> torch.Tensor:
    """(G ⊗ A + damping·I)⁻¹ vec(grad), row-major vec, float64."""
    big = torch.kron(g_mat, a_mat) + damping * torch.eye(g_mat.shape[0] * a_mat.shape[0],
                                                         dtype=torch.float64)
    return torch.linalg.solve(big, grad.reshape(-1)).reshape(grad.shape)


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_preconditioned_gradient_matches_dense_float64_solve(kind: str, bias: bool,
                                                             method: str) -> None:
    torch.manual_seed(10)
    layer, x = _layer_and_batch(kind, bias)  # float32 model, float64 oracle
    precond = KFACPreconditioner(layer, damping=DAMPING, lr=0.1, inverse_method=method,
                                 kl_clip=None)
    out = layer(x)
    target = torch.randn_like(out)
    (out - target).pow(2).flatten(1).sum(1).mean().backward()
    grad = _grad_matrix(layer)
    state = precond.layers["<model>"]
    precond.step()

    a = state.a_factor.double()
    g = state.g_factor.double()
    if method == "eigen":
        expected = _dense_solve(g, a, grad, DAMPING)
    else:
        pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
        root = math.sqrt(DAMPING)
        a_d = a + pi * root * torch.eye(a.shape[0], dtype=torch.float64)
        g_d = g + root / pi * torch.eye(g.shape[0], dtype=torch.float64)
        expected = _dense_solve(g_d, a_d, grad, 0.0)
    got = _grad_matrix(layer)
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_cholesky_damping_is_invariant_to_factor_rescaling() -> None:
    """π-damping: A → cA, G → G/c leaves the preconditioned gradient unchanged."""
    torch.manual_seed(11)
    layer, x = _layer_and_batch("linear", True)
    precond = KFACPreconditioner(layer, damping=DAMPING, lr=0.1, inverse_method="cholesky",
                                 kl_clip=None)
    layer(x).pow(2).sum().backward()
    precond.step()
    state = precond.layers["<model>"]
    state.load_grad()
    results = []
    for c in (1.0, 37.0):
        scaled = copy.copy(state)
        scaled.a_factor = state.a_factor * c
        scaled.g_factor = state.g_factor / c
        inverse.compute_inverse(scaled, damping=DAMPING)
        inverse.precondition(scaled, damping=DAMPING)
        results.append(scaled.precond_grad.double())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-8)


def _all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_dead_relu_and_constant_inputs_give_finite_updates(method: str) -> None:
    torch.manual_seed(12)
    first, second = nn.Linear(6, 8), nn.Linear(8, 3)
    with torch.no_grad():
        first.bias.fill_(-100.0)  # every ReLU dead: second's input is 0, first's G is 0
    model = nn.Sequential(first, nn.ReLU(), second)
    precond = KFACPreconditioner(model, damping=DAMPING, lr=0.1, inverse_method=method)
    x = torch.ones(32, 6)  # constant inputs: first's A has rank 1
    for _ in range(3):
        model.zero_grad()
        model(x).pow(2).sum().backward()
        precond.step()
        assert _all_finite(model)
    assert torch.count_nonzero(first.weight.grad) == 0  # a zero gradient stays zero
    assert torch.count_nonzero(precond.layers["0"].g_factor) == 0


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_zero_input_without_bias_and_huge_inputs_give_finite_updates(method: str) -> None:
    torch.manual_seed(13)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 16, 2))
    precond = KFACPreconditioner(model, damping=DAMPING, lr=0.1, inverse_method=method)
    for scale in (0.0, 1e6):
        model.zero_grad()
        model(scale * torch.randn(4, 2, 4, 4)).pow(2).mean().backward()
        precond.step()
        assert _all_finite(model)
    assert precond.layers["0"].a_factor.abs().max() > 0


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_frozen_bias_is_no_part_of_the_block_and_keeps_no_gradient(method: str) -> None:
    """A Linear whose bias is frozen is preconditioned as the same layer without a bias
    (A has no homogeneous 1), and the frozen bias gets no ``.grad`` an optimizer would apply."""
    torch.manual_seed(15)
    frozen = nn.Linear(6, 4)
    frozen.bias.requires_grad_(False)
    plain = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        plain.weight.copy_(frozen.weight)
    x, target = torch.randn(32, 6), torch.randn(32, 4)
    preconds = {}
    for layer in (frozen, plain):
        precond = preconds[id(layer)] = KFACPreconditioner(
            layer, damping=DAMPING, lr=0.1, inverse_method=method, kl_clip=1e-3)
        # the same output, so the same output gradient and G
        out = layer(x) if layer is frozen else layer(x) + frozen.bias
        (out - target).pow(2).sum(1).mean().backward()
        precond.step()
    assert frozen.bias.grad is None
    assert preconds[id(frozen)].layers["<model>"].dim_a == 6
    torch.testing.assert_close(frozen.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-8)
    bias_before = frozen.bias.detach().clone()
    torch.optim.SGD(frozen.parameters(), lr=0.1).step()
    torch.testing.assert_close(frozen.bias.detach(), bias_before, rtol=0, atol=0)


def test_kl_clip_scales_the_update_by_the_closed_form_factor() -> None:
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    clipped = copy.deepcopy(model)
    x = torch.randn(20, 5)
    lr, kl_clip = 0.3, 1e-6
    free = KFACPreconditioner(model, damping=DAMPING, lr=lr, kl_clip=None)
    clip = KFACPreconditioner(clipped, damping=DAMPING, lr=lr, kl_clip=kl_clip)
    for m, p in ((model, free), (clipped, clip)):
        m(x).pow(2).sum().backward()
        raw = [_grad_matrix(m[i]) for i in (0, 2)]
        p.step()
        if p is free:
            raw_free = raw
    pre = [_grad_matrix(model[i]) for i in (0, 2)]
    vg = sum((pg * g).sum() for pg, g in zip(pre, raw_free)) * lr**2
    nu = min(1.0, math.sqrt(kl_clip / vg))
    assert nu < 1.0
    for i, pg in zip((0, 2), pre):
        torch.testing.assert_close(_grad_matrix(clipped[i]), nu * pg, rtol=1e-5, atol=1e-9)
    assert clip.last_kl_scale is not None
    assert math.isclose(float(clip.last_kl_scale), nu, rel_tol=1e-5)


def test_kl_clip_scale_is_one_for_small_updates_and_zero_gradients() -> None:
    one = inverse.kl_clip_scale([torch.tensor(1e-12)], lr=0.1, kl_clip=1e-3)
    zero = inverse.kl_clip_scale([torch.tensor(0.0), torch.tensor(0.0)], lr=0.1, kl_clip=1e-3)
    assert float(one) == 1.0 and float(zero) == 1.0
    assert float(inverse.kl_clip_scale([], lr=0.1, kl_clip=1e-3)) == 1.0
