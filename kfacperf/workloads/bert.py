"""BERT pre-training (Devlin et al., 2019), written from the paper: BERT-Large by default.

Token, position (512) and segment embeddings summed, LayerNorm; ``num_layers`` post-LayerNorm
encoder layers (:class:`~kfacperf.workloads.transformer.EncoderLayer`: multi-head
self-attention with separate q/k/v/out projections, then a GELU feed-forward of ``4 x hidden``);
then the two pre-training heads of the paper:

* **masked LM**: at the masked positions, a dense layer + GELU + LayerNorm and the output
  projection onto the vocabulary, whose weight is the token embedding's (tied), plus a bias.
  15% of the tokens are masked (``mlm_fraction``), so ``ceil(0.15 * seq_len)`` positions are
  predicted per sequence (20 at 128 tokens).  Which positions does not change the cost: here
  the first ones after ``[CLS]``.
* **next sentence prediction**: the pooler (dense + tanh on ``[CLS]``) and a 2-way classifier.

K-FAC layers: the 6 Linears of every encoder layer, the masked-LM transform, the pooler and
the NSP classifier.  The tied output projection is not a layer of its own (K-FAC leaves the
embedding and its 30522-wide output to the first-order optimizer, as KAISA's and
PipeFisher's BERT runs do); its FLOPs count outside the K-FAC layers.  The first half of each
sequence is segment A, the second segment B; no padding, no dropout.

``bert_large_block`` is one encoder layer of BERT-Large alone on random hidden states (the
unit PipeFisher times per stage); its loss is the mean squared output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Workload
from .transformer import EncoderLayer

MAX_POSITIONS = 512
SEGMENTS = 2


class BertPretraining(nn.Module):
    """Token ids ``[batch, seq]`` -> ``(mlm_logits [batch, P, vocab], nsp_logits [batch, 2])``."""

    def __init__(self, *, vocab_size: int, hidden: int, num_layers: int, num_heads: int,
                 ffn: int, predictions: int) -> None:
        super().__init__()
        self.predictions = predictions
        self.tok = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Embedding(MAX_POSITIONS, hidden)
        self.seg = nn.Embedding(SEGMENTS, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, num_heads, ffn)
                                    for _ in range(num_layers))
        self.mlm_transform = nn.Linear(hidden, hidden)
        self.mlm_ln = nn.LayerNorm(hidden)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.pooler = nn.Linear(hidden, hidden)
        self.nsp = nn.Linear(hidden, 2)
        for emb in (self.tok, self.pos, self.seg):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device)
        segments = (positions >= t // 2).long()
        x = self.ln(self.tok(ids) + self.pos(positions) + self.seg(segments))
        for layer in self.layers:
            x = layer(x)
        masked = x[:, 1:1 + self.predictions]
        h = self.mlm_ln(F.gelu(self.mlm_transform(masked)))
        mlm = F.linear(h, self.tok.weight, self.mlm_bias)  # tied to the token embedding
        nsp = self.nsp(torch.tanh(self.pooler(x[:, 0])))
        return mlm, nsp


def bert_large_workload(
    *,
    vocab_size: int = 30522,
    seq_len: int = 128,
    hidden: int = 1024,
    num_layers: int = 24,
    num_heads: int = 16,
    ffn: int = 4096,
    mlm_fraction: float = 0.15,
) -> Workload:
    """BERT pre-training (masked LM + next sentence) on random token ids and labels."""
    if hidden % num_heads:
        raise ValueError(f"bert: hidden={hidden} is not divisible by num_heads={num_heads}")
    if not 2 <= seq_len <= MAX_POSITIONS:
        raise ValueError(f"bert: seq_len must be in [2, {MAX_POSITIONS}], got {seq_len}")
    if not 0 < mlm_fraction <= 1:
        raise ValueError(f"bert: mlm_fraction must be in (0, 1], got {mlm_fraction}")
    predictions = min(seq_len - 1, math.ceil(mlm_fraction * seq_len))

    def sample(batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
        mlm = torch.randint(0, vocab_size, (batch_size, predictions), generator=gen)
        nsp = torch.randint(0, 2, (batch_size, 1), generator=gen)
        return ids, torch.cat([mlm, nsp], dim=1)

    def loss(outputs: tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        mlm, nsp = outputs
        return (F.cross_entropy(mlm.reshape(-1, mlm.shape[-1]), targets[:, :-1].reshape(-1))
                + F.cross_entropy(nsp, targets[:, -1]))

    options = {"vocab_size": vocab_size, "seq_len": seq_len, "hidden": hidden,
               "num_layers": num_layers, "num_heads": num_heads, "ffn": ffn,
               "mlm_fraction": mlm_fraction}
    return Workload(
        name="bert-large",
        description=f"BERT pre-training (MLM + NSP): {num_layers} layers, hidden {hidden}, "
        f"{num_heads} heads, ffn {ffn}, seq {seq_len} ({predictions} masked), vocab "
        f"{vocab_size}; random tokens and labels",
        input_shape=(seq_len,), input_dtype=torch.long, num_classes=vocab_size,
        default_batch_size=32,
        model_factory=lambda: BertPretraining(
            vocab_size=vocab_size, hidden=hidden, num_layers=num_layers, num_heads=num_heads,
            ffn=ffn, predictions=predictions),
        batch_sampler=sample, options=options, loss=loss,
    )


def bert_large_block_workload(
    *, seq_len: int = 128, hidden: int = 1024, num_heads: int = 16, ffn: int = 4096,
) -> Workload:
    """One BERT-Large encoder layer on N(0, 1) hidden states ``[batch, seq, hidden]``."""
    return _block_workload("bert-large-block", seq_len=seq_len, hidden=hidden,
                           num_heads=num_heads, ffn=ffn)


def bert_base_block_workload(
    *, seq_len: int = 128, hidden: int = 768, num_heads: int = 12, ffn: int = 3072,
) -> Workload:
    """One BERT-Base encoder layer on N(0, 1) hidden states ``[batch, seq, hidden]``."""
    return _block_workload("bert-base-block", seq_len=seq_len, hidden=hidden,
                           num_heads=num_heads, ffn=ffn)


def _block_workload(name: str, *, seq_len: int, hidden: int, num_heads: int,
                    ffn: int) -> Workload:
    if hidden % num_heads:
        raise ValueError(f"bert block: hidden={hidden} is not divisible by num_heads={num_heads}")

    def sample(batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch_size, seq_len, hidden, generator=gen)
        return x, torch.zeros(batch_size)

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs.square().mean()

    return Workload(
        name=name,
        description=f"one BERT encoder layer: hidden {hidden}, {num_heads} heads, ffn {ffn}, "
        f"seq {seq_len}; random hidden states",
        input_shape=(seq_len, hidden), input_dtype=torch.float32, num_classes=0,
        default_batch_size=32,
        model_factory=lambda: EncoderLayer(hidden, num_heads, ffn),
        batch_sampler=sample,
        options={"seq_len": seq_len, "hidden": hidden, "num_heads": num_heads, "ffn": ffn},
        loss=loss,
    )
