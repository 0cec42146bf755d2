"""CIFAR-style ResNet-20/32 (He et al., 2016, section 4.2): 6n+2 layers, 3x32x32 input.

A 3x3 stem conv (16 channels), three stages of ``n`` basic blocks with 16, 32 and 64
channels (the first block of stages 2 and 3 halves the resolution), global average pooling
and a Linear classifier.  ResNet-20 is n=3, ResNet-32 is n=5.

Shortcuts: where a block changes shape the shortcut is a 1x1 stride-2 convolution followed by
BatchNorm (the paper's option B) rather than option A's zero-padded identity, so those two
projections are K-FAC layers too.  ResNet-20 therefore has 19 + 2 convolutions and one Linear
= 22 K-FAC layers; ResNet-32 has 31 + 2 + 1 = 34.  Convolutions have no bias (BatchNorm
follows each one).
"""
from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .base import Workload, gaussian_classification


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return cast(Tensor, self.relu(out + self.shortcut(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images."""

    def __init__(self, *, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        c_in = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(c_in, width, stride))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return cast(Tensor, self.fc(self.pool(x).flatten(1)))


def _cifar_resnet(depth: int, num_classes: int) -> Workload:
    n = (depth - 2) // 6
    return Workload(
        name=f"resnet{depth}",
        description=f"CIFAR ResNet-{depth} (n={n}, 1x1-conv option-B shortcuts), "
        f"3x32x32 Gaussian images, {num_classes} random labels",
        input_shape=(3, 32, 32),
        input_dtype=torch.float32,
        num_classes=num_classes,
        default_batch_size=128,
        model_factory=lambda: CifarResNet(blocks_per_stage=n, num_classes=num_classes),
        batch_sampler=gaussian_classification((3, 32, 32), num_classes),
        options={"num_classes": num_classes},
    )


def resnet20_workload(*, num_classes: int = 10) -> Workload:
    """CIFAR ResNet-20 (22 K-FAC layers)."""
    return _cifar_resnet(20, num_classes)


def resnet32_workload(*, num_classes: int = 10) -> Workload:
    """CIFAR ResNet-32 (34 K-FAC layers)."""
    return _cifar_resnet(32, num_classes)
