"""kfacperf.kfac.grad_io: every layer's gradient matrix formed and written back at once,
bit for bit what the one-layer methods give, with a number of kernels that does not grow
with the layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kfacperf.kfac.grad_io import load_grads, write_grads
from kfacperf.kfac.preconditioner import KFACPreconditioner


class _Kernels(TorchDispatchMode):
    """The operators that compute (views left out) dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def model_with_every_kind() -> nn.Module:
    """Convolutions without bias, BatchNorm blocks, a linear layer with a bias."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def preconditioned(model: nn.Module) -> KFACPreconditioner:
    pre = KFACPreconditioner(model, damping=1e-3, lr=0.1, bn_blocks="unit")
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    return pre


def test_loading_gives_each_layer_the_matrix_in_storage_of_its_own():
    batched = preconditioned(model_with_every_kind())
    single = preconditioned(model_with_every_kind())
    assert {l.kind for l in batched.layers.values()} >= {"conv2d", "batchnorm", "linear"}
    load_grads(batched.layers.values(), batched=True)
    for layer in single.layers.values():
        layer.load_grad()
    for name, layer in batched.layers.items():
        assert torch.equal(layer.grad, single.layers[name].grad), name
        before = layer.weight.grad.clone()
        layer.grad.add_(1.0)  # the strategies reduce into it: .grad must not change
        assert torch.equal(layer.weight.grad, before), name


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: cast after scaling
def test_writing_back_is_bit_for_bit_the_one_layer_write(scale, dtype):
    batched = preconditioned(model_with_every_kind())
    load_grads(batched.layers.values())
    gen = torch.Generator().manual_seed(2)
    for layer in batched.layers.values():
        layer.precond_grad = torch.randn(layer.grad.shape, generator=gen, dtype=dtype)
    single = copy.deepcopy(batched)
    s = None if scale is None else torch.tensor(scale)
    write_grads(batched.layers.values(), s)
    for layer in single.layers.values():
        layer.write_grad(layer.precond_grad, s)
    for (name, p), (_, q) in zip(batched.model.named_parameters(),
                                 single.model.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    linear = batched.model[-1]
    m = batched.layers["7"].precond_grad
    expected = m if s is None else m * s
    assert torch.equal(linear.bias.grad, expected[:, -1].to(torch.float32))


def test_layers_without_a_gradient_are_left_out_or_get_one():
    pre = preconditioned(model_with_every_kind())
    first, *rest = pre.layers.values()
    first.weight.grad = None
    load_grads(pre.layers.values())
    assert first.grad is None and all(l.grad is not None for l in rest)
    first.precond_grad = torch.ones(first.dim_g, first.dim_a)
    rest[0].precond_grad = None
    untouched = rest[0].weight.grad.clone()
    write_grads(pre.layers.values())
    assert torch.equal(first.weight.grad, torch.ones_like(first.weight))  # allocated
    assert torch.equal(rest[0].weight.grad, untouched)


@pytest.mark.parametrize("layers", [3, 30])
def test_the_kernels_do_not_grow_with_the_layers(layers):
    model = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(layers)])
    pre = preconditioned(model)
    with _Kernels() as on_cpu:
        load_grads(pre.layers.values())  # a copy per layer: its bytes are the cost here
    assert on_cpu.ops == ["aten.clone.default"] * layers
    with _Kernels() as loading:
        load_grads(pre.layers.values(), batched=True)
    for layer in pre.layers.values():
        layer.precond_grad = torch.randn_like(layer.grad)
    with _Kernels() as writing:
        write_grads(pre.layers.values(), torch.tensor(0.5))
    assert loading.ops == ["aten.cat.default"]
    assert sorted(writing.ops) == ["aten._foreach_copy_.default", "aten._foreach_mul_.Tensor"]
    with _Kernels() as one_by_one:
        for layer in pre.layers.values():
            layer.write_grad(layer.precond_grad, torch.tensor(0.5))
    assert len(one_by_one.ops) >= 2 * layers  # what the batched write saves
