"""Triangle packing, comm options, and the collectives helpers on 3 real gloo ranks."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from helpers.distributed import Checks, assert_check, merge_checks, run_ranks
from helpers.recording import RecordingTimer
from kfacperf import vocab as stages
from kfacperf.kfac import comm


def sym(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g)
    return x + x.T


def test_pack_is_the_upper_triangle_row_by_row() -> None:
    m = sym(4)
    expected = [m[i, j].item() for i in range(4) for j in range(i, 4)]
    assert comm.pack_symmetric(m).tolist() == expected
    assert comm.pack_symmetric(m).numel() == 10


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_pack_unpack_round_trip(n: int) -> None:
    m = sym(n, seed=n)
    torch.testing.assert_close(comm.unpack_symmetric(comm.pack_symmetric(m), n), m,
                               rtol=0, atol=0)


def test_unpack_mirrors_the_upper_triangle() -> None:
    m = torch.arange(9.0).view(3, 3)  # not symmetric: the lower triangle is ignored
    out = comm.unpack_symmetric(comm.pack_symmetric(m), 3)
    assert out.tolist() == [[0, 1, 2], [1, 4, 5], [2, 5, 8]]


def test_a_stack_packs_matrix_by_matrix() -> None:
    """Unit-wise BatchNorm blocks travel as C triangles of 3 (a [C, 2, 2] stack)."""
    stack = torch.stack([sym(2, seed=s) for s in range(5)])
    packed = comm.pack_symmetric(stack)
    assert packed.tolist() == [v for m in stack for v in comm.pack_symmetric(m).tolist()]
    torch.testing.assert_close(comm.unpack_symmetric(packed, 2, 5), stack, rtol=0, atol=0)
    opts = comm.CommOptions(symmetric=True, dtype="fp16")
    assert opts.factor_bytes(2, 5) == 5 * 3 * 2
    back = comm.decode_factor(comm.encode_factor(stack, opts), 2, opts, torch.float32, 5)
    torch.testing.assert_close(back, stack, rtol=2**-10, atol=2**-10)
    with pytest.raises(ValueError, match="triangles of 4 2x2"):
        comm.unpack_symmetric(packed, 2, 4)


def test_pack_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        comm.pack_symmetric(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="triangle of a 3x3"):
        comm.unpack_symmetric(torch.zeros(5), 3)


@pytest.mark.parametrize("dtype,size", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_encode_decode(dtype: str, size: int, symmetric: bool) -> None:
    opts = comm.CommOptions(dtype=dtype, symmetric=symmetric)
    m = sym(5)
    flat = comm.encode_factor(m, opts)
    numel = 15 if symmetric else 25
    assert flat.numel() == numel == opts.factor_numel(5)
    assert opts.factor_bytes(5) == numel * size == flat.numel() * flat.element_size()
    flat.zero_()  # a copy, never a view of the factor
    assert m.abs().sum() > 0
    back = comm.decode_factor(comm.encode_factor(m, opts), 5, opts, torch.float32)
    assert back.dtype == torch.float32
    eps = {"fp32": 1e-7, "fp16": 2**-10, "bf16": 2**-7}[dtype]
    assert (back - m).abs().max() <= eps * m.abs().max()


def test_comm_options_validation() -> None:
    with pytest.raises(ValueError, match="'fp8'"):
        comm.CommOptions(dtype="fp8")
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        comm.CommOptions(bucket_cap_mb=-1)
    with pytest.raises(ValueError, match="symmetric"):
        comm.CommOptions(symmetric="yes")  # type: ignore[arg-type]
    assert comm.CommOptions(bucket_cap_mb=2.5).bucket_cap_bytes == 2_500_000


# ------------------------------------------------------------------ three real ranks
WORLD = 3


def _value(rank: int, n: int, salt: float) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) * (rank + 1) + salt


def rank_suite(rank: int, world: int) -> dict[str, Any]:
    checks = Checks()

    def reduce_scatter_v_uneven() -> None:
        sizes = [0, 3, 5]  # rank 0's block is empty
        timer = RecordingTimer()
        blocks = [_value(rank, n, salt=r) for r, n in enumerate(sizes)]
        out = comm.reduce_scatter_v(blocks, stage=stages.FACTOR_COMM, layer="x", timer=timer).wait()
        expected = sum(_value(q, sizes[rank], salt=rank) for q in range(world)) / world
        torch.testing.assert_close(out, expected)
        assert [(r.stage, r.layer, r.nbytes) for r in timer.records] == [
            (stages.FACTOR_COMM, "x", 8 * 4)]

    def all_gather_v_uneven() -> None:
        sizes = [2, 0, 4]
        timer = RecordingTimer()
        got = comm.all_gather_v(_value(rank, sizes[rank], salt=0.5), sizes,
                                stage=stages.PRECOND_COMM, timer=timer).wait()
        assert [g.tolist() for g in got] == [_value(r, n, 0.5).tolist()
                                            for r, n in enumerate(sizes)]
        assert [r.nbytes for r in timer.records] == [6 * 4]  # logical payload, no padding

    def all_gather_v_even() -> None:
        got = comm.all_gather_v(_value(rank, 3, 0.0), [3, 3, 3], stage=stages.PRECOND_COMM).wait()
        assert [g.tolist() for g in got] == [_value(r, 3, 0.0).tolist() for r in range(world)]

    def buckets() -> None:
        timer = RecordingTimer()
        b = comm.AllReduceBuckets(stage=stages.FACTOR_COMM, cap_bytes=80, timer=timer)
        sizes = {"a": 10, "b": 10, "c": 30, "d": 5}
        for key, n in sizes.items():
            b.add(key, key, _value(rank, n, salt=1.0))
        out = b.wait()
        for key, n in sizes.items():
            expected = sum(_value(q, n, 1.0) for q in range(world)) / world
            torch.testing.assert_close(out[key], expected)
        # 40 + 40 reach the 80-byte cap; 120 travels alone; 20 is flushed by wait().
        assert [(r.layer, r.nbytes) for r in timer.records] == [("a+b", 80), ("c", 120),
                                                                ("d", 20)]

    def no_bucketing() -> None:
        timer = RecordingTimer()
        b = comm.AllReduceBuckets(stage=stages.FACTOR_COMM, cap_bytes=0, timer=timer)
        for key in "xyz":
            b.add(key, key, torch.ones(4))
        b.wait()
        assert [r.layer for r in timer.records] == ["x", "y", "z"]

    def half_precision_all_reduce() -> None:
        for dtype in (torch.float16, torch.bfloat16):
            t = torch.full((4,), float(rank + 1), dtype=dtype)
            out = comm.all_reduce(t, stage=stages.FACTOR_COMM).wait()
            assert out.dtype == dtype
            eps = torch.finfo(dtype).eps  # 1/3 and 2/3 are rounded before the sum
            torch.testing.assert_close(out.float(), torch.full((4,), 2.0), rtol=0,
                                       atol=4 * eps)  # mean of 1, 2, 3

    def subgroup_broadcast() -> None:
        group = dist.new_group([1, 2])
        timer = RecordingTimer()
        if rank in (1, 2):
            t = _value(rank, 5, 0.0)
            comm.broadcast(t, 2, stage=stages.INVERSE_COMM, layer="l", timer=timer,
                           group=group).wait()
            assert t.tolist() == _value(2, 5, 0.0).tolist()
            assert [r.nbytes for r in timer.records] == [20]

    for name, fn in list(locals().items()):
        if callable(fn) and name != "checks":
            checks.run(name, fn)
    return checks.report()


CHECKS = ["reduce_scatter_v_uneven", "all_gather_v_uneven", "all_gather_v_even", "buckets",
          "no_bucketing", "half_precision_all_reduce", "subgroup_broadcast"]
_LAUNCH: list[Any] = []


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_collectives_on_three_ranks(check: str) -> None:
    if not _LAUNCH:
        _LAUNCH.append(merge_checks(run_ranks(rank_suite, WORLD, timeout_s=60)))
    assert_check(_LAUNCH[0], check)
