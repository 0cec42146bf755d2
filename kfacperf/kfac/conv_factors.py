"""Second moment of a convolution's input patches without materialising the patches.

The A factor of a Conv2d needs ``Σ_r a_r a_rᵀ`` over every patch ``a_r`` (R = N·H_out·W_out
rows of length K = C·kh·kw).  Unfolding and one GEMM cost ``2·R·K²`` FLOPs plus two copies
of a K×R matrix — several times the layer's own forward pass for 3x3 kernels.

Here the same sums are computed exactly from the *padded image*.  The (c, i, j), (c', i', j')
entry of the sum is ``Σ_n Σ_{u ∈ W(i,j)} x[n, c, u] · x[n, c', u + δ]`` where ``u`` runs over
the window W(i, j) of image positions that kernel tap (i, j) visits and ``δ`` is the
displacement between taps (i, j) and (i', j').  So:

1. For each distinct displacement δ (about half of the (2kh-1)(2kw-1), the rest follow by
   transposition), the per-position Gram ``PG_δ[u] = Σ_n x[:, u] x[:, u+δ]ᵀ`` over all
   padded positions is one batched GEMM (``2·N·Hp·Wp·C²`` FLOPs: ~13/81 of the unfold
   GEMM for 3x3 kernels).  Positions are flattened row-major, so the shift by δ is a slice
   of the flat position axis (pairs that wrap across a row are never read).
2. Each tap pair's entry is the sum of ``PG_δ`` over that tap's window, a strided view
   (stride, dilation) of ``PG_δ``, read once per tap pair.

Padding of any mode is applied explicitly first, exactly as the module pads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padded_input(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The input as the convolution sees it: ``[N, C, Hp, Wp]`` after the module's padding."""
    if x.dim() == 3:  # unbatched [C, H, W]
        x = x.unsqueeze(0)
    if conv.padding == "valid":
        return x
    if isinstance(conv.padding, str):  # "same"
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
    else:
        top = bottom = conv.padding[0]
        left = right = conv.padding[1]  # type: ignore[misc]
    if top == bottom == left == right == 0:
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, (left, right, top, bottom), mode=mode)


def _positions_major(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, tuple[int, int]]:
    """The padded input as a contiguous ``[Hp·Wp, N, C]`` tensor.

    Padding in NCHW and then one 2-D transpose of the ``(N·C, Hp·Wp)`` matrix is several
    times faster than a 4-D permute copy.
    """
    xp = padded_input(x, conv).contiguous()
    n, c, hp, wp = xp.shape
    return xp.view(n * c, hp * wp).t().contiguous().view(hp * wp, n, c), (hp, wp)


def _top_padding(conv: nn.Conv2d) -> int:
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        return conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
    return int(conv.padding[0])  # type: ignore[index]


def output_size(padded_hw: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    (hp, wp), (kh, kw) = padded_hw, conv.kernel_size
    (dh, dw), (sh, sw) = conv.dilation, conv.stride
    return (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1


def patch_moments(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor, int]:
    """``(Σ_r a_r a_rᵀ, Σ_r a_r, R)`` over all patches of ``conv``'s input ``x``.

    Entries are in :func:`torch.nn.functional.unfold` order, ``c·kh·kw + i·kw + j``, the
    order of ``conv.weight.reshape(out, -1)``.
    """
    flat, (hp, wp) = _positions_major(x, conv)  # flat[p] = (N, C) slab of position p
    n, c = flat.shape[1], flat.shape[2]
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    sh, sw = conv.stride
    ho, wo = output_size((hp, wp), conv)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input of spatial size {tuple(x.shape[-2:])} is smaller than the kernel")
    cc = c * c
    # image rows inside the padded input, when the padding is zeros
    zero_pad = conv.padding_mode == "zeros"
    rows_lo = _top_padding(conv)
    rows_hi = rows_lo + (x.shape[-2])
    blocks = flat.new_empty(kh, kw, kh, kw, c, c)  # [i, j, i', j', c, c']
    for di in range(kh):
        for dj in range(-(kw - 1), kw):
            if di == 0 and dj < 0:
                continue  # the transpose of displacement (0, -dj)
            off = di * dh * wp + dj * dw
            # pg[p] = X[p]ᵀ X[p + off] for every p with p + off in range; with zero padding
            # only rows where both p and p + off can be inside the image are nonzero
            pg = flat.new_zeros(hp * wp - off, c, c) if zero_pad else None
            lo = rows_lo * wp if zero_pad else 0
            hi = min((rows_hi - di * dh) * wp, hp * wp - off) if zero_pad else hp * wp - off
            if hi > lo:
                prod = torch.bmm(flat[lo:hi].transpose(1, 2), flat[lo + off : hi + off],
                                 out=None if pg is None else pg[lo:hi])
                pg = prod if pg is None else pg
            i0, i1 = 0, kh - di  # taps (i, j) whose partner (i + di, j + dj) exists
            j0, j1 = max(0, -dj), kw - max(0, dj)
            ni, nj = i1 - i0, j1 - j0
            # window sums, separably: over output rows for each tap row i (all the columns
            # any tap j reads), then over output columns for each tap column j
            width = (nj - 1) * dw + (wo - 1) * sw + 1
            rows = pg.as_strided(
                size=(ni, ho, width, cc),
                stride=(dh * wp * cc, sh * wp * cc, cc, 1),
                storage_offset=(i0 * dh * wp + j0 * dw) * cc,
            ).sum(dim=1)  # [i, column, c·c']
            sums = rows.as_strided(
                size=(ni, nj, wo, cc), stride=(width * cc, dw * cc, sw * cc, 1)
            ).sum(dim=2).reshape(ni * nj, c, c)
            ii = torch.arange(i0, i1).repeat_interleave(nj)
            jj = torch.arange(j0, j1).repeat(ni)
            blocks[ii, jj, ii + di, jj + dj] = sums
            if di or dj:
                blocks[ii + di, jj + dj, ii, jj] = sums.transpose(1, 2)
    k = c * kh * kw
    gram = blocks.permute(4, 0, 1, 5, 2, 3).reshape(k, k)
    col = flat.sum(dim=1)  # (positions, C): sum over examples
    taps = col.as_strided(
        size=(kh, kw, ho, wo, c),
        stride=(dh * wp * c, dw * c, sh * wp * c, sw * c, 1),
    ).sum(dim=(2, 3))  # [i, j, c]
    total = taps.permute(2, 0, 1).reshape(k)
    return gram, total, n * ho * wo
