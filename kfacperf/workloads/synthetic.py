"""The learnable synthetic task: labels from a fixed random teacher network.

Inputs are N(0, I) vectors; the label of ``x`` is ``argmax teacher(x)`` where the teacher is a
small tanh MLP initialised from :data:`TEACHER_SEED` (independent of the student's seed and of
the data seed).  The teacher's output biases are shifted so that every class is about equally
frequent; without that a random teacher puts most inputs in one or two classes and "learning"
reduces to predicting the majority class.  The model trained on it is a student MLP.
"""
from __future__ import annotations

import functools
from typing import cast

import torch
from torch import Tensor, nn

from .base import Workload, seeded_build
from .mlp import MLP

TEACHER_SEED = 20240917
"""Seed of the teacher's weights; fixed so the task is the same in every run."""

_BALANCE_SAMPLES = 8192


class Teacher(nn.Module):
    """``in_features -> hidden -> num_classes`` tanh network with frozen, balanced weights."""

    def __init__(self, *, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        # A larger first-layer scale makes the decision boundaries non-linear in x.
        nn.init.normal_(self.fc1.weight, std=2.0 / in_features**0.5)
        nn.init.normal_(self.fc2.weight, std=1.0 / hidden**0.5)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.fc2(torch.tanh(self.fc1(x))))


@functools.lru_cache(maxsize=8)
def teacher_network(in_features: int, hidden: int, num_classes: int) -> Teacher:
    """The fixed teacher for a task shape (built once per process, deterministic)."""

    def build() -> Teacher:
        t = Teacher(in_features=in_features, hidden=hidden, num_classes=num_classes)
        gen = torch.Generator().manual_seed(TEACHER_SEED)
        x = torch.randn(_BALANCE_SAMPLES, in_features, generator=gen)
        with torch.no_grad():
            # Centre each logit so no class dominates (median shift -> roughly balanced labels).
            t.fc2.bias.copy_(-t(x).median(dim=0).values)
        return t

    return seeded_build(build, TEACHER_SEED)


def teacher_workload(
    *,
    in_features: int = 32,
    teacher_hidden: int = 64,
    student_hidden: tuple[int, ...] = (128, 128),
    num_classes: int = 10,
) -> Workload:
    """Student MLP learning the labels of :func:`teacher_network` on Gaussian inputs."""
    student_hidden = tuple(int(h) for h in student_hidden)

    def sample(batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch_size, in_features, generator=gen)
        with torch.no_grad():
            y = teacher_network(in_features, teacher_hidden, num_classes)(x).argmax(dim=1)
        return x, y

    return Workload(
        name="teacher",
        description=f"learnable task: labels of a fixed random {in_features}-{teacher_hidden}-"
        f"{num_classes} tanh teacher on Gaussian inputs; student MLP "
        f"{in_features}-{'-'.join(map(str, student_hidden))}-{num_classes}",
        input_shape=(in_features,),
        input_dtype=torch.float32,
        num_classes=num_classes,
        default_batch_size=256,
        model_factory=lambda: MLP(
            in_features=in_features, hidden=student_hidden, num_classes=num_classes
        ),
        batch_sampler=sample,
        options={
            "in_features": in_features,
            "teacher_hidden": teacher_hidden,
            "student_hidden": student_hidden,
            "num_classes": num_classes,
        },
    )
