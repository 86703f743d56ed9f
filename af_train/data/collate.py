"""Batching of variable-length samples into the tensors the model and objectives consume.

Samples arrive unpadded (``input_ids`` [rows, n] with BOA/EOA already in place, ragged label
index lists). The collator pads every sequence to a common length with PAD, builds the attention
mask, pads ``mlm_labels`` with -100, and turns label indices into multi-hot vectors (multi-label
data) or a class index (single-label data).

Padding length: ``max_length`` by default (static shapes, what compiled kernels and ZeRO like best).
With ``dynamic_padding`` the batch is padded only to its longest sequence rounded up to a multiple
of ``pad_multiple`` (8: tensor-core friendly), never beyond ``max_length``; useful for short or
variable-length clips (ESC-50, FSD50K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from af_train.data.masking import IGNORE_INDEX


@dataclass
class Collator:
    """Picklable collate function (DataLoader workers may be spawned)."""

    pad_id: int
    max_length: int
    num_classes: int
    multi_label: bool
    dynamic_padding: bool = False
    pad_multiple: int = 8

    def padded_length(self, longest: int) -> int:
        if longest > self.max_length:
            raise ValueError(
                f"a sample has {longest} tokens but data.max_length is {self.max_length}; "
                "samples must be cropped by the dataset before collation"
            )
        if not self.dynamic_padding:
            return self.max_length
        rounded = -(-max(longest, 1) // self.pad_multiple) * self.pad_multiple
        return min(rounded, self.max_length)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        rows = samples[0]["input_ids"].shape[0]
        batch_size = len(samples)
        length = self.padded_length(max(s["input_ids"].shape[1] for s in samples))
        has_mlm = "mlm_labels" in samples[0]

        input_ids = torch.full((batch_size, rows, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        mlm_labels = torch.full((batch_size, rows, length), IGNORE_INDEX, dtype=torch.long) if has_mlm else None
        if self.multi_label:
            labels = torch.zeros((batch_size, self.num_classes), dtype=torch.float32)
        else:
            labels = torch.empty(batch_size, dtype=torch.long)

        for i, sample in enumerate(samples):
            tokens = sample["input_ids"]
            if tokens.shape[0] != rows:
                raise ValueError(
                    f"sample '{sample['id']}' has {tokens.shape[0]} code rows, the batch has {rows}"
                )
            n = tokens.shape[1]
            input_ids[i, :, :n] = tokens
            attention_mask[i, :n] = 1
            if mlm_labels is not None:
                mlm_labels[i, :, :n] = sample["mlm_labels"]
            label_ids = torch.as_tensor(sample["labels"], dtype=torch.long)
            if label_ids.numel() and (int(label_ids.min()) < 0 or int(label_ids.max()) >= self.num_classes):
                raise ValueError(
                    f"sample '{sample['id']}' has label indices {label_ids.tolist()} outside "
                    f"[0, {self.num_classes}); the shards do not match their manifest's vocabulary"
                )
            if self.multi_label:
                labels[i, label_ids] = 1.0
            else:
                if label_ids.numel() != 1:
                    raise ValueError(
                        f"sample '{sample['id']}' has {label_ids.numel()} labels {label_ids.tolist()} "
                        "but the manifest says single-label (multi_label: false): exactly one is needed"
                    )
                labels[i] = label_ids[0]

        batch: dict[str, Any] = {
            "ids": [s["id"] for s in samples],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }
        if mlm_labels is not None:
            batch["mlm_labels"] = mlm_labels
        return batch
