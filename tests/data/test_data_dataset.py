"""The streaming dataset and loader on synthetic shards, checked against the stored codes."""

from __future__ import annotations

import json
import os
import shutil
from multiprocessing import shared_memory

import pytest
import torch
from af_train_tools.synthetic_shards import write_random_shards

from af_train.config import DataConfig, Recipe
from af_train.data.dataset import DataError, load_manifest, setup_distributed_env
from af_train.data.loader import build_dataloader
from af_train.data.shm import clean_stale_streaming_shm
from af_train.shards import ManifestError
from af_train.tokens import SpecialTokens

TOK = SpecialTokens(1024)


def _expected_tokens(stored: dict, rows: list[int], max_length: int) -> torch.Tensor:
    """Reference sequence built straight from the stored columns: BOA + codes[rows, :len] (cropped) + EOA."""
    n = min(int(stored["length"]), max_length - 2)
    codes = torch.tensor(stored["codes"][rows, :n].astype("int64"))
    boa = torch.full((len(rows), 1), TOK.boa)
    eoa = torch.full((len(rows), 1), TOK.eoa)
    return torch.cat([boa, codes, eoa], dim=1)


def _by_id(loader, order: list | None = None) -> dict[str, dict]:
    """Every sample of one pass, unbatched and keyed by clip id (ids must not repeat)."""
    out: dict[str, dict] = {}
    for batch in loader:
        if order is not None:
            order.append(batch["ids"])
        for b, clip_id in enumerate(batch["ids"]):
            assert clip_id not in out, f"{clip_id} read twice in one epoch"
            out[clip_id] = {k: v[b] for k, v in batch.items() if k != "ids"}
    return out


def test_every_clip_once_with_the_stored_codes_rows_and_labels(multi_label_shards, loaders):
    shard_dir, stored = multi_label_shards
    rows = [2, 0]
    cfg = DataConfig(val=str(shard_dir), code_rows=rows, max_length=24)  # 30 frames: cropped to 22
    loaders.append(loader := build_dataloader(cfg, "val", 5, mask=False, seed=0))
    seen = _by_id(loader)
    assert sorted(seen) == sorted(stored), "val must cover every clip exactly once"
    assert any(int(s["length"]) == 0 for s in stored.values()) and any(int(s["length"]) > 22 for s in stored.values())
    for clip_id, sample in seen.items():
        expected = _expected_tokens(stored[clip_id], rows, 24)
        n = expected.shape[1]
        assert sample["input_ids"].shape == (2, 24)
        assert torch.equal(sample["input_ids"][:, :n], expected), clip_id
        assert (sample["input_ids"][:, n:] == TOK.pad).all()
        assert sample["attention_mask"].tolist() == [1] * n + [0] * (24 - n)
        assert sample["labels"].nonzero().flatten().tolist() == sorted(stored[clip_id]["labels"].tolist())
    assert "mlm_labels" not in next(iter(loader))


def test_masked_batches_never_touch_special_tokens_and_match_the_originals(multi_label_shards, loaders):
    shard_dir, stored = multi_label_shards
    cfg = DataConfig(train=str(shard_dir), code_rows=[0, 1, 3], max_length=28, mask_rate=0.3)
    loaders.append(loader := build_dataloader(cfg, "train", 4, mask=True, seed=5))
    seen = _by_id(loader)
    assert len(seen) == 36  # drop_last on train: 37 clips, batches of 4
    for clip_id, sample in seen.items():
        expected = _expected_tokens(stored[clip_id], [0, 1, 3], 28)
        n = expected.shape[1]
        ids, targets = sample["input_ids"], sample["mlm_labels"]
        chosen = targets != -100
        assert not chosen[:, 0].any() and not chosen[:, n - 1:].any(), "BOA/EOA/PAD must never be targets"
        assert torch.equal(targets[chosen], expected.expand_as(ids[:, :n]).reshape(-1)[chosen[:, :n].reshape(-1)])
        assert torch.equal(ids[:, :n][~chosen[:, :n]], expected[~chosen[:, :n]])
        assert ids[:, 0].eq(TOK.boa).all() and ids[:, n - 1].eq(TOK.eoa).all()
        real = n - 2
        if real:
            assert chosen.sum(dim=1).tolist() == [max(1, round(0.3 * real))] * 3
        corrupted = ids[chosen]
        assert ((corrupted == TOK.mask) | (corrupted < 1024)).all()


def test_masks_depend_on_seed_and_epoch_only_not_on_workers(multi_label_shards, loaders):
    shard_dir, _ = multi_label_shards
    cfg = DataConfig(train=str(shard_dir), max_length=32)
    loaders.append(a := build_dataloader(cfg, "train", 4, mask=True, seed=1))
    loaders.append(b := build_dataloader(cfg, "train", 4, mask=True, seed=1, num_workers=2))
    loaders.append(c := build_dataloader(cfg, "train", 4, mask=True, seed=2))
    order0, order_workers = [], []
    epoch0, workers, other_seed = _by_id(a, order0), _by_id(b, order_workers), _by_id(c)
    epoch1 = _by_id(a)  # second pass over the same loader: next epoch, new order and masks
    assert order_workers == order0, "the batch order must not depend on the number of workers"
    for clip_id in epoch0:
        assert torch.equal(epoch0[clip_id]["input_ids"], workers[clip_id]["input_ids"])
        assert torch.equal(epoch0[clip_id]["mlm_labels"], workers[clip_id]["mlm_labels"])
    differs = lambda x, y: [k for k in set(x) & set(y) if not torch.equal(x[k]["mlm_labels"], y[k]["mlm_labels"])]
    assert len(differs(epoch0, other_seed)) > 0.8 * len(set(epoch0) & set(other_seed))
    assert len(differs(epoch0, epoch1)) > 0.8 * len(set(epoch0) & set(epoch1))


def test_shuffling_follows_the_shuffle_seed(multi_label_shards, loaders):
    shard_dir, _ = multi_label_shards
    orders = {}
    for name, split, seed in [("a", "train", 1), ("b", "train", 1), ("c", "train", 2), ("val", "val", 1)]:
        cfg = DataConfig(train=str(shard_dir), val=str(shard_dir), shuffle_seed=seed, max_length=32)
        loaders.append(loader := build_dataloader(cfg, split, 6, mask=False, seed=0))
        orders[name] = [i for batch in loader for i in batch["ids"]]
    assert orders["a"] == orders["b"]
    assert orders["a"] != orders["c"]
    assert orders["val"] == sorted(orders["val"]), "val/test are read in order"
    assert orders["a"] != sorted(orders["a"])


def test_single_label_class_indices_and_bad_label_counts(single_label_shards, tmp_path, loaders):
    shard_dir, stored = single_label_shards
    cfg = DataConfig(val=str(shard_dir), max_length=16)
    loaders.append(loader := build_dataloader(cfg, "val", 8, mask=False, seed=0))
    for clip_id, sample in _by_id(loader).items():
        assert sample["labels"].dtype == torch.long
        assert int(sample["labels"]) == int(stored[clip_id]["labels"][0])

    bad = tmp_path / "bad"
    write_random_shards(bad, 4, frames=10, num_classes=3, multi_label=False, labels_per_clip=[[0], [1], [1, 2], [0]])
    loaders.append(loader := build_dataloader(DataConfig(val=str(bad), max_length=16), "val", 4, mask=False, seed=0))
    with pytest.raises(DataError, match="clip 'clip00002' has 2 labels"):
        next(iter(loader))


def test_dynamic_padding_from_the_recipe(multi_label_shards, loaders):
    shard_dir, stored = multi_label_shards
    cfg = Recipe.from_dict({"data": {"val": str(shard_dir), "max_length": 40, "dynamic_padding": True}}).data
    loaders.append(loader := build_dataloader(cfg, "val", 3, mask=True, seed=0))
    for batch in loader:
        longest = int(batch["attention_mask"].sum(dim=1).max())
        assert batch["input_ids"].shape[-1] == min(40, -(-longest // 8) * 8)
        assert batch["mlm_labels"].shape == batch["input_ids"].shape


def test_mid_epoch_resume_in_one_process(multi_label_shards, loaders):
    shard_dir, _ = multi_label_shards
    cfg = DataConfig(train=str(shard_dir), max_length=32, num_canonical_nodes=2)
    loaders.append(loader := build_dataloader(cfg, "train", 3, mask=True, seed=4))
    full, state = [], None
    for step, batch in enumerate(loader):
        full.append(batch)
        if step == 4:
            state = loader.state_dict()
    assert state["sample_in_epoch"] == 15
    loaders.append(resumed := build_dataloader(cfg, "train", 3, mask=True, seed=4))
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["ids"] for b in rest] == [b["ids"] for b in full[5:]]
    for a, b in zip(rest, full[5:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["mlm_labels"], b["mlm_labels"])


def test_remote_streams_into_a_private_cache_per_split(multi_label_shards, tmp_path, loaders):
    shard_dir, stored = multi_label_shards
    remote = tmp_path / "bucket"
    shutil.copytree(shard_dir, remote / "train")
    shutil.copytree(shard_dir, remote / "heldout")
    cache = tmp_path / "cache"
    cfg = DataConfig(remote=str(remote), val="heldout", local_cache=str(cache), max_length=32, cache_limit="10mb")
    for _ in range(2):  # rebuilt in the same process (as for each evaluation): the old one is closed first
        train = build_dataloader(cfg, "train", 4, mask=False, seed=0, shuffle=False, drop_last=False)
        val = build_dataloader(cfg, "val", 4, mask=False, seed=0)
        loaders.extend([train, val])
        assert sorted(_by_id(train)) == sorted(_by_id(val)) == sorted(stored)
        caches = sorted(p.name for p in cache.iterdir())
        assert len(caches) == 2 and caches[0].startswith("train-") and caches[1].startswith("val-")
        assert any(p.name.startswith("shard.") for p in (cache / caches[0]).iterdir()), "shards not cached"
    # streaming refuses a second live dataset on the same cache dir; the first must have been closed
    loaders.append(build_dataloader(cfg, "val", 4, mask=False, seed=0))
    loaders.append(build_dataloader(cfg, "val", 4, mask=False, seed=0))


def test_clear_errors_for_bad_recipes_and_directories(multi_label_shards, tmp_path, loaders):
    shard_dir, _ = multi_label_shards
    with pytest.raises(DataError, match=r"code rows \[4\].*4 codebooks"):
        build_dataloader(DataConfig(train=str(shard_dir), code_rows=[0, 4]), "train", 2, mask=False, seed=0)
    with pytest.raises(DataError, match="repeats a row"):
        build_dataloader(DataConfig(train=str(shard_dir), code_rows=[1, 1]), "train", 2, mask=False, seed=0)
    with pytest.raises(DataError, match="data.val is not set"):
        build_dataloader(DataConfig(train=str(shard_dir)), "val", 2, mask=False, seed=0)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        build_dataloader(DataConfig(train=str(shard_dir)), "dev", 2, mask=False, seed=0)
    with pytest.raises(DataError, match="holds no MDS shard index"):
        build_dataloader(DataConfig(train=str(tmp_path / "nowhere")), "train", 2, mask=False, seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(DataError, match="gives 37 clips per epoch, fewer than one global batch of 40"):
        build_dataloader(DataConfig(train=str(shard_dir)), "train", 40, mask=False, seed=0)
    no_manifest = tmp_path / "no_manifest"
    shutil.copytree(shard_dir, no_manifest)
    (no_manifest / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        build_dataloader(DataConfig(train=str(no_manifest)), "train", 2, mask=False, seed=0)

    small_codebook = tmp_path / "small_codebook"
    shutil.copytree(shard_dir, small_codebook)
    manifest = json.loads((small_codebook / "manifest.json").read_text())
    manifest["codec"]["codebook_size"] = 16
    (small_codebook / "manifest.json").write_text(json.dumps(manifest))
    loaders.append(loader := build_dataloader(DataConfig(val=str(small_codebook)), "val", 2, mask=False, seed=0))
    with pytest.raises(DataError, match=r"code values outside \[0, 16\)"):
        next(iter(loader))


def test_local_size_from_the_deepspeed_launcher_becomes_local_world_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # recorded, so the test's changes are undone
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "4")
    setup_distributed_env()
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"
    monkeypatch.setenv("LOCAL_SIZE", "2")
    setup_distributed_env()  # an explicit LOCAL_WORLD_SIZE wins
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"


def test_close_releases_shared_memory_and_the_cleaner_spares_live_segments(multi_label_shards):
    shard_dir, _ = multi_label_shards
    loader = build_dataloader(DataConfig(val=str(shard_dir)), "val", 4, mask=False, seed=0)
    next(iter(loader))
    prefix = f"{loader.dataset._shm_prefix_int:06d}_"
    assert any(name.startswith(prefix) for name in os.listdir("/dev/shm"))
    loader.dataset.close()
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]

    live = shared_memory.SharedMemory(name="987654_locals", create=True, size=64)
    leaked = shared_memory.SharedMemory(name="987655_locals", create=True, size=64)
    leaked.close()  # unmapped and never unlinked: what a killed process leaves behind
    try:
        removed = clean_stale_streaming_shm(min_age_s=0)
        assert "/dev/shm/987655_locals" in removed
        assert os.path.exists("/dev/shm/987654_locals")
    finally:
        live.close()
        live.unlink()
        if os.path.exists("/dev/shm/987655_locals"):
            os.unlink("/dev/shm/987655_locals")
