import pytest
import torch

from kfacperf.workloads import (
    WORKLOAD_NAMES,
    Workload,
    get_workload,
    rank_slice,
    workload_options,
)


def test_unknown_workload_lists_known_names():
    with pytest.raises(ValueError, match="resnet9000") as err:
        get_workload("resnet9000")
    for name in WORKLOAD_NAMES:
        assert name in str(err.value)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="colour"):
        get_workload("mlp", colour="red")


def test_every_name_builds_a_workload():
    for name in WORKLOAD_NAMES:
        w = get_workload(name)
        assert isinstance(w, Workload) and w.name == name
        assert w.description and w.default_batch_size > 0 and w.input_shape
        assert set(w.options) == set(workload_options(name))


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_batches_are_deterministic_and_ignore_global_rng(name):
    w = get_workload(name, **({"image_size": 32} if name == "resnet50" else {}))
    torch.manual_seed(123)
    x1, y1 = w.make_batch(16, seed=3, step=7)
    torch.manual_seed(999)
    torch.rand(10)
    x2, y2 = w.make_batch(16, seed=3, step=7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (16, *w.input_shape) and y1.shape[0] == 16
    x3, _ = w.make_batch(16, seed=3, step=8)
    x4, _ = w.make_batch(16, seed=4, step=7)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)


def test_seed_is_not_truncated_to_32_bits():
    # The CPU generator keeps only 32 bits of a seed; seeds differing above bit 32 must differ.
    w = get_workload("mlp")
    a, _ = w.make_batch(4, seed=1, step=0)
    b, _ = w.make_batch(4, seed=1 + 2**32, step=0)
    assert not torch.equal(a, b)


def test_make_batch_rejects_bad_arguments():
    w = get_workload("mlp")
    for kwargs, word in (({"seed": -1}, "seed"), ({"step": 1.5}, "step")):
        with pytest.raises(ValueError, match=word):
            w.make_batch(4, **kwargs)
    with pytest.raises(ValueError, match="batch_size"):
        w.make_batch(0)


def test_build_model_is_deterministic_and_leaves_global_rng_alone():
    w = get_workload("mlp")
    torch.manual_seed(5)
    state = torch.get_rng_state()
    m1 = w.build_model(seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    m2 = w.build_model(seed=11)
    m3 = w.build_model(seed=12)
    p1, p2, p3 = (torch.cat([p.flatten() for p in m.parameters()]) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)


def test_rank_slice_partitions_the_global_batch():
    x = torch.arange(24).reshape(12, 2)
    for world in (1, 2, 3, 4, 6, 12):
        parts = [rank_slice(x, r, world) for r in range(world)]
        assert all(p.shape[0] == 12 // world for p in parts)
        assert torch.equal(torch.cat(parts), x)
    with pytest.raises(ValueError, match="world_size=5"):
        rank_slice(x, 0, 5)
    with pytest.raises(ValueError, match="rank"):
        rank_slice(x, 4, 4)
    with pytest.raises(ValueError, match="world_size"):
        rank_slice(x, 0, 0)


def test_loss_is_mean_reduced():
    w = get_workload("mlp")
    out = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    per_example = -out.log_softmax(1)[torch.arange(6), y]
    torch.testing.assert_close(w.loss_fn(out, y), per_example.mean())
