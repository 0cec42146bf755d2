"""patch_moments with its scratch workspace warm: reused buffers must not change any result."""
from __future__ import annotations

import itertools
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfacperf.kfac import conv_factors
from kfacperf.kfac.conv_factors import clear_workspace, patch_moments


def _unfold_moments(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Reference in float64: explicit padding (any mode) + unfold + one GEMM."""
    xp = conv_factors.padded_input(x.double(), conv)
    u = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    m = u.transpose(0, 1).reshape(u.shape[1], -1)
    return m @ m.t(), m.sum(dim=1), m.shape[1]


def _without_reuse(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor, int]:
    """patch_moments with every scratch tensor freshly allocated (nothing is kept)."""
    limit = conv_factors._WORKSPACE_MAX_BYTES
    conv_factors._WORKSPACE_MAX_BYTES = -1
    try:
        return patch_moments(x, conv)
    finally:
        conv_factors._WORKSPACE_MAX_BYTES = limit


def _check(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal to the float64 unfold reference (to rounding) and bitwise to a run without reuse."""
    gram, total, rows = patch_moments(x, conv)
    ref_gram, ref_total, ref_rows = _unfold_moments(x, conv)
    assert rows == ref_rows
    tol = 1e-5 if x.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(gram.double(), ref_gram, rtol=tol, atol=tol * ref_gram.abs().max())
    torch.testing.assert_close(total.double(), ref_total, rtol=tol,
                               atol=tol * ref_total.abs().max())
    fresh_gram, fresh_total, _ = _without_reuse(x, conv)
    assert torch.equal(gram, fresh_gram) and torch.equal(total, fresh_total)
    return gram, total


# large-to-small and small-to-large transitions, zero and non-zero padding, dilation, stride
CASES = [
    (dict(kernel_size=3, padding=1), (4, 3, 11, 9)),
    (dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (2, 3, 7, 6)),
    (dict(kernel_size=3, padding=2, padding_mode="reflect"), (3, 3, 6, 8)),
    (dict(kernel_size=(5, 1), stride=2, padding=2), (2, 3, 13, 5)),
    (dict(kernel_size=3, padding="same", dilation=2), (1, 3, 9, 9)),
    (dict(kernel_size=3, padding="valid", stride=(1, 3)), (5, 3, 8, 10)),
    (dict(kernel_size=(3, 2), stride=2, padding=1, padding_mode="circular"), (2, 3, 7, 6)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warm_workspace_is_exact_for_repeated_and_interleaved_shapes(dtype: torch.dtype) -> None:
    torch.manual_seed(11)
    clear_workspace()
    convs = [nn.Conv2d(3, 2, **kw).to(dtype) for kw, _ in CASES]
    for order in (range(len(CASES)), reversed(range(len(CASES))),
                  [0, 0, 3, 3, 1, 5, 1, 2, 6, 4, 0]):
        for i in order:
            x = torch.randn(CASES[i][1], dtype=dtype)
            _check(x, convs[i])
    # poison the kept buffers: anything read without being written in this call shows up
    for buf in conv_factors._WORKSPACE.buffers.values():
        buf.fill_(float("nan"))
    for i in itertools.chain(range(len(CASES)), range(len(CASES))):
        _check(torch.randn(CASES[i][1], dtype=dtype), convs[i])


def test_poisoned_workspace_in_column_step_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked path reuses one Gram buffer per chunk; stale values must never leak in."""
    torch.manual_seed(12)
    conv = nn.Conv2d(4, 2, (3, 5), padding=(1, 2), dilation=(1, 2))
    monkeypatch.setattr(conv_factors, "_GRAM_BUDGET", 2 * (6 + 2) * (9 + 4) * 4 * 4)
    _check(torch.randn(3, 4, 6, 9), conv)
    for buf in conv_factors._WORKSPACE.buffers.values():
        buf.fill_(float("nan"))
    _check(torch.randn(3, 4, 6, 9), conv)
    _check(torch.randn(2, 4, 8, 7), conv)


def test_results_do_not_alias_the_workspace() -> None:
    torch.manual_seed(13)
    clear_workspace()
    for kernel in [3, 1]:  # a 1x1 kernel makes the tap-block permute a view
        conv = nn.Conv2d(3, 2, kernel, padding=kernel // 2)
        x = torch.randn(2, 3, 7, 6)
        gram, total, _ = patch_moments(x, conv)
        kept_gram, kept_total = gram.clone(), total.clone()
        patch_moments(torch.randn(2, 3, 7, 6), conv)
        for buf in conv_factors._WORKSPACE.buffers.values():
            buf.fill_(float("nan"))
        assert torch.equal(gram, kept_gram) and torch.equal(total, kept_total)


def test_workspace_memory_is_bounded_across_many_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """One buffer per role and dtype, as large as the largest request; oversized ones not kept."""
    torch.manual_seed(14)
    clear_workspace()
    conv = nn.Conv2d(2, 2, 3, padding=1)
    for h, w, n in itertools.product(range(3, 12, 2), range(3, 12, 3), [1, 3]):
        patch_moments(torch.randn(n, 2, h, w), conv)
    buffers = conv_factors._WORKSPACE.buffers
    assert {key[0] for key in buffers} == {"by_position", "positions", "grams", "row_sums"}
    assert len(buffers) == 4
    assert all(b.dtype == torch.float32 for b in buffers.values())
    largest = sum(b.numel() for b in buffers.values())
    patch_moments(torch.randn(1, 2, 3, 3), conv)  # a small call keeps, not shrinks, buffers
    assert sum(b.numel() for b in buffers.values()) == largest
    monkeypatch.setattr(conv_factors, "_WORKSPACE_MAX_BYTES", 0)
    clear_workspace()
    patch_moments(torch.randn(2, 2, 5, 5), conv)
    assert not buffers


def test_threads_use_separate_workspaces() -> None:
    torch.manual_seed(15)
    conv_a, conv_b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 2, (2, 3), stride=2)
    inputs = [(torch.randn(2, 3, 9, 8), conv_a), (torch.randn(3, 3, 7, 11), conv_b)] * 10
    errors: list[BaseException] = []

    def work(order: list) -> None:
        try:
            for x, conv in order:
                _check(x, conv)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(inputs,)),
               threading.Thread(target=work, args=(inputs[::-1],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
