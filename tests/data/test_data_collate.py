"""Collation of variable-length samples: padding, attention mask, MLM labels, label encodings."""

from __future__ import annotations

import pytest
import torch

from af_train.data.collate import Collator

PAD = 1024


def _samples(lengths, rows=2, label_lists=None, mlm=True):
    out = []
    for i, n in enumerate(lengths):
        sample = {
            "id": f"c{i}",
            "input_ids": torch.randint(0, 1024, (rows, n)),
            "labels": torch.tensor(label_lists[i] if label_lists else [i % 3]),
        }
        if mlm:
            sample["mlm_labels"] = torch.where(torch.rand(rows, n) < 0.3, sample["input_ids"], -100)
        out.append(sample)
    return out


def _check_padding(batch, samples, length):
    assert batch["input_ids"].shape == (len(samples), samples[0]["input_ids"].shape[0], length)
    for b, s in enumerate(samples):
        n = s["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][b, :, :n], s["input_ids"])
        assert (batch["input_ids"][b, :, n:] == PAD).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (length - n)
        assert torch.equal(batch["mlm_labels"][b, :, :n], s["mlm_labels"])
        assert (batch["mlm_labels"][b, :, n:] == -100).all()


def test_static_padding_to_max_length_and_multi_hot_labels():
    lists = [[0, 4], [], [2], [1, 2, 3]]
    samples = _samples([7, 3, 12, 1], label_lists=lists)
    batch = Collator(pad_id=PAD, max_length=16, num_classes=5, multi_label=True)(samples)
    _check_padding(batch, samples, 16)
    assert batch["ids"] == ["c0", "c1", "c2", "c3"]
    assert batch["labels"].dtype == torch.float32
    for b, labels in enumerate(lists):
        assert batch["labels"][b].nonzero().flatten().tolist() == labels
    assert batch["attention_mask"].dtype == batch["input_ids"].dtype == torch.long


@pytest.mark.parametrize("lengths,max_length,expected", [([5, 13], 64, 16), ([8], 64, 8), ([30, 2], 33, 32),
                                                         ([33], 33, 33), ([1], 10, 8)])
def test_dynamic_padding_rounds_the_longest_up_to_a_multiple_of_8(lengths, max_length, expected):
    samples = _samples(lengths)
    batch = Collator(pad_id=PAD, max_length=max_length, num_classes=3, multi_label=False, dynamic_padding=True)(
        samples
    )
    _check_padding(batch, samples, expected)


def test_single_label_gives_class_indices_and_no_mlm_key_without_masking():
    samples = _samples([4, 4, 4], label_lists=[[2], [0], [1]], mlm=False)
    batch = Collator(pad_id=PAD, max_length=8, num_classes=3, multi_label=False)(samples)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [2, 0, 1]
    assert "mlm_labels" not in batch


def test_collate_errors_name_the_clip():
    collate = Collator(pad_id=PAD, max_length=8, num_classes=3, multi_label=False)
    with pytest.raises(ValueError, match="'c1' has 2 labels"):
        collate(_samples([4, 4], label_lists=[[0], [0, 1]]))
    with pytest.raises(ValueError, match=r"'c0' has label indices \[3\] outside \[0, 3\)"):
        collate(_samples([4], label_lists=[[3]]))
    with pytest.raises(ValueError, match="max_length is 8"):
        collate(_samples([9]))
    mixed = _samples([4]) + _samples([4], rows=1)
    mixed[1]["id"] = "c9"
    with pytest.raises(ValueError, match="'c9' has 1 code rows"):
        collate(mixed)
    with pytest.raises(ValueError, match="empty"):
        collate([])
