"""The --precision option: TF32 switches, bf16 autocast in the trainer, run.json, pooling."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kfacperf import vocab
from kfacperf.cli import main
from kfacperf.runtime import precision
from kfacperf.runtime.config import ProfileConfig
from kfacperf.runtime.training import TrainConfig, Trainer
from kfacperf.trace.store import load_trace
from kfacperf.validation.pooling import configuration_key

SMALL = ["--workload", "mlp", "--workload-option", "in_features=24",
         "--workload-option", "hidden=[16,12]", "--batch-size", "8"]


def _switches() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("name, tf32", [("fp32", False), ("tf32", True), ("bf16", True)])
def test_float32_math_sets_the_switches_and_restores_them(name, tf32):
    before = _switches()
    with precision.float32_math(name) as flags:
        assert _switches() == (tf32, tf32)
        assert flags == {"matmul_tf32": tf32, "cudnn_tf32": tf32}
    assert _switches() == before
    with pytest.raises(RuntimeError), precision.float32_math(name):
        raise RuntimeError("a failing run")
    assert _switches() == before


def test_names_and_autocast_dtype():
    assert vocab.COMPUTE_DTYPES == ("fp32", "tf32", "bf16")
    assert precision.autocast_dtype("bf16") is torch.bfloat16
    assert precision.autocast_dtype("fp32") is None and precision.autocast_dtype("tf32") is None
    with pytest.raises(ValueError, match="fp16"):
        precision.check("fp16")
    with precision.float32_math("bf16"):
        assert precision.run_flags("bf16") == {"matmul_tf32": True, "cudnn_tf32": True,
                                               "autocast": "bfloat16"}
    with precision.float32_math("fp32"):
        assert precision.run_flags("fp32")["autocast"] is None
    with pytest.raises(ValueError, match="precision .fp16."):
        ProfileConfig(workload="mlp", out="x", precision="fp16")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_trainer_runs_the_forward_pass_under_autocast(dtype):
    torch.manual_seed(0)
    net = _Net()
    seen: dict[str, torch.dtype] = {}
    for name, m in net.named_children():
        m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.dtype))
    trainer = Trainer(net, loss_fn=nn.functional.cross_entropy, autocast_dtype=dtype,
                      config=TrainConfig(optimizer="kfac", strategy="local"))
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    loss = trainer.train_step(x, y)
    want = dtype or torch.float32
    assert seen == {"conv": want, "fc": want}
    assert loss.dtype == torch.float32  # cross-entropy runs in float32 under autocast
    for layer in trainer.preconditioner.layers.values():  # factors stay float32
        assert layer.a_factor.dtype == layer.g_factor.dtype == torch.float32
        assert torch.isfinite(layer.a_factor).all() and torch.isfinite(layer.g_factor).all()
    for p in net.parameters():
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert not torch.is_autocast_enabled("cpu")  # nothing left switched on


def test_profile_records_the_precision_and_leaves_the_switches_alone(tmp_path):
    before = _switches()
    out = tmp_path / "bf16"
    assert main(["profile", *SMALL, "--optimizer", "kfac", "--strategy", "local",
                 "--precision", "bf16", "--steps", "2", "--warmup", "1",
                 "--out", str(out)]) == 0
    assert _switches() == before
    run = load_trace(out).run
    assert run["precision"] == "bf16"
    assert run["precision_flags"] == {"matmul_tf32": True, "cudnn_tf32": True,
                                      "autocast": "bfloat16"}
    default = tmp_path / "default"
    assert main(["profile", *SMALL, "--optimizer", "sgd", "--steps", "1", "--warmup", "0",
                 "--out", str(default)]) == 0
    run = load_trace(default).run
    assert run["precision"] == "fp32"
    assert run["precision_flags"] == {"matmul_tf32": False, "cudnn_tf32": False,
                                      "autocast": None}


def test_recordings_in_different_precisions_are_different_configurations():
    def trace(prec: str | None) -> SimpleNamespace:
        run = {"workload": "resnet50", "world_size": 1, "batch_per_rank": 32,
               "device": {"kind": "gpu", "name": "NVIDIA H200"}}
        if prec is not None:
            run["precision"] = prec
        return SimpleNamespace(run=run, path=None)

    keys = {configuration_key(trace(p)) for p in ("bf16", "tf32", "bf16")}
    assert len(keys) == 2
    assert configuration_key(trace(None)) == configuration_key(trace(None))


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="no denormal flush here")
def test_denormals_are_flushed_on_the_cpu_inside_the_block_only() -> None:
    tiny = torch.tensor([1e-39])  # below float32's smallest normal number (1.18e-38)
    assert (tiny * 1.0).item() > 0
    with precision.denormals_flushed("cpu") as flushed:
        assert flushed and (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() > 0
    with precision.denormals_flushed("cuda") as flushed:
        assert not flushed and (tiny * 1.0).item() > 0
