"""A model whose branches only some examples take: ``head(h + branch(h) + late(h))`` with
``h = relu(stem(x))``, each branch applied to the rows its mask column selects, and not
called at all when it selects none (so a rank whose examples take no branch has no gradient
and no statistics of it)."""
from __future__ import annotations

import torch
from torch import nn


class Routed(nn.Module):
    """``relu_branch``: ``relu(branch(h))``; ``norm``: a LayerNorm before the head."""

    def __init__(self, *, relu_branch: bool = False, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 8)
        self.branch = nn.Linear(8, 8)
        self.late = nn.Linear(8, 8)
        self.norm: nn.Module = nn.LayerNorm(8) if norm else nn.Identity()
        self.head = nn.Linear(8, 4)
        self.relu_branch = relu_branch

    def _branch(self, t: torch.Tensor) -> torch.Tensor:
        out = self.branch(t)
        return torch.relu(out) if self.relu_branch else out

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        out = h
        for i, fn in enumerate((self._branch, self.late)):
            rows = masks[:, i].nonzero().flatten()
            if rows.numel():
                out = out.index_add(0, rows, fn(h[rows]))
        return self.head(self.norm(out))
