"""Building the dataset and DataLoader of one split from the recipe's ``data`` section.

Where the shards come from:
- local (default): ``data.train`` / ``data.val`` / ``data.test`` are shard directories; streaming
  reads them in place (``local=`` the directory, no copy).
- remote: with ``data.remote`` set (``s3://bucket/audioset``), each split streams from
  ``<remote>/<data.<split> or split name>`` into a private cache directory
  ``<cache root>/<split>-<hash of the remote>``; the cache root is ``data.local_cache`` if set, else
  the ``local_cache`` argument (the engine passes one inside the run directory). ``cache_limit``,
  ``download_retry``, ``download_timeout``, ``predownload``, ``shuffle_block_size`` and
  ``validate_hash`` go to streaming unchanged. Credentials and endpoint come from the AWS
  environment (see ``af_train.remote``). A restarted job reuses the shards already in its cache
  directory, unless the remote ``index.json`` changed (the data set was re-prepared): then the cache
  is emptied first.

Ordering: the training split is shuffled with ``data.shuffle_seed`` over ``data.num_canonical_nodes``
canonical nodes (explicit, so the global order does not depend on the physical node count); val and
test are read in order. Every training epoch is cut to whole global batches (``global_batch``), so
the global batches of every epoch depend on the data, the seeds, the global batch and
``data.num_canonical_nodes`` only: the same at any world size, split into ranks x accumulation x micro
batch in any way, uninterrupted or resumed (``af_train.data.order``). Resuming:
``loader.state_dict()`` (streaming's, counts samples on all ranks, plus the order record) and
``loader.load_state_dict(state)`` before iterating; a state whose order record differs is loaded
with a warning naming what changed.

Note: when a split's size is not a multiple of the world size, streaming repeats a few samples so
every rank gets the same number; evaluation should count each ``batch["ids"]`` entry once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from streaming import StreamingDataLoader

from af_train import remote as remote_io
from af_train.config import DataConfig
from af_train.data.collate import Collator
from af_train.data.dataset import INDEX_NAME, AudioCodeDataset, setup_distributed_env
from af_train.data.manifests import DataError, load_manifest
from af_train.data.masking import MaskingConfig
from af_train.data.mixing import is_mixture, merge_manifests, stream_weights
from af_train.data.order import order_changes
from af_train.data.shm import clean_stale_streaming_shm
from af_train.data.splits import SPLITS, check_splits, split_source  # noqa: F401 (the loader's split helpers)
from af_train.distributed import barrier, is_distributed
from af_train.shards import Manifest

logger = logging.getLogger(__name__)

def cache_dir_for(cfg: DataConfig, split: str, remote: str, local_cache: str | None) -> str:
    """A private streaming cache directory for one split of one remote data set."""
    root = cfg.local_cache or local_cache
    if root is None:
        root = os.path.join(tempfile.gettempdir(), "af_train_cache")
        logger.warning("data.local_cache is not set; caching remote shards under %s", root)
    elif cfg.local_cache is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world))))
        if world > per_node:  # several nodes: the run directory is shared, a cache folder must not be
            node = int(os.environ.get("RANK", "0")) // max(per_node, 1)
            root = os.path.join(root, f"node{node}")
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                logger.warning("data.local_cache is not set: node %d caches remote shards in %s (inside the run "
                               "directory); set data.local_cache to a node-local disk", node, root)
    digest = hashlib.sha1(remote.encode()).hexdigest()[:10]
    path = os.path.join(root, f"{split}-{digest}")
    os.makedirs(path, exist_ok=True)
    return path


# Streaming refuses two live datasets on one cache dir with a remote ("Reused local directory"), so a
# loader rebuilt for the same split (e.g. one per evaluation) first closes its predecessor.
_LIVE_REMOTE_CACHES: dict[str, weakref.ref[AudioCodeDataset]] = {}


def _close_previous(local: str) -> None:
    previous = _LIVE_REMOTE_CACHES.pop(os.path.abspath(local), None)
    dataset = previous() if previous is not None else None
    if dataset is not None:
        logger.info("closing the previous dataset on cache dir %s before building a new one", local)
        dataset.close()


def _drop_stale_cache(local: str, remote: str, cfg: DataConfig) -> None:
    """Empty a cache directory whose shards belong to an older version of the remote data set.

    streaming trusts a cached ``index.json`` and cached shard files by name; after the data set in
    the bucket was re-prepared, a restarted job would silently train on the old shards.
    """
    cached = Path(local) / INDEX_NAME
    if not cached.is_file():
        return
    try:
        if remote_io.is_remote(remote):
            fresh = remote_io.RemoteDir(remote, timeout=cfg.download_timeout, retries=cfg.download_retry).read_bytes(
                INDEX_NAME)
        else:  # a shared filesystem (NFS, Lustre) streamed into node-local cache
            fresh = (Path(remote) / INDEX_NAME).read_bytes()
    except (remote_io.RemoteError, OSError) as exc:
        raise DataError(f"cannot read the shard index of '{remote}': {exc}") from None
    if fresh == cached.read_bytes():
        return
    files = [p for p in Path(local).rglob("*") if p.is_file()]
    logger.warning("the shards in %s changed since they were cached in %s: dropping the %d cached files",
                   remote, local, len(files))
    shutil.rmtree(local)
    os.makedirs(local, exist_ok=True)


def _clean_stale_shm_then_sync() -> None:
    """Drop shared memory leaked by killed streaming jobs, then line the ranks up.

    Every rank scans /dev/shm for a free streaming prefix on its own; the barrier makes sure no rank
    scans while the local leader is still cleaning (or still closing a previous dataset), else ranks
    could pick different prefixes. Without an initialised process group in a multi-rank job there is
    no safe moment, so nothing is cleaned.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        clean_stale_streaming_shm()
    barrier()


def build_dataset(
    cfg: DataConfig,
    split: str,
    batch_size: int,
    *,
    mask: bool,
    seed: int,
    local_cache: str | None = None,
    shuffle: bool | None = None,
    finetune_masking: bool = False,
    global_batch: int | None = None,
) -> AudioCodeDataset:
    """The ``AudioCodeDataset`` of one split (see the module docstring for sources and ordering).

    ``mask``: MLM masking with targets (pretraining). ``finetune_masking``: the training split of a
    fine-tuning run corrupts ``data.finetune_mask_rate`` of its tokens as augmentation, without targets.
    ``global_batch``: cut every epoch to whole global batches (training); None reads every sample.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    setup_distributed_env()
    if split == "train" and (is_mixture(cfg) or cfg.balanced_sampling):
        streams, manifest, drop_labels, source = train_streams(cfg, local_cache, need_labels=not mask)
        local = remote = None
    else:
        source, remote = split_source(cfg, split)
        streams, drop_labels = None, False
    if streams is None and remote is None:
        local = source
        if not (Path(local) / INDEX_NAME).is_file():
            manifest_hint = " (manifest.json is there: was preparation interrupted?)" if (
                Path(local) / "manifest.json"
            ).is_file() else ""
            raise DataError(
                f"data.{split}: '{local}' holds no MDS shard index ({INDEX_NAME}){manifest_hint}; "
                "write the shards with af-prepare"
            )
        manifest = load_manifest(local)
    elif streams is None:
        local = cache_dir_for(cfg, split, remote, local_cache)
        manifest = load_manifest(remote, timeout=cfg.download_timeout, retries=cfg.download_retry)

    if mask and cfg.mask_rate == 0.0:
        logger.warning("data.mask_rate is 0: MLM batches will have no targets")
    augment = not mask and finetune_masking and split == "train" and cfg.finetune_mask_rate > 0
    rate = cfg.mask_rate if mask else cfg.finetune_mask_rate
    masking = MaskingConfig(rate, cfg.mask_token_fraction, cfg.random_token_fraction) if mask or augment else None
    if remote is not None:
        _close_previous(local)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # the others wait in the barrier below
            _drop_stale_cache(local, remote, cfg)
    _clean_stale_shm_then_sync()
    dataset = AudioCodeDataset(
        manifest=manifest,
        code_rows=cfg.code_rows,
        max_length=cfg.max_length,
        add_boa=cfg.add_boa,
        add_eoa=cfg.add_eoa,
        masking=masking,
        mask_seed=seed,
        mask_targets=mask,
        drop_labels=drop_labels,
        global_batch=global_batch,
        **({"streams": streams} if streams is not None else {"local": local, "remote": remote}),
        batch_size=batch_size,
        shuffle=cfg.shuffle and split == "train" if shuffle is None else shuffle,
        shuffle_seed=cfg.shuffle_seed,
        shuffle_block_size=cfg.shuffle_block_size,
        num_canonical_nodes=cfg.num_canonical_nodes,
        predownload=cfg.predownload,
        cache_limit=cfg.cache_limit,
        download_retry=cfg.download_retry,
        download_timeout=cfg.download_timeout,
        validate_hash=cfg.validate_hash,
    )
    if remote is not None:
        _LIVE_REMOTE_CACHES[os.path.abspath(local)] = weakref.ref(dataset)
    logger.info(
        "data.%s: %d clips from %s (rows %s, max_length %d, %s, %d classes, %s)",
        split, dataset.size, source, cfg.code_rows, cfg.max_length,
        "multi-label" if manifest.multi_label else "single-label", manifest.num_classes,
        f"MLM masking {cfg.mask_rate:g}" if mask else
        (f"fine-tuning masking {cfg.finetune_mask_rate:g} (augmentation)" if augment else "no masking"),
    )
    return dataset


def train_streams(cfg: DataConfig, local_cache: str | None, need_labels: bool) -> tuple[list, Manifest, bool, str]:
    """(streams, manifest, drop labels?, description) of a mixed or class-balanced training split."""
    from streaming import Stream

    from af_train.data.balance import bucket_streams, prepare_buckets

    if cfg.balanced_sampling:
        if cfg.remote or not isinstance(cfg.train, str):
            raise DataError("data.balanced_sampling needs data.train as one local shard directory (for a remote "
                            "split, write the buckets with `python3 -m af_train.data.balance` from a local copy)")
        root = cfg.local_cache or local_cache or os.path.join(tempfile.gettempdir(), "af_train_cache")
        _clean_stale_shm_then_sync()
        directory, plan = prepare_buckets(cfg.train, root, cfg.balance_buckets, cfg.balance_power)
        manifest = load_manifest(directory / plan["buckets"][0]["name"])
        return bucket_streams(directory, plan), manifest, False, \
            (f"{cfg.train} (class-balanced, power {plan['power']:g}: {len(plan['buckets'])} rarity buckets "
             f"in {directory})")
    streams, manifests, sources = [], [], []
    for i, entry in enumerate(cfg.train):
        if entry.remote is not None:
            local = cache_dir_for(cfg, f"train{i}", entry.remote, local_cache)
            _close_previous(local)
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                _drop_stale_cache(local, entry.remote, cfg)
            manifests.append(load_manifest(entry.remote, timeout=cfg.download_timeout, retries=cfg.download_retry))
        else:
            local = entry.path
            if not (Path(local) / INDEX_NAME).is_file():
                raise DataError(f"data.train[{i}]: '{local}' holds no MDS shard index ({INDEX_NAME}); write the "
                                "shards with af-prepare")
            manifests.append(load_manifest(local))
        sources.append(entry.source)
        streams.append(Stream(local=local, remote=entry.remote, **stream_weights(entry)))
    manifest, drop_labels = merge_manifests(manifests, sources, need_labels)
    weights = ", ".join(f"{src} {stream_weights(e) or 'once'}" for src, e in zip(sources, cfg.train))
    return streams, manifest, drop_labels, f"mixture of {len(streams)}: {weights}"


def build_collator(cfg: DataConfig, manifest: Manifest) -> Collator:
    return Collator(
        pad_id=manifest.codec.codebook_size,  # PAD (af_train.tokens.SpecialTokens.pad)
        max_length=cfg.max_length,
        num_classes=manifest.num_classes,
        multi_label=manifest.multi_label,
        dynamic_padding=cfg.dynamic_padding,
    )


def build_dataloader(
    cfg: DataConfig,
    split: str,
    batch_size: int,
    *,
    mask: bool,
    seed: int,
    local_cache: str | None = None,
    num_workers: int | None = None,
    drop_last: bool | None = None,
    shuffle: bool | None = None,
    finetune_masking: bool = False,
    global_batch: int | None = None,
) -> TrainingOrderLoader:
    """A DataLoader of per-rank batches (see ``af_train.data`` for the batch format).

    ``batch_size`` is per rank (the micro batch). ``drop_last`` defaults to True for train, False
    otherwise; with it, every epoch is cut to whole global batches of ``global_batch`` (default: one
    micro batch per rank, no accumulation), the same clips at any world size (see the module
    docstring). ``num_workers`` defaults to ``data.num_workers``; ``shuffle`` to ``data.shuffle`` for
    train, False otherwise. The loader's ``state_dict()`` / ``load_state_dict()`` checkpoint the
    position in the epoch and what the order depends on.
    """
    drop_last = split == "train" if drop_last is None else drop_last
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if drop_last and global_batch is None:
        global_batch = batch_size * world_size
    dataset = build_dataset(cfg, split, batch_size, mask=mask, seed=seed, local_cache=local_cache, shuffle=shuffle,
                            finetune_masking=finetune_masking, global_batch=global_batch if drop_last else None)
    workers = cfg.num_workers if num_workers is None else num_workers
    if drop_last and dataset.epoch_size < global_batch:
        source = dataset.streams[0].remote or dataset.streams[0].local
        dataset.close()
        raise DataError(
            f"data.{split} ('{source}') gives {dataset.epoch_size} clips per epoch, fewer than one global batch "
            f"of {global_batch} ({batch_size} per rank x {global_batch // (batch_size * world_size)} accumulation "
            f"steps x {world_size} ranks): every batch would be dropped; use more data or a smaller batch"
        )
    if drop_last:
        steps, left_out = divmod(dataset.epoch_size, global_batch)
        logger.info("data.%s: an epoch is %d steps of %d clips; the last %d of its %d clips are left out (other ones "
                    "each epoch when shuffled), at any world size", split, steps, global_batch, left_out,
                    dataset.epoch_size)
    return TrainingOrderLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=build_collator(cfg, dataset.manifest),
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


class TrainingOrderLoader(StreamingDataLoader):
    """streaming's loader whose state also records what the order of the batches depends on.

    ``state_dict()`` adds ``order`` (``AudioCodeDataset.order_record``) to streaming's position;
    ``load_state_dict()`` compares it with this loader's. A difference is loaded anyway, with one
    warning that names it (the global batches then differ from the saving run's from here on), and
    the resumed epoch uses this run's seed and canonical nodes, as the epochs after it will.
    """

    def state_dict(self) -> dict[str, Any] | None:
        state = super().state_dict()
        if state is not None:
            state = {**state, "order": self.dataset.order_record()}
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        obj = dict(obj)
        saved, current = obj.pop("order", None), self.dataset.order_record()
        if saved is None:
            logger.warning("the loader state to resume from records no data order (saved before af_train cut epochs "
                           "to whole global batches): the epochs after this one may be cut differently than the "
                           "saving run cut them")
        elif changes := order_changes(saved, current):
            logger.warning("resuming with another data order than the checkpoint's run: %s; the global batches "
                           "differ from that run's from here on", "; ".join(changes))
            # streaming would read the resumed epoch with the saved seed and canonical nodes and the next
            # ones with ours: use ours throughout
            obj.update(num_canonical_nodes=current["num_canonical_nodes"], shuffle_seed=current["shuffle_seed"])
            if obj.get("sample_in_epoch", 0) >= self.dataset.epoch_size:  # fewer clips now: the epoch is over
                obj.update(epoch=obj["epoch"] + 1, sample_in_epoch=0)
        super().load_state_dict(obj)
