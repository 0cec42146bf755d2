"""A GPT-2 decoder language model (Radford et al., 2019), written from the paper: GPT-2 XL
(1.5 B parameters: 48 layers, hidden 1600, 25 heads, 1024 tokens, vocab 50257) by default.

GPT-2 is the decoder-only transformer of GPT (Radford et al., 2018: masked multi-head
self-attention, a GELU feed-forward of ``4 x hidden``, learned position embeddings) with the
paper's changes: LayerNorm moved to the input of each sub-block, an extra LayerNorm after the
last block, residual projections initialised with weights scaled by ``1/sqrt(2 N)``, and the
larger vocabulary and context.  The language-model head is the token embedding (tied
weights), so it is not a K-FAC layer of its own; its ``1024 x 1600 x 50257`` product per
sequence counts outside the K-FAC layers.

K-FAC layers per block: the query/key/value projection, the attention output projection, and
the two feed-forward layers.  ``fused_qkv`` (default, the layout of the released model's
parameters) makes query, key and value one ``hidden -> 3 x hidden`` projection (one K-FAC
layer with a 3x wider G factor); ``False`` makes them three layers.  The attention is causal
(the FLOP counter counts the full ``T x T`` products, as a kernel without block skipping
computes).  No dropout.
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Workload


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, fused_qkv: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        if fused_qkv:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        else:
            self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).split(d, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)

        def heads(y: Tensor) -> Tensor:  # [b, t, d] -> [b, h, t, d/h]
            return y.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        return cast(Tensor, self.proj(ctx.transpose(1, 2).reshape(b, t, d)))


class DecoderBlock(nn.Module):
    """Pre-LN block: ``x = x + attn(LN(x)); x = x + mlp(LN(x))``."""

    def __init__(self, hidden: int, num_heads: int, fused_qkv: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, num_heads, fused_qkv)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.fc_proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return cast(Tensor, x + self.fc_proj(F.gelu(self.fc(self.ln2(x)))))


class GPT2(nn.Module):
    """Token ids ``[batch, seq]`` -> next-token logits ``[batch, seq, vocab]``."""

    def __init__(self, *, vocab_size: int, context: int, hidden: int, num_layers: int,
                 num_heads: int, fused_qkv: bool) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Embedding(context, hidden)
        self.blocks = nn.ModuleList(DecoderBlock(hidden, num_heads, fused_qkv)
                                    for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(hidden)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok.weight)  # tied to the token embedding


def gpt2_xl_workload(
    *,
    vocab_size: int = 50257,
    seq_len: int = 1024,
    hidden: int = 1600,
    num_layers: int = 48,
    num_heads: int = 25,
    fused_qkv: bool = True,
) -> Workload:
    """GPT-2 language modelling on random token ids (targets: random next tokens)."""
    if hidden % num_heads:
        raise ValueError(f"gpt2: hidden={hidden} is not divisible by num_heads={num_heads}")

    def sample(batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
        return ids[:, :-1], ids[:, 1:]

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    options = {"vocab_size": vocab_size, "seq_len": seq_len, "hidden": hidden,
               "num_layers": num_layers, "num_heads": num_heads, "fused_qkv": fused_qkv}
    params = num_layers * 12 * hidden * hidden + (vocab_size + seq_len) * hidden
    return Workload(
        name="gpt2-xl",
        description=f"GPT-2 decoder LM: {num_layers} layers, hidden {hidden}, {num_heads} "
        f"heads, context {seq_len}, vocab {vocab_size} (~{params / 1e9:.2f} B parameters); "
        "random tokens",
        input_shape=(seq_len,), input_dtype=torch.long, num_classes=vocab_size,
        default_batch_size=8,
        model_factory=lambda: GPT2(vocab_size=vocab_size, context=seq_len, hidden=hidden,
                                   num_layers=num_layers, num_heads=num_heads,
                                   fused_qkv=fused_qkv),
        batch_sampler=sample, options=options, loss=loss,
    )
