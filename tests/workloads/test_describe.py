import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfacperf.workloads import get_workload
from kfacperf.workloads.describe import describe_model, describe_workload

KEYS = {
    "name", "kind", "dim_a", "dim_g", "params", "rows_per_example",
    "fwd_flops_per_example", "in_elems_per_example", "out_elems_per_example",
}


def test_mlp_by_hand():
    d = describe_workload("mlp")  # 784 -> 512 -> 256 -> 10
    assert d["options"] == {"in_features": 784, "hidden": [512, 256], "num_classes": 10}
    assert d["name"] == "mlp" and d["input_shape"] == [784]
    assert d["num_kfac_layers"] == 3 and d["other_params"] == 0
    assert [l["name"] for l in d["layers"]] == ["net.0", "net.2", "net.4"]
    expect = [
        # dim_a, dim_g, params, flops, in, out
        (785, 512, 784 * 512 + 512, 2 * 784 * 512, 784, 512),
        (513, 256, 512 * 256 + 256, 2 * 512 * 256, 512, 256),
        (257, 10, 256 * 10 + 10, 2 * 256 * 10, 256, 10),
    ]
    for layer, (da, dg, p, fl, i, o) in zip(d["layers"], expect):
        assert set(layer) == KEYS and layer["kind"] == "linear"
        assert (layer["dim_a"], layer["dim_g"], layer["params"]) == (da, dg, p)
        assert layer["rows_per_example"] == 1
        assert layer["fwd_flops_per_example"] == fl
        assert (layer["in_elems_per_example"], layer["out_elems_per_example"]) == (i, o)
    assert d["total_params"] == sum(e[2] for e in expect)


def test_resnet20_strided_conv_by_hand():
    d = describe_workload("resnet20")
    layers = {l["name"]: l for l in d["layers"]}
    # Stage 2's first 3x3 conv: 16 -> 32 channels, stride 2, 32x32 -> 16x16, no bias.
    c = layers["layer2.0.conv1"]
    assert (c["kind"], c["dim_a"], c["dim_g"], c["params"]) == ("conv2d", 16 * 9, 32, 16 * 32 * 9)
    assert c["rows_per_example"] == 16 * 16
    assert c["fwd_flops_per_example"] == 2 * (16 * 9) * 32 * (16 * 16)
    assert (c["in_elems_per_example"], c["out_elems_per_example"]) == (16 * 32 * 32, 32 * 16 * 16)
    s = layers["layer2.0.shortcut.0"]
    assert (s["dim_a"], s["dim_g"], s["rows_per_example"]) == (16, 32, 256)
    # Forward order: stem first, each block's convs before its shortcut, classifier last.
    names = [l["name"] for l in d["layers"]]
    assert names[0] == "conv1" and names[-1] == "fc"
    assert names.index("layer2.0.conv2") < names.index("layer2.0.shortcut.0")
    assert names.index("layer2.0.shortcut.0") < names.index("layer2.1.conv1")
    bn_params = d["total_params"] - sum(l["params"] for l in d["layers"])
    assert d["other_params"] == bn_params == 2 * (16 + 6 * 16 + 7 * 32 + 7 * 64)


def test_every_conv_agrees_with_an_unfold_reference():
    """rows and dim_a of each conv equal the shape of F.unfold on the layer's real input."""
    w = get_workload("resnet20")
    model = w.build_model().eval()
    x, _ = w.make_batch(1)
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(path):
        def hook(module, inp, out):
            inputs[path] = inp[0]  # returns None: the output is left alone
        return hook

    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(keep_input(path))
    with torch.no_grad():
        model(x)
    d = describe_model(model, x)
    for layer in d["layers"]:
        if layer["kind"] != "conv2d":
            continue
        m = model.get_submodule(layer["name"])
        cols = F.unfold(inputs[layer["name"]], m.kernel_size, m.dilation, m.padding, m.stride)
        assert layer["dim_a"] == cols.shape[1]
        assert layer["rows_per_example"] == cols.shape[2]
        assert layer["fwd_flops_per_example"] == 2 * m.weight.numel() * cols.shape[2]


def test_transformer_linears_count_sequence_rows():
    d = describe_workload("transformer")
    first = d["layers"][:7]
    assert [l["name"] for l in first] == [
        "layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v", "layers.0.attn.out",
        "layers.0.ff1", "layers.0.ff2", "layers.1.attn.q",
    ]
    q, ff1 = first[0], first[4]
    assert (q["rows_per_example"], q["dim_a"], q["dim_g"]) == (64, 129, 128)
    assert q["fwd_flops_per_example"] == 2 * 128 * 128 * 64
    assert (ff1["dim_g"], ff1["out_elems_per_example"]) == (512, 64 * 512)
    cls = d["layers"][-1]
    assert (cls["name"], cls["rows_per_example"], cls["in_elems_per_example"]) == (
        "classifier", 1, 128)
    # embeddings (1024 + 64 tokens x 128) and 5 LayerNorms are the non-K-FAC parameters
    assert d["other_params"] == (1024 + 64) * 128 + 5 * 2 * 128


@functools.lru_cache(maxsize=1)
def resnet50() -> dict:
    """ResNet-50's description, computed once for the tests that read it."""
    return describe_workload("resnet50")


def test_resnet50_description():
    d = resnet50()
    assert d["num_kfac_layers"] == 54 and d["input_shape"] == [3, 224, 224]
    kinds = [l["kind"] for l in d["layers"]]
    assert kinds.count("conv2d") == 53 and kinds[-1] == "linear"
    assert d["layers"][0]["rows_per_example"] == 112 * 112
    assert d["layers"][-1]["dim_a"] == 2049
    # ResNet-50 is commonly quoted at ~4.1 GMACs per 224x224 image (torchvision: 4.09).
    total = sum(l["fwd_flops_per_example"] for l in d["layers"])
    assert 2 * 4.05e9 < total < 2 * 4.15e9
    assert d["total_params"] == 25_557_032
    small = describe_workload("resnet50", image_size=64)
    assert (small["options"]["image_size"] == 64
            and small["layers"][0]["rows_per_example"] == 32 * 32)


def test_resnet50_batchnorm_layers_follow_their_convolutions():
    d = resnet50()
    norms = d["batchnorm"]
    assert len(norms) == 53 and len(d["layers"]) + len(norms) == 107  # SP-NGD's Fisher blocks
    convs = {l["name"]: l for l in d["layers"]}
    for bn in norms:  # each BatchNorm normalises the output of the conv called just before it
        conv = convs[bn["follows"]]
        prefix = bn["name"].rsplit(".", 1)[0]
        expected = (prefix + ".0" if bn["name"].endswith("downsample.1")
                    else bn["name"].replace("bn", "conv"))
        assert bn["follows"] == expected
        assert bn["channels"] == conv["dim_g"] and bn["params"] == 2 * conv["dim_g"]
        assert bn["rows_per_example"] == conv["rows_per_example"]
        assert bn["in_elems_per_example"] == conv["out_elems_per_example"]
    assert sum(bn["params"] for bn in norms) == d["other_params"] == 53_120


def test_batchnorm_records_by_hand():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, affine=False),
                          nn.Flatten(), nn.Linear(3 * 4 * 5, 6), nn.BatchNorm1d(6))
    d = describe_model(model, torch.zeros(1, 2, 4, 5))
    assert [(b["name"], b["follows"], b["channels"], b["rows_per_example"]) for b in
            d["batchnorm"]] == [("0", "", 2, 20), ("5", "4", 6, 1)]  # affine=False: no block
    assert d["other_params"] == 2 * 2 + 2 * 6


def test_describe_rejects_shared_and_unused_layers_and_big_batches():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="more than once"):
        describe_model(nn.Sequential(lin, lin), torch.zeros(1, 4))

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="spare"):
        describe_model(Unused(), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="batch of 1"):
        describe_model(nn.Linear(4, 2), torch.zeros(2, 4))


def test_grouped_convs_are_other_params():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1, bias=True))
    d = describe_model(model, torch.zeros(1, 4, 6, 6))
    assert d["num_kfac_layers"] == 1 and d["layers"][0]["name"] == "1"
    assert d["layers"][0]["dim_a"] == 5 and d["layers"][0]["rows_per_example"] == 16
    assert d["other_params"] == 4 * 9 + 4


class _TiedPair(nn.Module):
    """``b`` reuses ``a``'s weight (its own bias); a head of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.tanh(self.a(x))))


def test_tied_weights_count_each_parameter_once():
    """Parameters: a.weight 36 (shared), a.bias 6, b.bias 6, head 12: 60 in all.  K-FAC
    refuses the pair; a first-order walk lists ``a`` and ``head`` and leaves b's own bias to
    other_params, and b's FLOPs (2 * 6 * 6) to the rest of the forward."""
    from kfacperf.workloads.describe import DescribeError, walk_model
    from kfacperf.workloads.workload_model import workload_model_of

    model, x = _TiedPair(), torch.randn(1, 6)
    with pytest.raises(DescribeError, match="layers 'a' and 'b' share a parameter"):
        describe_model(model, x)
    walk = walk_model(model, x, strict=False)
    assert [l["name"] for l in walk.layers] == ["a", "head"]
    assert (walk.total_params, walk.other_params) == (60, 6)
    assert walk.kfac_problems and "tied weights" in walk.kfac_problems[0]
    wm = workload_model_of(model, x, name="tied", strict=False)
    assert wm.layer_names == ("a", "head") and (wm.other_params, wm.total_params) == (6, 60)
    assert wm.other_fwd_flops_per_example >= 2 * 6 * 6
    with pytest.raises(DescribeError, match="share a parameter"):
        workload_model_of(model, x, name="tied")


def test_a_first_order_walk_takes_a_layer_called_twice_once():
    """fc (4x4 with bias: 20 parameters) called twice: listed once, its second call's
    2 * 4 * 4 FLOPs left to the rest of the forward."""
    from kfacperf.workloads.describe import walk_model

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    walk = walk_model(Twice(), torch.randn(1, 4), strict=False)
    assert [l["name"] for l in walk.layers] == ["fc"] and walk.other_params == 0
    assert walk.layers[0]["fwd_flops_per_example"] == 2 * 4 * 4
    assert walk.total_flops >= 2 * (2 * 4 * 4)
    assert "called more than once" in walk.kfac_problems[0]


@pytest.mark.parametrize("layer", [nn.Linear(4, 3), nn.Conv2d(2, 3, 3)],
                         ids=["linear", "conv2d"])
def test_a_model_that_is_one_layer_is_named_as_the_preconditioner_names_it(layer):
    """The model's own module path is "": the walk, the workload model and the preconditioner
    all call it ROOT_LAYER (a LayerModel refuses an empty name)."""
    from kfacperf.kfac.preconditioner import ROOT_LAYER, find_layers
    from kfacperf.workloads.workload_model import workload_model_of

    x = torch.randn(1, 4) if isinstance(layer, nn.Linear) else torch.randn(1, 2, 5, 5)
    d = describe_model(layer, x)
    assert [l["name"] for l in d["layers"]] == [ROOT_LAYER] == list(find_layers(layer)[0])
    wm = workload_model_of(layer, x, name="one-layer")
    assert wm.layer_names == (ROOT_LAYER,)
    if isinstance(layer, nn.Conv2d):
        assert wm.layers[0].conv is not None  # its geometry found under the same name


def test_a_forward_that_fails_on_the_example_is_one_describe_error():
    from kfacperf.workloads.describe import DescribeError, ForwardError, walk_model

    with pytest.raises(ForwardError, match=r"^the model's forward on its example failed: "
                       r"RuntimeError: mat1 and mat2 shapes cannot be multiplied") as info:
        walk_model(nn.Linear(4, 10), torch.randn(1, 7))
    assert isinstance(info.value, DescribeError) and "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # the forward's own error, kept


def test_walk_workload_says_make_batch_must_return_inputs_the_model_takes(tmp_path):
    """The meta pass fails, the real build fails too: one ForwardError naming make_batch."""
    from kfacperf.workloads.describe import ForwardError, walk_workload

    (tmp_path / "bad.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    def make_batch(n, g):\n"
        "        return torch.randn(n, 7, generator=g), torch.randint(0, 10, (n,), generator=g)\n"
        "    return nn.Linear(4, 10), make_batch\n")
    workload = get_workload(f"{tmp_path / 'bad.py'}:build")
    with pytest.raises(ForwardError) as info:
        walk_workload(workload)
    assert str(info.value) == (
        "the model's forward on make_batch(1, generator)'s inputs failed: RuntimeError: mat1 "
        "and mat2 shapes cannot be multiplied (1x7 and 4x10); make_batch must return inputs "
        "the model takes")


def test_a_frozen_bias_is_no_column_of_a_as_in_the_preconditioner():
    from kfacperf.kfac.preconditioner import find_layers
    from kfacperf.workloads.describe import walk_model

    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].bias.requires_grad_(False)
    walk = walk_model(model, torch.randn(1, 5))
    layers, _ = find_layers(model)
    assert [l["dim_a"] for l in walk.layers] == [layers[n].dim_a for n in ("0", "2")] == [5, 8]
    # the frozen bias gets no gradient: neither all-reduced nor updated, so no other_params
    assert walk.layers[0]["params"] == 5 * 7 and walk.other_params == 0 and \
        walk.frozen_params == 7
    model[2].weight.requires_grad_(False)  # a frozen layer: the optimizer skips it
    walk = walk_model(model, torch.randn(1, 5))
    layers, _ = find_layers(model)
    assert [l["name"] for l in walk.layers] == list(layers) == ["0"]
    assert walk.other_params == 3 and walk.frozen_params == 7 + 7 * 3  # 3: layer 2's bias
    assert walk.total_params == 5 * 7 + 7 + 7 * 3 + 3


def test_a_frozen_backbone_is_no_part_of_the_gradients_the_simulator_all_reduces():
    """A fine-tuned head on a frozen backbone: the workload model's parameters are those DDP
    all-reduces (the ones with a gradient), not the backbone's."""
    from kfacperf.workloads.workload_model import workload_model_of

    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    wm = workload_model_of(model, torch.randn(1, 3, 6, 6), name="finetune")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert wm.kfac_params + wm.other_params == trained == 8 * 16 + 16 + 16 * 4 + 4
    frozen = 3 * 8 * 9 + 8 + 2 * 8
    assert f"{frozen:,} frozen parameters" in wm.description
    assert wm.frozen_params == frozen  # still held: the planner counts their weights


def test_frozen_parameters_count_in_weight_memory_only_and_survive_the_file(tmp_path):
    """Frozen weights take 4 bytes each (6 in bf16, with autocast's copy) and no gradient,
    momentum or bucket; the workload file keeps the count."""
    from dataclasses import replace

    from kfacperf.plan.memory import memory_per_gpu
    from kfacperf.sim.models import load_workload_model, save_workload_model
    from kfacperf.workloads.workload_model import workload_model_of

    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    wm = workload_model_of(model, torch.randn(1, 6), name="head")
    frozen = replace(wm, frozen_params=1000)
    for dtype, per in (("fp32", 4), ("bf16", 6)):
        for strategy, world in (("sgd", 2), ("spngd", 2), ("kaisa", 1)):
            a = memory_per_gpu(wm, strategy=strategy, world_size=world, batch_per_gpu=8,
                               dtype=dtype)
            b = memory_per_gpu(frozen, strategy=strategy, world_size=world, batch_per_gpu=8,
                               dtype=dtype)
            assert b.weights - a.weights == per * 1000
            assert b.total - a.total == per * 1000, (dtype, strategy)
    path = save_workload_model(frozen, tmp_path / "head.toml")
    assert load_workload_model(path).frozen_params == 1000
    assert load_workload_model(save_workload_model(wm, tmp_path / "w.toml")).frozen_params == 0


def test_multihead_attention_out_proj_is_left_to_sgd_as_in_the_preconditioner():
    """nn.MultiheadAttention multiplies by out_proj.weight without calling out_proj: the
    preconditioner skips it, and so does the walk (not 'a layer the forward never uses');
    its FLOPs and parameters count with the rest."""
    from kfacperf.kfac.preconditioner import find_layers
    from kfacperf.workloads.describe import walk_model

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.ff = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ff(self.attn(x, x, x, need_weights=False)[0])

    model, t, d = Block(), 5, 8
    walk = walk_model(model, torch.randn(1, t, d))
    layers, skipped = find_layers(model)
    assert [l["name"] for l in walk.layers] == list(layers) == ["ff"]
    assert skipped == ["attn.out_proj"] and walk.kfac_problems == []
    assert walk.other_params == 3 * d * d + 3 * d + d * d + d  # in_proj and out_proj
    # in and out projections, QK^T and AV
    assert walk.total_flops - 2 * d * d * t == 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * t * d


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_linear_on_sequence_first_input_counts_every_position(batch_first):
    """nn.Linear on [B, T, F] or on sequence-first [T, B, F] (nn.Transformer's default):
    one example contributes T rows either way, each 2 F O FLOPs."""
    from kfacperf.workloads.describe import walk_model

    t, f, o = 6, 4, 3

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(f, o)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, F]
            return self.proj(x if batch_first else x.transpose(0, 1))

    [layer] = walk_model(Seq(), torch.randn(1, t, f)).layers
    assert layer["rows_per_example"] == t
    assert layer["fwd_flops_per_example"] == 2 * f * o * t
    assert (layer["in_elems_per_example"], layer["out_elems_per_example"]) == (t * f, t * o)
