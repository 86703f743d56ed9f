"""The data layer: acoustic-code MDS shards -> token batches.

Batches (dicts) from ``build_dataloader``:
- ``ids``: list[str], clip ids;
- ``input_ids``: LongTensor [B, R, T], R = len(data.code_rows) in recipe order; each row is
  BOA + codes + EOA padded with PAD (T = data.max_length, or the longest in the batch rounded up to
  a multiple of 8 with data.dynamic_padding);
- ``attention_mask``: LongTensor [B, T], 1 on real tokens (BOA/EOA included), the same for every row;
- ``mlm_labels``: LongTensor [B, R, T], original code at masked positions, -100 elsewhere (only when
  built with ``mask=True``; every row is masked independently);
- ``labels``: FloatTensor [B, C] multi-hot for multi-label data sets, LongTensor [B] otherwise.
Token ids are in ``af_train.tokens`` (the contract beside ``af_train.shards``).

This package module stays light (no mosaicml-streaming, which pulls in transformers, scipy and
torchvision): inference imports the collator through it. The loader (``build_dataloader``,
``build_dataset``) is in ``af_train.data.loader``, the streaming dataset (``AudioCodeDataset``) in
``af_train.data.dataset``; ``DataError`` and ``load_manifest`` (local or remote) in ``af_train.data.manifests``
and the checks between splits (``check_splits``, ``split_source``) in ``af_train.data.splits``, both without
streaming. Code that must not pay for streaming reads a local manifest with
``af_train.shards.Manifest.load`` (inference does).
"""

from af_train.data.collate import Collator
from af_train.data.masking import IGNORE_INDEX, MaskingConfig, mask_codes, masking_generator
from af_train.data.shm import clean_stale_streaming_shm
from af_train.tokens import SpecialTokens

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "MaskingConfig",
    "SpecialTokens",
    "clean_stale_streaming_shm",
    "mask_codes",
    "masking_generator",
]
