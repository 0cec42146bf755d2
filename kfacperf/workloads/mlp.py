"""A plain multi-layer perceptron on flat inputs (Linear + ReLU, Linear classifier)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .base import Workload, gaussian_classification


class MLP(nn.Module):
    """``in_features -> hidden[0] -> ... -> hidden[-1] -> num_classes`` with ReLU between."""

    def __init__(self, *, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.net(x.flatten(1)))


def mlp_workload(
    *, in_features: int = 784, hidden: tuple[int, ...] = (512, 256), num_classes: int = 10
) -> Workload:
    """MNIST-sized MLP on N(0, 1) inputs with random labels (a cost workload, not learnable)."""
    hidden = tuple(int(h) for h in hidden)
    return Workload(
        name="mlp",
        description=f"MLP {in_features}-{'-'.join(map(str, hidden))}-{num_classes} (ReLU), "
        "Gaussian inputs, random labels",
        input_shape=(in_features,),
        input_dtype=torch.float32,
        num_classes=num_classes,
        default_batch_size=128,
        model_factory=lambda: MLP(in_features=in_features, hidden=hidden, num_classes=num_classes),
        batch_sampler=gaussian_classification((in_features,), num_classes),
        options={"in_features": in_features, "hidden": hidden, "num_classes": num_classes},
    )
