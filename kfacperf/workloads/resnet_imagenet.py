"""ImageNet ResNet-50 (He et al., 2016) with bottleneck blocks, written from the paper.

Stem: 7x7/2 conv (64) - BN - ReLU - 3x3/2 max-pool; four stages of 3, 4, 6, 3 bottleneck
blocks (1x1 reduce, 3x3, 1x1 expand x4; widths 64, 128, 256, 512); the stride of a stage's
first block sits on its 3x3 conv (the common "v1.5" placement); the first block of every stage
has a 1x1 conv + BN projection shortcut.  Global average pooling and a 2048 -> 1000 Linear.

K-FAC layers: 1 + 16*3 + 4 = 53 convolutions and the classifier = 54; 25,557,032 parameters.
Average pooling is adaptive, so ``image_size`` may be smaller than 224 (e.g. for CPU tests).
"""
from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .base import Workload, gaussian_classification

EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 - 3x3(stride) - 1x1 convs with BN, projection shortcut when the shape changes."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * EXPANSION
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # The projection runs after the main branch so forward order is conv1-3, downsample.
        identity = x if self.downsample is None else self.downsample(x)
        return cast(Tensor, self.relu(out + identity))


class ResNet50(nn.Module):
    """Bottleneck ResNet with stage depths (3, 4, 6, 3)."""

    def __init__(self, *, num_classes: int = 1000, depths: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = 64
        stages = []
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for b in range(depth):
                blocks.append(Bottleneck(c_in, width, 2 if (i > 0 and b == 0) else 1))
                c_in = width * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return cast(Tensor, self.fc(self.avgpool(x).flatten(1)))


def resnet50_workload(*, image_size: int = 224, num_classes: int = 1000) -> Workload:
    """ImageNet ResNet-50 on Gaussian ``3 x image_size x image_size`` images, random labels."""
    if image_size < 32:
        raise ValueError(f"resnet50 image_size must be >= 32 (5 stride-2 stages), got {image_size}")
    shape = (3, image_size, image_size)
    return Workload(
        name="resnet50",
        description=f"ImageNet ResNet-50 (bottleneck, 54 K-FAC layers), 3x{image_size}x"
        f"{image_size} Gaussian images, {num_classes} random labels",
        input_shape=shape,
        input_dtype=torch.float32,
        num_classes=num_classes,
        default_batch_size=32,
        model_factory=lambda: ResNet50(num_classes=num_classes),
        batch_sampler=gaussian_classification(shape, num_classes),
        options={"image_size": image_size, "num_classes": num_classes},
    )
