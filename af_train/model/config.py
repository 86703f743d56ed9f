"""Encoder configuration: a dataclass whose field names follow Hugging Face ``RoFormerConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from af_train.tokens import SpecialTokens

_SPECIAL = SpecialTokens(1024)

# Activations the encoder supports, by Hugging Face name (ACT2FN) -> torch.nn.functional.gelu kwargs.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")

_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo recipe (no attention dropout: the demo's numbers stay as published).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 attention_probs_dropout_prob=0.0),
    # As roformer_chinese_small.
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                  attention_probs_dropout_prob=0.1),
    # As RoFormer-base / BERT-base (the AudioFormer paper's size).
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 attention_probs_dropout_prob=0.1),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  attention_probs_dropout_prob=0.1),
}


@dataclass
class AudioFormerConfig:
    """RoFormer encoder hyper-parameters (names as in ``transformers.RoFormerConfig``).

    Dropout as in Hugging Face: ``hidden_dropout_prob`` on the embeddings, attention output and FFN
    output; ``attention_probs_dropout_prob`` on the attention probabilities, inside the fused attention
    (SDPA's or, on CPU, the reference's own dropout; in-kernel Philox dropout on the Triton path), in
    training mode only. The ``small``/``base``/``large`` presets use 0.1 for both, as RoFormer/BERT;
    ``tiny`` (CPU tests, demo) and the dataclass default use no attention dropout.

    Differences from Hugging Face, all deliberate:
    - ``rotary_base`` is a field (Hugging Face hard-codes 10000); export refuses any other value.
    - ``row_embedding``: when True the token-type embedding table is indexed by the EnCodec codebook
      row of the sequence (joint multi-row pretraining); Hugging Face users then pass
      ``token_type_ids`` filled with the row index. When False every token uses type 0 (as Hugging
      Face does without ``token_type_ids``).
    """

    vocab_size: int = _SPECIAL.vocab_size  # 1024 codes + 8 special tokens
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 256
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 1536
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = _SPECIAL.pad
    rotary_base: float = 10000.0
    row_embedding: bool = False
    tie_word_embeddings: bool = True  # the MLM decoder reuses the word embeddings (RoFormer's default)
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"AudioFormerConfig: {message}")

        need(self.hidden_size > 0 and self.num_attention_heads > 0, "hidden_size and num_attention_heads must be > 0")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
            f"({self.num_attention_heads})",
        )
        need(self.head_dim % 2 == 0, f"rotary embeddings need an even head size, got {self.head_dim}")
        need(self.num_hidden_layers >= 1, f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        need(self.intermediate_size >= 1, f"intermediate_size must be >= 1, got {self.intermediate_size}")
        need(self.hidden_act in SUPPORTED_ACTIVATIONS,
             f"hidden_act '{self.hidden_act}' is not supported; choose one of {', '.join(SUPPORTED_ACTIVATIONS)}")
        need(0.0 <= self.hidden_dropout_prob < 1.0,
             f"hidden_dropout_prob must be in [0, 1), got {self.hidden_dropout_prob}")
        need(0.0 <= self.attention_probs_dropout_prob < 1.0,
             f"attention_probs_dropout_prob must be in [0, 1), got {self.attention_probs_dropout_prob}")
        need(self.max_position_embeddings >= 1, "max_position_embeddings must be >= 1")
        need(self.type_vocab_size >= 1, f"type_vocab_size must be >= 1, got {self.type_vocab_size}")
        need(0 <= self.pad_token_id < self.vocab_size,
             f"pad_token_id ({self.pad_token_id}) must be inside the vocabulary (size {self.vocab_size})")
        need(self.rotary_base > 0, f"rotary_base must be > 0, got {self.rotary_base}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AudioFormerConfig:
        """``tiny`` (2 x 64, CPU tests), ``small`` (6 x 384), ``base`` (12 x 768), ``large`` (24 x 1024)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown AudioFormer preset '{name}'; choose one of {', '.join(_PRESETS)}")
        return cls.from_dict({**_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioFormerConfig:
        """Build from a mapping (e.g. ``asdict`` of a saved config); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"AudioFormerConfig has no field '{unknown[0]}'; fields are {', '.join(sorted(names))}"
            )
        return cls(**data)

    @classmethod
    def from_recipe(cls, model: Any, codebook_size: int = 1024) -> AudioFormerConfig:
        """From the recipe's ``model`` section (``af_train.config.ModelConfig``); the vocabulary follows the
        tokenizer's ``codebook_size`` (code ids first, the special tokens above them)."""
        special = SpecialTokens(int(codebook_size))
        return cls.preset(
            model.preset, **model.overrides(), activation_checkpointing=model.activation_checkpointing,
            vocab_size=special.vocab_size, pad_token_id=special.pad,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Fields that describe the architecture (weights' shapes and maths), as opposed to training-time
    # settings (dropout, checkpointing).
    ARCHITECTURE_FIELDS = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
        "rotary_base", "row_embedding",
    )

    def architecture_differences(self, other: AudioFormerConfig) -> list[str]:
        """``['hidden_size: 64 vs 128', ...]`` for architecture fields that differ."""
        return [
            f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in self.ARCHITECTURE_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]
