"""Kronecker factors of Linear and Conv2d against independent references (float64)."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfacperf.kfac import KFACPreconditioner
from kfacperf.kfac.conv_factors import patch_moments


@pytest.fixture(autouse=True)
def _float64_default() -> Iterator[None]:
    """Run this module in float64 without leaking the default dtype into other tests."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _precond(model: nn.Module) -> KFACPreconditioner:
    return KFACPreconditioner(model, damping=1e-3, lr=0.1, kl_clip=None)


def _grad_matrix(layer: nn.Module) -> torch.Tensor:
    g = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        g = torch.cat([g, layer.bias.grad[:, None]], dim=1)
    return g


@pytest.mark.parametrize("bias", [True, False])
def test_single_example_fisher_identity(bias: bool) -> None:
    """N = 1, no averaging: G ⊗ A equals vec(∇W) vec(∇W)ᵀ (row-major vec)."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=bias)
    model = nn.Sequential(layer, nn.Tanh())
    precond = _precond(model)
    x = torch.randn(1, 5)
    out = model(x)
    loss = (out * torch.randn(1, 3)).sum() + out.pow(2).sum()
    loss.backward()
    grad = _grad_matrix(layer).reshape(-1)
    state = precond.layers["0"]
    fisher = torch.kron(state.g_batch, state.a_batch)
    torch.testing.assert_close(fisher, torch.outer(grad, grad), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_match_per_example_gradients(bias: bool) -> None:
    """A = (1/N) Σ aaᵀ and G = (1/N) Σ δδᵀ with δᵢ from a separate backward of example i."""
    torch.manual_seed(1)
    n = 6
    layer = nn.Linear(4, 3, bias=bias)
    head = nn.Linear(3, 2)
    model = nn.Sequential(layer, nn.Tanh(), head)
    precond = _precond(model)
    x, t = torch.randn(n, 4), torch.randn(n, 2)

    def example_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).pow(2).sum()

    loss = torch.stack([example_loss(model(x[i : i + 1]), t[i]) for i in range(n)]).mean()
    model.zero_grad()
    out = model(x)  # one batched forward for the hooks
    (sum(example_loss(out[i], t[i]) for i in range(n)) / n).backward()
    assert torch.isclose(loss, (out - t).pow(2).sum(1).mean())

    deltas = []
    for i in range(n):
        z = layer(x[i : i + 1]).detach().requires_grad_(True)
        (d,) = torch.autograd.grad(example_loss(head(torch.tanh(z)), t[i]), z)
        deltas.append(d[0])
    delta = torch.stack(deltas)
    a = torch.cat([x, torch.ones(n, 1)], dim=1) if bias else x
    state = precond.layers["0"]
    torch.testing.assert_close(state.a_batch, a.t() @ a / n)
    torch.testing.assert_close(state.g_batch, delta.t() @ delta / n)


def test_linear_sequence_input_rows() -> None:
    """[B, T, F] input: A is the mean over B·T rows, G = B Σ_rows g gᵀ (N = B examples)."""
    torch.manual_seed(2)
    b, t, f = 3, 5, 4
    layer = nn.Linear(f, 2)
    precond = _precond(layer)
    x = torch.randn(b, t, f)
    out = layer(x)
    out.retain_grad()
    out.pow(2).sum(dim=(1, 2)).mean().backward()
    a = torch.cat([x.reshape(-1, f), torch.ones(b * t, 1)], dim=1)
    g = out.grad.reshape(-1, 2)
    state = precond.layers["<model>"]
    torch.testing.assert_close(state.a_batch, a.t() @ a / (b * t))
    torch.testing.assert_close(state.g_batch, b * g.t() @ g)


def _source_index(idx: int, size: int, mode: str) -> int | None:
    """Which input pixel a padded coordinate reads (None for zero padding)."""
    if 0 <= idx < size:
        return idx
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -idx if idx < 0 else 2 * (size - 1) - idx
    if mode == "circular":
        return idx % size
    raise AssertionError(mode)


def _loop_patches(x: torch.Tensor, conv: nn.Conv2d, out_hw: tuple[int, int]) -> torch.Tensor:
    """Every patch as a row, by explicit loops: rows ordered (n, oh, ow), columns (c, i, j)."""
    n_ex, c_in, h, w = x.shape
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    if conv.padding == "same":
        ph = (dh * (kh - 1)) // 2
        pw = (dw * (kw - 1)) // 2
    elif conv.padding == "valid":
        ph = pw = 0
    else:
        ph, pw = conv.padding
    rows = []
    for n in range(n_ex):
        for oh in range(out_hw[0]):
            for ow in range(out_hw[1]):
                patch = []
                for c in range(c_in):
                    for i in range(kh):
                        for j in range(kw):
                            r = _source_index(oh * sh + i * dh - ph, h, conv.padding_mode)
                            q = _source_index(ow * sw + j * dw - pw, w, conv.padding_mode)
                            patch.append(0.0 if r is None or q is None else float(x[n, c, r, q]))
                rows.append(patch)
    return torch.tensor(rows)


CONV_CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=1, bias=False),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=3, padding="valid", stride=2, bias=False),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=(3, 2), stride=2, padding=1, padding_mode="circular"),
]


@pytest.mark.parametrize("case", CONV_CASES,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv_factors_against_explicit_loops(case: dict) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, **case)
    precond = _precond(conv)
    x = torch.randn(2, 3, 7, 6)
    out = conv(x)
    out.retain_grad()
    (out.tanh() * torch.randn_like(out)).sum(dim=(1, 2, 3)).mean().backward()
    n, ho, wo = out.shape[0], out.shape[2], out.shape[3]

    patches = _loop_patches(x, conv, (ho, wo))  # (R, C·kh·kw)
    if conv.bias is not None:
        patches = torch.cat([patches, torch.ones(len(patches), 1)], dim=1)
    g = out.grad.permute(0, 2, 3, 1).reshape(-1, out.shape[1])  # rows (n, oh, ow)
    rows = n * ho * wo
    state = precond.layers["<model>"]
    assert state.dim_a == patches.shape[1] and state.dim_g == 4
    torch.testing.assert_close(state.a_batch, patches.t() @ patches / rows)
    torch.testing.assert_close(state.g_batch, n * g.t() @ g)
    # the patch order matches the weight layout: Σ_r g_r a_rᵀ is the gradient matrix
    torch.testing.assert_close(g.t() @ patches, _grad_matrix(conv))


def test_patch_moments_match_unfold_over_many_shapes() -> None:
    """The displacement-Gram computation equals unfold + GEMM (zero padding)."""
    torch.manual_seed(4)
    for k, s, d, p in itertools.product([(3, 3), (2, 3), (5, 1)], [1, 2, (1, 3)], [1, 2],
                                        [0, 1, 2]):
        conv = nn.Conv2d(3, 2, k, stride=s, dilation=d, padding=p)
        x = torch.randn(2, 3, 11, 9)
        try:
            conv(x)
        except RuntimeError:
            continue  # kernel larger than the padded input
        gram, total, rows = patch_moments(x, conv)
        u = F.unfold(x, k, dilation=d, padding=p, stride=s)
        m = u.transpose(0, 1).reshape(u.shape[1], -1)
        assert rows == m.shape[1]
        torch.testing.assert_close(gram, m @ m.t())
        torch.testing.assert_close(total, m.sum(dim=1))


def test_factor_flops_follow_the_algorithm_used() -> None:
    """Linear: two Gram GEMMs over the rows; 3x3 conv: 3 + 2·5 displacement GEMMs per position."""
    linear = nn.Linear(4, 3)
    x, g = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    state = _precond(linear).layers["<model>"]
    assert state.factor_flops(x, g) == 2 * 10 * 4**2 + 2 * 10 * 3**2
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x, g = torch.randn(2, 3, 7, 6), torch.randn(2, 4, 7, 6)
    state = _precond(conv).layers["<model>"]
    padded_positions = 9 * 8
    assert state.factor_flops(x, g) == (2 * 2 * padded_positions * 3**2 * (3 + 2 * 5)
                                        + 2 * (2 * 7 * 6) * 4**2)


def test_patch_moments_in_column_step_chunks_match_unfold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small memory budget splits the displacement GEMMs; the result must not change."""
    from kfacperf.kfac import conv_factors

    torch.manual_seed(5)
    conv = nn.Conv2d(4, 2, (3, 5), padding=(1, 2), dilation=(1, 2))
    x = torch.randn(3, 4, 6, 9)
    monkeypatch.setattr(conv_factors, "_GRAM_BUDGET", 2 * (6 + 2) * (9 + 4) * 4 * 4)
    gram, total, _ = patch_moments(x, conv)
    u = F.unfold(x, (3, 5), dilation=(1, 2), padding=(1, 2))
    m = u.transpose(0, 1).reshape(u.shape[1], -1)
    torch.testing.assert_close(gram, m @ m.t())
    torch.testing.assert_close(total, m.sum(dim=1))


def test_unbatched_conv_input_is_one_example() -> None:
    """An unbatched ``[C, H, W]`` input is one example (N = 1), not C of them: its factors
    are those of the same input with a batch dimension of one."""
    torch.manual_seed(21)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(3, 5, 5)
    grad = torch.randn(4, 5, 5)
    unbatched, batched = _precond(conv), _precond(conv)
    layer, ref = unbatched.layers["<model>"], batched.layers["<model>"]
    layer.compute_batch_factors(x, grad)
    ref.compute_batch_factors(x[None], grad[None])
    torch.testing.assert_close(layer.a_batch, ref.a_batch)
    torch.testing.assert_close(layer.g_batch, ref.g_batch)
    rows = grad.reshape(4, -1)
    torch.testing.assert_close(layer.g_batch, rows @ rows.t())  # N Σ g gᵀ with N = 1


@pytest.mark.parametrize("batch_first", [True, False])
def test_sequence_first_linear_input_counts_examples_along_its_batch_dimension(
        batch_first: bool) -> None:
    """A Linear on N=2 sequences of T=8 positions, the loss the mean over the sequences of
    each one's sum over positions: G = (1/N) Σ_{n,t} e eᵀ with e the per-position gradient
    of a sequence's own loss (a dense reference from autograd), and A = the mean of
    [x,1][x,1]ᵀ over all N·T rows, whichever dimension holds the examples, as long as the
    preconditioner is told which (batch_first)."""
    torch.manual_seed(5)
    n, t = 2, 8
    lin = nn.Linear(3, 4)
    x_bf, y_bf = torch.randn(n, t, 3), torch.randn(n, t, 4)
    x, y = (x_bf, y_bf) if batch_first else (x_bf.transpose(0, 1), y_bf.transpose(0, 1))
    out = lin(x)
    out.retain_grad()
    (((out - y) ** 2).sum() / 2 / n).backward()  # mean over the N sequences
    precond = KFACPreconditioner(lin, damping=1e-3, lr=0.1, batch_first=batch_first)
    layer = precond.layers["<model>"]
    layer.compute_batch_factors(x, out.grad)
    e = (lin(x_bf) - y_bf).detach().reshape(-1, 4)  # each position's own gradient
    torch.testing.assert_close(layer.g_batch, e.t() @ e / n)
    rows = torch.cat([x_bf.reshape(-1, 3), torch.ones(n * t, 1)], dim=1)
    torch.testing.assert_close(layer.a_batch, rows.t() @ rows / (n * t))


def test_batch_first_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="batch_first must be True or False"):
        KFACPreconditioner(nn.Linear(3, 4), damping=1e-3, lr=0.1, batch_first="no")  # type: ignore[arg-type]
