"""End to end: shards written by af-prepare (session fixture) read by the data layer."""

from __future__ import annotations

import pytest
import torch
from streaming.base.local import LocalDataset

from af_train.config import DataConfig
from af_train.data.dataset import load_manifest
from af_train.data.loader import build_dataloader
from af_train.tokens import SpecialTokens

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("split", ["val", "test"])
def test_prepared_splits_read_back_exactly(prepared_shards, split, loaders):
    split_dir = prepared_shards / split
    manifest = load_manifest(split_dir)
    tokens = SpecialTokens(manifest.codec.codebook_size)
    raw = {s["id"]: s for s in LocalDataset(str(split_dir))}  # streaming's plain reader, no transforms
    rows = list(range(manifest.codec.codebooks))
    cfg = DataConfig(**{split: str(split_dir)}, code_rows=rows, max_length=manifest.frames + 2)
    loaders.append(loader := build_dataloader(cfg, split, 2, mask=False, seed=0))
    seen = []
    for batch in loader:
        for b, clip_id in enumerate(batch["ids"]):
            seen.append(clip_id)
            stored = raw[clip_id]
            n = int(stored["length"])
            expected = torch.cat([torch.full((len(rows), 1), tokens.boa),
                                  torch.from_numpy(stored["codes"][:, :n].astype("int64")),
                                  torch.full((len(rows), 1), tokens.eoa)], dim=1)
            assert torch.equal(batch["input_ids"][b, :, : n + 2], expected)
            assert int(batch["attention_mask"][b].sum()) == n + 2
            if manifest.multi_label:
                assert batch["labels"][b].nonzero().flatten().tolist() == sorted(set(stored["labels"].tolist()))
            else:
                assert int(batch["labels"][b]) == int(stored["labels"][0])
    assert sorted(seen) == sorted(raw) and len(raw) == manifest.written
