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
"""

from af_train.data.collate import Collator
from af_train.data.dataset import AudioCodeDataset, DataError, check_rows, load_manifest, setup_distributed_env
from af_train.data.loader import build_collator, build_dataloader, build_dataset, check_split_tokenizers, split_source
from af_train.data.masking import IGNORE_INDEX, MaskingConfig, mask_codes, masking_generator
from af_train.data.shm import clean_stale_streaming_shm
from af_train.tokens import SpecialTokens

__all__ = [
    "IGNORE_INDEX",
    "AudioCodeDataset",
    "Collator",
    "DataError",
    "MaskingConfig",
    "SpecialTokens",
    "build_collator",
    "build_dataloader",
    "build_dataset",
    "check_rows",
    "check_split_tokenizers",
    "clean_stale_streaming_shm",
    "load_manifest",
    "mask_codes",
    "masking_generator",
    "setup_distributed_env",
    "split_source",
]
