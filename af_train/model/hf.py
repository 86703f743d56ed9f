"""Hugging Face interchange: ``export_roformer`` writes a ``transformers`` RoFormer directory,
``import_roformer`` reads one back into a ``RoFormerEncoder``.

The exported directory loads with ``transformers.RoFormerModel.from_pretrained`` (or
``RoFormerForMaskedLM`` when an MLM head was exported too) and computes the same hidden states as our
encoder to float32 rounding. Conventions a user of the exported model must follow:

- token ids: EnCodec codes 0..1023, PAD=1024, MASK=1025, BOA=1026, EOA=1027 (vocabulary 1032); one
  sequence is ``BOA + codes of one codebook row + EOA``, padded with PAD, with an ``attention_mask``;
- a model pretrained with ``row_embedding`` (joint multi-row) expects ``token_type_ids`` filled with
  the codebook row of the sequence; otherwise leave ``token_type_ids`` unset (all zeros);
- hidden states at padded positions are computed (attending to the real tokens) but meaningless:
  pool with the attention mask.

Our own fields that Hugging Face's config cannot express are stored in ``config.json`` under
``af_train_config``; ``import_roformer`` reads them back so that export followed by import is the
identity (same config, bit-identical weights).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from af_train.model.config import AudioFormerConfig
from af_train.model.encoder import RoFormerEncoder
from af_train.model.heads import MLMHead
from kernels.reference import rotary_tables

__all__ = ["export_roformer", "import_roformer", "hf_config", "sinusoidal_positions", "HF_POSITIONS_KEY"]

HF_POSITIONS_KEY = "encoder.embed_positions.weight"
HF_EXTRA_KEY = "af_train_config"


def sinusoidal_positions(config: AudioFormerConfig) -> torch.Tensor:
    """Hugging Face's ``embed_positions`` table [max_positions, head_dim]: sin in the first half, cos in
    the second, i.e. our rotary tables side by side."""
    cos, sin = rotary_tables(config.max_position_embeddings, config.head_dim, config.rotary_base)
    return torch.cat([sin, cos], dim=1)


def hf_config(config: AudioFormerConfig, **extra: Any):
    """The ``transformers.RoFormerConfig`` equivalent to ``config``."""
    from transformers import RoFormerConfig

    if config.rotary_base != 10000.0:
        raise ValueError(
            f"Hugging Face RoFormer hard-codes a rotary base of 10000; this encoder uses {config.rotary_base} "
            "and cannot be exported faithfully"
        )
    return RoFormerConfig(
        vocab_size=config.vocab_size,
        embedding_size=config.hidden_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id,
        rotary_value=False,
        tie_word_embeddings=config.tie_word_embeddings,
        **{HF_EXTRA_KEY: asdict(config)},
        **extra,
    )


def export_roformer(
    encoder: RoFormerEncoder,
    out_dir: str | Path,
    mlm_head: MLMHead | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``encoder`` (and optionally its MLM head) as a Hugging Face RoFormer directory.

    Without ``mlm_head`` the directory holds a ``RoFormerModel``; with it, a ``RoFormerForMaskedLM``
    (which ``RoFormerModel.from_pretrained`` also loads, dropping the head). ``extra_config`` entries
    are stored in ``config.json`` (e.g. ``af_train_code_row``).
    """
    from transformers import RoFormerForMaskedLM, RoFormerModel

    config = encoder.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in encoder.state_dict().items()}
    state[HF_POSITIONS_KEY] = sinusoidal_positions(config)
    hf_cfg = hf_config(config, **(extra_config or {}))
    if mlm_head is None:
        hf_cfg.architectures = ["RoFormerModel"]
        model = RoFormerModel(hf_cfg)
    else:
        hf_cfg.architectures = ["RoFormerForMaskedLM"]
        model = RoFormerForMaskedLM(hf_cfg)
        state = {f"roformer.{k}": v for k, v in state.items()}
        for name, tensor in mlm_head.state_dict().items():
            state[f"cls.{name}"] = tensor.detach().to("cpu", torch.float32)
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
        if config.tie_word_embeddings:
            state["cls.predictions.decoder.weight"] = state["roformer.embeddings.word_embeddings.weight"]
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out_dir)
    return out_dir


def _config_from_hf(hf_cfg: Any, where: str) -> AudioFormerConfig:
    ours = getattr(hf_cfg, HF_EXTRA_KEY, None)
    if ours is not None:
        return AudioFormerConfig.from_dict(dict(ours))
    # A RoFormer directory that af_train did not write: map what Hugging Face expresses.
    if getattr(hf_cfg, "embedding_size", hf_cfg.hidden_size) != hf_cfg.hidden_size:
        raise ValueError(f"{where}: embedding_size != hidden_size (embeddings_project) is not supported")
    if getattr(hf_cfg, "rotary_value", False):
        raise ValueError(f"{where}: rotary_value=True (rotary on values) is not supported")
    if getattr(hf_cfg, "is_decoder", False):
        raise ValueError(f"{where}: a decoder RoFormer (is_decoder=True) is not supported")
    return AudioFormerConfig(
        vocab_size=hf_cfg.vocab_size,
        hidden_size=hf_cfg.hidden_size,
        num_hidden_layers=hf_cfg.num_hidden_layers,
        num_attention_heads=hf_cfg.num_attention_heads,
        intermediate_size=hf_cfg.intermediate_size,
        hidden_act=hf_cfg.hidden_act,
        hidden_dropout_prob=hf_cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=hf_cfg.attention_probs_dropout_prob,
        max_position_embeddings=hf_cfg.max_position_embeddings,
        type_vocab_size=hf_cfg.type_vocab_size,
        initializer_range=hf_cfg.initializer_range,
        layer_norm_eps=hf_cfg.layer_norm_eps,
        pad_token_id=hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None else 0,
        tie_word_embeddings=getattr(hf_cfg, "tie_word_embeddings", True),
    )


def import_roformer(model_dir: str | Path) -> RoFormerEncoder:
    """Read a Hugging Face RoFormer directory (``RoFormerModel`` or ``RoFormerForMaskedLM``)."""
    from transformers import RoFormerConfig, RoFormerModel

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"'{model_dir}' is not a Hugging Face model directory (no config.json); "
            "write one with af_train.model.hf.export_roformer or af-export-hf"
        )
    hf_cfg = RoFormerConfig.from_pretrained(model_dir)
    config = _config_from_hf(hf_cfg, str(model_dir))
    hf_model = RoFormerModel.from_pretrained(model_dir, config=hf_cfg)
    state = hf_model.state_dict()
    positions = state.pop(HF_POSITIONS_KEY)
    expected = sinusoidal_positions(config)
    if positions.shape != expected.shape or not torch.allclose(positions.float(), expected, atol=1e-6, rtol=0):
        raise ValueError(
            f"{model_dir}: '{HF_POSITIONS_KEY}' is not the standard sinusoidal table for rotary base "
            f"{config.rotary_base} (shape {list(positions.shape)}, expected {list(expected.shape)})"
        )
    encoder = RoFormerEncoder(config)
    encoder.load_state_dict(state, strict=True)
    extra = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    encoder.code_row = extra.get("af_train_code_row")
    return encoder
