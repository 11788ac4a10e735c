"""Language modelling as a task: next-token cross-entropy on (B, T, V) logits (docs/methods.md, "Token models").

A batch's input is (B, T) token ids and its target the same sequence shifted by one, (B, T). The headline is
bits per token (``bpt``: the mean cross-entropy over tokens in base 2; for the byte-level reader of
:mod:`locallearn.data.text` that is bits per byte), lower is better; evaluation also reports perplexity
(``ppl`` = e^(mean cross-entropy per token)) and next-token accuracy. Each local module's aux net predicts the
next token from that module's hidden states at every position (:class:`NextTokenHead`): the language-model
counterpart of DGL's aux classifier, as no local-learning paper defines one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.units import UnitInfo
from .task import Batch, Metric, Task


class NextTokenHead(nn.Module):
    """LayerNorm and a linear map to the vocabulary at every position of a (B, T, C) hidden state."""

    def __init__(self, channels: int, vocab_size: int) -> None:
        super().__init__()
        self.norm, self.out = nn.LayerNorm(channels), nn.Linear(channels, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(h))


def token_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position, (B, T), in fp32."""
    b, t, v = logits.shape
    return F.cross_entropy(logits.float().reshape(b * t, v), target.reshape(b * t), reduction="none").view(b, t)


class _TokenMetrics:
    def __init__(self) -> None:
        self.nats, self.hits, self.tokens = None, None, 0

    def update(self, output: torch.Tensor, batch: Batch) -> None:
        nats, hits = token_losses(output, batch.target).sum(), (output.argmax(-1) == batch.target).sum()
        self.nats = nats if self.nats is None else self.nats + nats
        self.hits = hits if self.hits is None else self.hits + hits
        self.tokens += batch.target.numel()

    def compute(self) -> dict[str, float]:
        if self.nats is None:
            return {"bpt": 0.0, "ppl": 0.0, "acc": 0.0}
        nats = self.nats.item() / self.tokens
        return {"bpt": nats / math.log(2), "ppl": math.exp(nats), "acc": self.hits.item() / self.tokens}


class LanguageModelTask(Task):
    """Next-token prediction over a vocabulary of ``vocab_size`` tokens (module doc)."""

    kind, headline, higher_is_better = "language_model", "bpt", False

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"a language model needs a vocabulary of at least 2 tokens, got {vocab_size}")
        self.vocab_size = vocab_size

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if logits.dim() != 3 or logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"a language model predicts (batch, tokens, {self.vocab_size}) logits, got {tuple(logits.shape)}; "
                f"build the model for a vocabulary of {self.vocab_size} (model.kwargs.vocab_size={self.vocab_size})"
            )
        return token_losses(logits, batch.target).mean()

    def metrics(self) -> Metric:
        return _TokenMetrics()

    def train_stat(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Each sequence's bits per token, summed over the batch."""
        return token_losses(output, batch.target).mean(1).sum() / math.log(2)

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.vocab_size}

    def check(self, batch: Batch) -> None:
        target = batch.target
        if target.dtype.is_floating_point or target.dim() != 2 or target.shape != batch.input.shape[:2]:
            raise ValueError(
                f"language-model targets are the next token ids, (batch, tokens) like the input "
                f"{tuple(batch.input.shape)}, got {tuple(target.shape)} {target.dtype}"
            )

    def plain_head(self, info: UnitInfo, image_channels: int) -> nn.Module:
        """The next-token head on a module's hidden states (module doc)."""
        return NextTokenHead(info.channels, self.vocab_size)
