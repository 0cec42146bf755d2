"""A small BERT-style encoder classifier (Devlin et al., 2019), written from the paper.

Token + learned position embeddings, LayerNorm, ``num_layers`` post-LayerNorm encoder layers
(multi-head self-attention with separate ``nn.Linear`` q/k/v/out projections, then a
Linear-GELU-Linear feed-forward, each sub-layer as ``LayerNorm(x + sublayer(x))``), and a Linear
classifier on the first token's final hidden state.  No dropout (runs are deterministic).

K-FAC layers: 6 Linears per encoder layer (q, k, v, out, ff1, ff2) plus the classifier; the
Linears inside the encoder see ``[batch, seq, d]`` inputs, so each example contributes
``seq_len`` rows to their factors.  Embeddings and LayerNorms are left to the first-order
optimizer.
"""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Workload


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (no mask)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.num_heads

        def heads(y: Tensor) -> Tensor:  # [b, t, d] -> [b, h, t, d/h]
            return y.view(b, t, h, d // h).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return cast(Tensor, self.out(ctx.transpose(1, 2).reshape(b, t, d)))


class EncoderLayer(nn.Module):
    """Post-LN encoder layer: ``x = LN(x + attn(x)); x = LN(x + ffn(x))``."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int) -> None:
        super().__init__()
        self.attn = SelfAttention(d_model, num_heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.ln2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(x + self.attn(x))
        return cast(Tensor, self.ln2(x + self.ff2(F.gelu(self.ff1(x)))))


class TransformerClassifier(nn.Module):
    """Token ids ``[batch, seq]`` (int64) -> class logits ``[batch, num_classes]``."""

    def __init__(
        self,
        *,
        vocab_size: int,
        max_seq_len: int,
        d_model: int,
        num_heads: int,
        num_layers: int,
        d_ff: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_seq_len, d_model)
        self.ln = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, d_ff) for _ in range(num_layers)
        )
        self.classifier = nn.Linear(d_model, num_classes)
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError("expected int64 token ids [batch, seq], "
                             f"got {ids.dtype} {tuple(ids.shape)}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln(self.tok(ids) + self.pos(pos))
        for layer in self.layers:
            x = layer(x)
        return cast(Tensor, self.classifier(x[:, 0]))


def transformer_workload(
    *,
    vocab_size: int = 1024,
    seq_len: int = 64,
    d_model: int = 128,
    num_heads: int = 4,
    num_layers: int = 2,
    d_ff: int = 512,
    num_classes: int = 2,
) -> Workload:
    """Small BERT-style encoder on uniformly random token ids with random labels."""

    def sample(batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
        return ids, torch.randint(0, num_classes, (batch_size,), generator=gen)

    options = {
        "vocab_size": vocab_size, "seq_len": seq_len, "d_model": d_model,
        "num_heads": num_heads, "num_layers": num_layers, "d_ff": d_ff,
        "num_classes": num_classes,
    }
    if d_model % num_heads:
        raise ValueError(f"transformer d_model={d_model} is not divisible by num_heads={num_heads}")
    return Workload(
        name="transformer",
        description=f"BERT-style encoder: {num_layers} layers, d={d_model}, {num_heads} heads, "
        f"ffn {d_ff}, seq {seq_len}, vocab {vocab_size}; random tokens and labels",
        input_shape=(seq_len,),
        input_dtype=torch.long,
        num_classes=num_classes,
        default_batch_size=32,
        model_factory=lambda: TransformerClassifier(
            vocab_size=vocab_size, max_seq_len=seq_len, d_model=d_model, num_heads=num_heads,
            num_layers=num_layers, d_ff=d_ff, num_classes=num_classes,
        ),
        batch_sampler=sample,
        options=options,
    )
