"""Heads on top of the encoder: RoFormer's MLM head (on masked positions only) and mean-pool classifier."""

from __future__ import annotations

import torch
from torch import nn

from af_train.model.config import AudioFormerConfig
from af_train.model.encoder import activation_fn, init_weights
from af_train.tokens import IGNORE_INDEX

__all__ = ["MLMHead", "ClassificationHead", "masked_mean_pool", "gather_masked"]


class MLMPredictionTransform(nn.Module):
    def __init__(self, config: AudioFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation_fn(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class MLMPrediction(nn.Module):
    """Names as Hugging Face's ``cls.predictions``: ``transform.*``, ``decoder.weight``, ``bias``."""

    def __init__(self, config: AudioFormerConfig, word_embeddings: nn.Embedding | None) -> None:
        super().__init__()
        self.transform = MLMPredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        init_weights(self, config.initializer_range)
        if word_embeddings is not None:
            # Tied as Hugging Face ties them: one Parameter shared by both modules (ZeRO-3 gathers it
            # for whichever module runs).
            self.decoder.weight = word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # call the decoder module (not F.linear on its weight) so that ZeRO-3 gathers the tied weight
        return self.decoder(self.transform(hidden)) + self.bias


class MLMHead(nn.Module):
    """RoFormer's MLM head, evaluated only where ``labels != -100`` (gathered before the transform).

    ``forward(hidden [..., T, H], labels [..., T]) -> (logits [M, vocab], targets [M])`` for the M
    masked positions, in row-major order of ``labels``.
    """

    def __init__(self, config: AudioFormerConfig, word_embeddings: nn.Embedding | None = None) -> None:
        super().__init__()
        if config.tie_word_embeddings and word_embeddings is None:
            raise ValueError("MLMHead: tie_word_embeddings=True needs the encoder's word_embeddings")
        self.predictions = MLMPrediction(config, word_embeddings if config.tie_word_embeddings else None)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        selected, targets = gather_masked(hidden, labels)
        return self.predictions(selected), targets


def gather_masked(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``hidden`` [..., T, H] where ``labels`` [..., T] != -100, and those labels."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"MLM labels must have the shape of the hidden states without the last dim: "
            f"labels {list(labels.shape)} vs hidden {list(hidden.shape)}"
        )
    flat_labels = labels.reshape(-1)
    index = (flat_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), flat_labels.index_select(0, index)


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, H] over real tokens (mask 1); an all-padding row pools to zeros.

    Sums in float32 (bf16 sums over ~750 tokens lose digits) and returns ``hidden``'s dtype.
    """
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if attention_mask is None:
        return hidden.to(compute).mean(dim=1).to(hidden.dtype)
    weights = attention_mask.to(compute).unsqueeze(-1)
    total = (hidden.to(compute) * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1.0)
    return (total / count).to(hidden.dtype)


class ClassificationHead(nn.Module):
    """Masked mean pooling, dropout, then one linear layer to ``num_classes`` logits."""

    def __init__(self, config: AudioFormerConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ClassificationHead needs num_classes >= 1, got {num_classes}")
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_classes)
        init_weights(self, config.initializer_range)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))
