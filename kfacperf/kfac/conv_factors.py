"""Second moment of a convolution's input patches without materialising the patches.

The A factor of a Conv2d needs ``Σ_r a_r a_rᵀ`` over every patch ``a_r`` (R = N·H_out·W_out
rows of length K = C·kh·kw).  Unfolding and one GEMM cost ``2·R·K²`` FLOPs plus two copies
of a K×R matrix — several times the layer's own forward pass for 3x3 kernels.

Here the same sums are computed exactly from the padded image.  The (c, i, j), (c', i', j')
entry is ``Σ_n Σ_{u ∈ W(i,j)} x[n, c, u] · x[n, c', u + δ]`` where ``u`` runs over the window
W(i, j) of padded-image positions that kernel tap (i, j) visits and δ is the displacement
from tap (i, j) to tap (i', j').  So:

1. Per-position Grams ``PG_δ[u] = Σ_n x[:, u] x[:, u+δ]ᵀ`` for every displacement δ with a
   non-negative row step (the others are transposes): ~(kh·(2kw-1))/(kh·kw)² of the unfold
   GEMM's FLOPs (15/81 for 3x3).  Positions are flattened row-major in a ``[P, C, N]``
   layout, so for one row step the ``2kw-1`` column steps are consecutive positions and
   ``[x[u+δ]]_δ`` is a plain strided matrix: one batched GEMM per row step.  Products of
   positions that wrap across a row are computed but never read.
2. Each tap pair's entry is the sum of ``PG_δ`` over that tap's window: a strided view
   (stride, dilation) of ``PG_δ``, summed over output rows, then output columns.

Padding of any mode is applied first, exactly as the module pads; with zero padding, rows
whose products are all zero are skipped.

The large temporaries (the position-major input, the per-position Grams and their row sums,
up to tens of MiB per call) come from a per-thread workspace that is reused across calls on
CPU.  Fresh blocks of that size are above glibc's mmap threshold, so allocating them on every
call paid page faults for every page touched: ResNet-20's conv factors at batch 32 took about
2.5x as long as with the same buffers reused.  Every scratch element that a computation reads
is written (or explicitly zeroed) in the same call, so reuse does not change any result.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Workspace(threading.local):
    """Per-thread scratch buffers, one growable flat buffer per (role, dtype, device, mode)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device, bool], Tensor] = {}


_WORKSPACE = _Workspace()
_WORKSPACE_MAX_BYTES = 1 << 28  # a scratch tensor larger than this is allocated, not kept


def _scratch(role: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised contiguous ``shape`` tensor of ``like``'s dtype and device.

    On CPU it is a view of a buffer kept for ``role`` and reused by later calls in this
    thread, so at most one buffer per role, dtype and inference mode is held (each as large
    as the largest request up to ``_WORKSPACE_MAX_BYTES``).  Callers must write every
    element they later read.  Not reused on accelerators (their caching allocators already
    reuse blocks, and reuse across streams would need synchronisation).  The factors are
    statistics of detached inputs; the ``out=`` products here do not support autograd.
    """
    numel = 1
    for size in shape:
        numel *= size
    reuse = like.device.type == "cpu" and numel * like.element_size() <= _WORKSPACE_MAX_BYTES
    if not reuse:
        return like.new_empty(shape)
    key = (role, like.dtype, like.device, torch.is_inference_mode_enabled())
    buffers = _WORKSPACE.buffers
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # free the smaller buffer before allocating its successor
        buf = like.new_empty(numel)
        buffers[key] = buf
    return buf[:numel].view(shape)


def clear_workspace() -> None:
    """Release this thread's scratch buffers (they are otherwise kept for reuse)."""
    _WORKSPACE.buffers.clear()


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
        left = right = conv.padding[1]
    if top == bottom == left == right == 0:
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, (left, right, top, bottom), mode=mode)


def _positions_major(x: Tensor, conv: nn.Conv2d, margin: int) -> tuple[Tensor, int, int]:
    """The padded input as a ``[margin + Hp·Wp + margin, C, N]`` tensor, zero margins.

    Built from one 2-D transpose of the ``(N, C·H·W)`` input and one copy of N-long runs
    (a direct 4-D permute copy is several times slower).
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    zero_pad = conv.padding_mode == "zeros" and conv.padding != "same"
    src = x if zero_pad else padded_input(x, conv)
    n, c, h, w = src.shape
    # a string padding here is "valid" ("same" is not zero_pad)
    ph, pw = (0, 0) if (isinstance(conv.padding, str) or not zero_pad) else conv.padding
    hp, wp = h + 2 * ph, w + 2 * pw
    by_position = _scratch("by_position", (c * h * w, n), src)
    by_position.copy_(src.reshape(n, c * h * w).t())
    by_position = by_position.view(c, h, w, n)
    flat = _scratch("positions", (margin + hp * wp + margin, c, n), src)
    grid = flat[margin : margin + hp * wp].view(hp, wp, c, n)
    grid[ph : ph + h, pw : pw + w] = by_position.permute(1, 2, 0, 3)
    # zero only what the copy left out: margins, padding rows and padding columns
    flat[: margin + ph * wp].zero_()
    flat[margin + (ph + h) * wp :].zero_()
    if pw:
        grid[ph : ph + h, :pw].zero_()
        grid[ph : ph + h, pw + w :].zero_()
    return flat, hp, wp


def _top_padding(conv: nn.Conv2d) -> int:
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        return conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
    return int(conv.padding[0])


def output_size(padded_hw: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    (hp, wp), (kh, kw) = padded_hw, conv.kernel_size
    (dh, dw), (sh, sw) = conv.dilation, conv.stride
    return (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1


_GRAM_BUDGET = 1 << 24  # elements of one batch of per-position Grams (64 MiB in float32)


def _displacement_grams(flat: Tensor, margin: int, padded_hw: tuple[int, int],
                        image_rows: tuple[int, int], conv: nn.Conv2d, out_hw: tuple[int, int],
                        di: int, dj_min: int, steps: int) -> Tensor:
    """``pg[p, c, (k, c')] = Σ_n x[n, c, p] x[n, c', p + (di, dj_min + k)]`` (dilated steps).

    Rows of positions that the windows read but whose products are all zero are zeros.
    """
    (_, wp), (row_lo, row_hi) = padded_hw, image_rows
    (kh, _), (dh, dw), (sh, _) = conv.kernel_size, conv.dilation, conv.stride
    c, n = flat.shape[1], flat.shape[2]
    base = di * dh * wp + dj_min * dw  # flat offset of the first partner
    # positions p whose partners can be nonzero (all partners stay inside flat)
    lo, hi = row_lo * wp, max(row_lo, row_hi - di * dh) * wp
    partners = flat.as_strided(
        size=(hi - lo, steps, c, n),
        stride=(c * n, dw * c * n, n, 1),
        storage_offset=flat.storage_offset() + (margin + lo + base) * c * n,
    ).reshape(hi - lo, steps * c, n)  # a view when dw == 1
    need = ((kh - 1 - di) * dh + (out_hw[0] - 1) * sh + 1) * wp  # positions windows read
    pg = _scratch("grams", (max(need, hi), c, steps * c), flat)
    pg[:lo].zero_()
    pg[hi:].zero_()
    torch.bmm(flat[margin + lo : margin + hi], partners.transpose(1, 2), out=pg[lo:hi])
    return pg


def _scatter_window_sums(blocks: Tensor, pg: Tensor, padded_hw: tuple[int, int],
                         out_hw: tuple[int, int], conv: nn.Conv2d, di: int, dj_min: int,
                         dj_max: int) -> None:
    """Sum ``pg`` over each tap's window (rows, then columns) into ``blocks[i, j, i', j']``."""
    (_, wp), (ho, wo) = padded_hw, out_hw
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    c, steps = pg.shape[1], dj_max - dj_min
    ni = kh - di  # taps i whose partner row i + di exists
    cc = c * steps * c
    by_row = _scratch("row_sums", (ni, wp, cc), pg)
    torch.sum(pg.as_strided(size=(ni, ho, wp, cc), stride=(dh * wp * cc, sh * wp * cc, cc, 1)),
              dim=1, out=by_row)
    by_row = by_row.view(ni, wp, c, steps, c)  # window sums over output rows
    for dj in range(dj_min, dj_max):
        j0, j1 = max(0, -dj), kw - max(0, dj)
        part = by_row[:, :, :, dj - dj_min, :]  # [i, column, c, c']
        s0, s1, s2, s3 = part.stride()
        sums = part.as_strided(
            size=(ni, j1 - j0, wo, c, c),
            stride=(s0, dw * s1, sw * s1, s2, s3),
            storage_offset=part.storage_offset() + j0 * dw * s1,
        ).sum(dim=2).reshape(-1, c, c)  # window sums over output columns
        ii = torch.arange(ni, device=pg.device).repeat_interleave(j1 - j0)
        jj = torch.arange(j0, j1, device=pg.device).repeat(ni)
        blocks[ii, jj, ii + di, jj + dj] = sums
        if di or dj:
            blocks[ii + di, jj + dj, ii, jj] = sums.transpose(1, 2)


def patch_moments_flops(x_shape: tuple[int, ...], conv: nn.Conv2d) -> float:
    """Multiply-add FLOPs of :func:`patch_moments` (the batched GEMMs; zero rows included)."""
    n, c, h, w = (1, *x_shape) if len(x_shape) == 3 else x_shape
    kh, kw = conv.kernel_size
    if conv.padding == "same":
        hp = h + conv.dilation[0] * (kh - 1)
        wp = w + conv.dilation[1] * (kw - 1)
    else:
        ph, pw = (0, 0) if isinstance(conv.padding, str) else conv.padding  # str: "valid"
        hp, wp = h + 2 * ph, w + 2 * pw
    column_steps = kw + (kh - 1) * (2 * kw - 1)
    return 2.0 * n * hp * wp * c * c * column_steps


def patch_moments(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor, int]:
    """``(Σ_r a_r a_rᵀ, Σ_r a_r, R)`` over all patches of ``conv``'s input ``x``.

    Entries are in :func:`torch.nn.functional.unfold` order, ``c·kh·kw + i·kw + j``, the
    order of ``conv.weight.reshape(out, -1)``.
    """
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    sh, sw = conv.stride
    margin = (kw - 1) * dw
    flat, hp, wp = _positions_major(x, conv, margin)  # flat[margin + p] = (C, N) at p
    c, n = flat.shape[1], flat.shape[2]
    npos = hp * wp
    ho, wo = output_size((hp, wp), conv)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input of spatial size {tuple(x.shape[-2:])} is smaller than the kernel")
    # with zero padding only image rows [row_lo, row_hi) hold nonzero values
    zero_pad = conv.padding_mode == "zeros"
    row_lo = _top_padding(conv) if zero_pad else 0
    row_hi = row_lo + x.shape[-2] if zero_pad else hp
    blocks = flat.new_empty(kh, kw, kh, kw, c, c)  # [i, j, i', j', c, c']
    max_steps = max(1, _GRAM_BUDGET // (npos * c * c))  # bound on the per-position Grams
    for di in range(kh):  # row step between taps
        first = 0 if di == 0 else -(kw - 1)  # (0, -dj) is the transpose of (0, dj)
        for dj_min in range(first, kw, max_steps):
            dj_max = min(kw, dj_min + max_steps)  # column steps dj_min .. dj_max-1
            pg = _displacement_grams(flat, margin, (hp, wp), (row_lo, row_hi), conv,
                                     (ho, wo), di, dj_min, dj_max - dj_min)
            _scatter_window_sums(blocks, pg, (hp, wp), (ho, wo), conv, di, dj_min, dj_max)
    k = c * kh * kw
    gram = blocks.permute(4, 0, 1, 5, 2, 3).reshape(k, k)
    col = flat[margin : margin + npos].sum(dim=2)  # [p, C]: sums over examples
    taps = col.as_strided(
        size=(kh, kw, ho, wo, c),
        stride=(dh * wp * c, dw * c, sh * wp * c, sw * c, 1),
    ).sum(dim=(2, 3))  # [i, j, c]
    total = taps.permute(2, 0, 1).reshape(k)
    return gram, total, n * ho * wo
