import math

import pytest
import torch
from torch import nn

from kfacperf.workloads import WORKLOAD_NAMES, get_workload
from kfacperf.workloads.describe import is_kfac_layer

SMALL = {
    "resnet50": {"image_size": 64},
    "bert-large": {"vocab_size": 50, "seq_len": 12, "hidden": 16, "num_layers": 2,
                   "num_heads": 2, "ffn": 32},
    "bert-large-block": {"seq_len": 12, "hidden": 16, "num_heads": 2, "ffn": 32},
    "bert-base-block": {"seq_len": 12, "hidden": 16, "num_heads": 2, "ffn": 32},
    "gpt2-xl": {"vocab_size": 50, "seq_len": 12, "hidden": 16, "num_layers": 2, "num_heads": 2},
}


def output_shape(name: str, w, batch: int):
    """What the model returns: class logits, except for the language models and the block."""
    o = w.options
    if name == "bert-large":  # masked-LM logits at 15% of the positions, next-sentence logits
        return ((batch, math.ceil(0.15 * o["seq_len"]), o["vocab_size"]), (batch, 2))
    if name in ("bert-large-block", "bert-base-block"):
        return (batch, o["seq_len"], o["hidden"])
    if name == "gpt2-xl":
        return (batch, o["seq_len"], o["vocab_size"])
    return (batch, w.num_classes)


def kfac_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_kfac_layer(m)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_forward_backward_shapes(name):
    w = get_workload(name, **SMALL.get(name, {}))
    model = w.build_model(seed=0)
    x, y = w.make_batch(2, seed=0, step=0)
    assert x.shape == (2, *w.input_shape) and x.dtype == w.input_dtype
    out = model(x)
    shape = tuple(o.shape for o in out) if isinstance(out, tuple) else out.shape
    assert shape == output_shape(name, w, 2)
    loss = w.loss_fn(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    if name != "resnet50":  # keep the CPU cost down; the others cover backward
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())


def cifar_resnet_params(n: int, classes: int = 10) -> int:
    """Closed-form parameter count of ResNet-(6n+2) with option-B (1x1 conv + BN) shortcuts."""
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    c = 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += 9 * c * w + 9 * w * w + 4 * w
            if c != w:
                total += c * w + 2 * w
            c = w
    return total + 64 * classes + classes


@pytest.mark.parametrize("name, n, layers", [("resnet20", 3, 22), ("resnet32", 5, 34)])
def test_cifar_resnet_counts(name, n, layers):
    model = get_workload(name).build_model()
    convs = [m for m in kfac_layers(model) if isinstance(m, nn.Conv2d)]
    assert len(kfac_layers(model)) == layers
    assert sum(m.kernel_size == (1, 1) for m in convs) == 2  # the two projection shortcuts
    assert n_params(model) == cifar_resnet_params(n)


def test_resnet50_has_54_kfac_layers_and_the_published_size():
    model = get_workload("resnet50", image_size=64).build_model()
    layers = kfac_layers(model)
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert len(layers) == 54 and len(convs) == 53
    assert sum(".downsample." in p for p, m in model.named_modules() if m in convs) == 4
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 1000
    # torchvision documents 25,557,032 parameters for ResNet-50.
    assert n_params(model) == 25_557_032


def test_resnet50_rejects_tiny_images():
    with pytest.raises(ValueError, match="image_size"):
        get_workload("resnet50", image_size=16)


def test_transformer_structure_and_param_count():
    w = get_workload("transformer")
    model = w.build_model()
    assert len(kfac_layers(model)) == 6 * 2 + 1
    d, ff, vocab, seq, layers, classes = 128, 512, 1024, 64, 2, 2
    per_layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
    expected = vocab * d + seq * d + 2 * d + layers * per_layer + d * classes + classes
    assert n_params(model) == expected
    x, _ = w.make_batch(3)
    assert x.dtype == torch.int64 and int(x.min()) >= 0 and int(x.max()) < vocab


def test_transformer_attention_matches_explicit_softmax():
    model = get_workload("transformer", num_layers=1).build_model()
    attn = model.layers[0].attn
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(0))
    h, dh = 4, 32
    q, k, v = (m(x).view(2, 5, h, dh).transpose(1, 2) for m in (attn.q, attn.k, attn.v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5, dim=-1)
    ref = attn.out((weights @ v).transpose(1, 2).reshape(2, 5, 128))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_transformer_rejects_bad_config_and_input():
    with pytest.raises(ValueError, match="num_heads"):
        get_workload("transformer", d_model=130, num_heads=4)
    model = get_workload("transformer").build_model()
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(2, 8))
