"""AudioFormer model: RoFormer encoder, heads, weight files and Hugging Face interchange.

Public API::

    AudioFormerConfig.preset("tiny" | "small" | "base" | "large")
    RoFormerEncoder(config).forward(input_ids [B, T], attention_mask [B, T]) -> [B, T, hidden]
    MLMHead, ClassificationHead, masked_mean_pool
    save_encoder / load_encoder / load_encoder_weights / save_module_weights
    af_train.model.hf.export_roformer / import_roformer (imports transformers lazily)
"""

from af_train.model.checkpoint import (
    ENCODER_FORMAT,
    MODULE_FORMAT,
    CheckpointError,
    load_encoder,
    load_encoder_weights,
    read_checkpoint,
    save_encoder,
    save_module_weights,
)
from af_train.model.config import AudioFormerConfig
from af_train.model.encoder import RoFormerEncoder
from af_train.model.heads import ClassificationHead, MLMHead, masked_mean_pool

__all__ = [
    "AudioFormerConfig",
    "RoFormerEncoder",
    "MLMHead",
    "ClassificationHead",
    "masked_mean_pool",
    "ENCODER_FORMAT",
    "MODULE_FORMAT",
    "CheckpointError",
    "save_encoder",
    "load_encoder",
    "load_encoder_weights",
    "read_checkpoint",
    "save_module_weights",
]
