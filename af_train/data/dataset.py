"""The streaming dataset over acoustic-code MDS shards (see ``af_train.shards`` for the contract).

``AudioCodeDataset`` is a ``streaming.StreamingDataset``: streaming shards, partitions and shuffles
the samples over nodes, ranks and DataLoader workers and resumes mid-epoch (``state_dict`` /
``load_state_dict``). On top it turns one stored clip into model input:

    codes[code_rows, :length]  --crop to max_length-2-->  BOA c0 c1 ... EOA      (one row per code row)

and, when masking is on, corrupts each row independently for MLM (``af_train.data.masking``),
deterministically from (seed, epoch, global sample index). Samples are returned unpadded;
``af_train.data.collate.Collator`` pads them into batches.

With ``global_batch`` set (the training split), every epoch is cut to whole global batches, so the
global batches are the same at any world size, accumulation and resume (``af_train.data.order``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset

from af_train.data.manifests import DataError, load_manifest  # noqa: F401 (the dataset's errors and reader)
from af_train.data.masking import MaskingConfig, mask_codes, masking_generator
from af_train.data.order import (
    global_batch_problem,
    micro_batch_positions,
    node_layout_problem,
    rank_slot,
    steps_in_epoch,
)
from af_train.files import sha256_files
from af_train.shards import Manifest
from af_train.tokens import SpecialTokens, frame_rows

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"  # streaming's shard index
THREAD_EXIT_TIMEOUT_S = 30.0  # close(): how long to wait for streaming's download threads

if not hasattr(StreamingDataset, "_resume_incr_epoch"):  # pragma: no cover - guarded by constraints.txt
    raise ImportError(
        "af_train.data needs mosaicml-streaming 0.13.x (StreamingDataset._resume_incr_epoch is missing); "
        "install with `pip install -c constraints.txt -e .`"
    )


def setup_distributed_env() -> None:
    """Make the launcher's environment what streaming expects.

    The deepspeed launcher exports LOCAL_SIZE, streaming reads LOCAL_WORLD_SIZE; without it two local
    ranks collide on the same shared memory (``FileExistsError: '/000000_locals'``).
    """
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]


def _report_exit_on_error(thread_body, it) -> None:
    """Run one of streaming's per-epoch thread bodies; if it dies, still count its exit on ``it``."""
    try:
        thread_body(it)
    except BaseException:
        it.on_exit()
        raise


class AudioCodeDataset(StreamingDataset):
    """Token sequences (and MLM targets) from acoustic-code shards.

    Each sample is a dict: ``id`` (str), ``input_ids`` LongTensor [rows, n] (BOA + codes + EOA,
    n <= max_length), ``labels`` LongTensor of class indices (ragged), and with masking
    ``mlm_labels`` [rows, n] (-100 except at the corrupted positions).

    Streaming arguments (``local``, ``remote``, ``batch_size``, ``shuffle``, ``num_canonical_nodes``,
    ``cache_limit``, ...) are passed to ``StreamingDataset`` unchanged; ``batch_size`` is the micro batch
    of one rank. ``global_batch`` (micro batch x accumulation x ranks) cuts every epoch to whole global
    batches: each rank then reads exactly its micro batches of the epoch's ``(E - s) // global_batch``
    steps (``af_train.data.order``). None reads every sample (evaluation).
    """

    def __init__(
        self,
        *,
        manifest: Manifest,
        code_rows: Sequence[int] = (0,),
        max_length: int = 752,
        add_boa: bool = True,
        add_eoa: bool = True,
        masking: MaskingConfig | None = None,
        mask_seed: int = 0,
        mask_targets: bool = True,
        drop_labels: bool = False,
        global_batch: int | None = None,
        **streaming_kwargs: Any,
    ) -> None:
        check_rows(code_rows, manifest)
        self._check_layout(global_batch, streaming_kwargs)
        specials = int(add_boa) + int(add_eoa)
        if max_length <= specials:
            raise DataError(f"max_length={max_length} leaves no room for codes next to BOA/EOA")
        self.manifest = manifest
        self.code_rows = list(code_rows)
        self.max_length = max_length
        self.max_codes = max_length - specials
        self.add_boa = add_boa
        self.add_eoa = add_eoa
        self.tokens = SpecialTokens(manifest.codec.codebook_size)
        self.masking = masking
        self.mask_seed = mask_seed
        self.mask_targets = mask_targets  # False: masking as augmentation (fine-tuning), no MLM targets
        self.drop_labels = drop_labels  # a pretraining mixture of data sets with different vocabularies
        self._epoch_for_masking = 0  # set per epoch in each worker by _resume_incr_epoch
        self.global_batch = global_batch
        # streaming replaces these by a resumed state's; the order record keeps what was asked for
        self._requested_order = {key: streaming_kwargs.get(key) for key in
                                 ("num_canonical_nodes", "shuffle_seed", "shuffle_block_size")}
        self._order_record: dict[str, Any] | None = None  # computed once (it hashes the shard indexes)
        # "orig": the partition of every layout we accept (streaming's default "relaxed" differs only
        # where a node count and num_canonical_nodes do not divide one another, which is refused)
        super().__init__(partition_algo="orig", batching_method="random", **streaming_kwargs)

    @staticmethod
    def _check_layout(global_batch: int | None, streaming_kwargs: dict[str, Any]) -> None:
        """Refuse, before any work, a layout whose batches would differ from other layouts'."""
        from streaming.base.world import World

        world = World.detect()  # what streaming partitions over
        problem = node_layout_problem(int(streaming_kwargs.get("num_canonical_nodes") or 1), world.num_nodes)
        if problem is None and global_batch is not None:
            problem = global_batch_problem(global_batch, int(streaming_kwargs.get("batch_size") or 1),
                                           world.num_ranks)
        if problem is not None:
            raise DataError(problem)

    def order_record(self) -> dict[str, Any]:
        """What the order of the global batches depends on (besides the code), as plain JSON values: the
        shards and how many clips each stream gives an epoch, the seeds, the global batch and the
        canonical nodes -- not the world size, accumulation or micro batch (``af_train.data.order``)."""
        if self._order_record is not None:
            return self._order_record
        import streaming

        indexes = [Path(stream.local, stream.split or "", INDEX_NAME) for stream in self.streams]
        self._order_record = {
            # every stream's shard index, in order (streaming has copied each one to its local directory)
            "shards": sha256_files(index for index in indexes if index.is_file()),
            "missing_indexes": [str(index) for index in indexes if not index.is_file()],
            "clips_per_epoch": [int(stream.choose) for stream in self.streams],  # after repeat/choose/proportion
            "global_batch": self.global_batch,
            "num_canonical_nodes": self._requested_order["num_canonical_nodes"],
            "shuffle": bool(self.shuffle),
            "shuffle_seed": self._requested_order["shuffle_seed"],
            "shuffle_algo": self.shuffle_algo,
            "shuffle_block_size": self._requested_order["shuffle_block_size"],
            "mask_seed": int(self.mask_seed),  # masks are drawn from (seed, epoch, sample)
            "streaming": streaming.__version__,
        }
        return self._order_record

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        """This worker's sample ids of the epoch: with a global batch, its micro batches of the epoch's
        whole global batches, dealt out by slot (``af_train.data.order``)."""
        if self.global_batch is None:
            return super()._get_work(epoch, sample_in_epoch)
        from streaming.base.world import World

        me = self._parallel_worker_world
        # streaming's node leader lays the epoch out once (as for one rank with one worker) and shares it
        self._parallel_worker_world = World(num_nodes=1, ranks_per_node=1, workers_per_rank=1, worker=0)
        try:
            sequence = super()._get_work(epoch, sample_in_epoch)
        finally:
            self._parallel_worker_world = me
        positions = micro_batch_positions(
            steps_in_epoch(self.epoch_size, sample_in_epoch, self.global_batch), self.global_batch, self.batch_size,
            me.num_ranks, rank_slot(me.node, me.rank_of_node, me.num_nodes), me.worker_of_rank, me.workers_per_rank)
        return sequence[positions.reshape(-1)]

    # streaming decides the epoch inside __iter__ (start or resume); remember it for masking.
    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch_for_masking = epoch
        return epoch, sample_in_epoch

    def close(self) -> None:
        """Stop background threads and release this dataset's shared memory now, not at exit.

        Call it on every rank once no rank iterates any more (e.g. after evaluation, in tests); the
        dataset cannot be iterated afterwards. Without it streaming releases everything at exit.
        """
        iterator = getattr(self, "_iterator", None)
        threads_stopped = iterator is None or self._stop_threads(iterator, timeout=THREAD_EXIT_TIMEOUT_S)
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=threads_stopped, cancel_futures=True)
        holders = [
            getattr(self, "_locals_shm", None),
            getattr(self, "_resume_shm", None),
            getattr(getattr(self, "_shared_barrier", None), "_arr", None),
            getattr(getattr(self, "_next_epoch", None), "arr", None),
            getattr(getattr(self, "_cache_usage", None), "arr", None),
            getattr(self, "_shard_states", None),
            getattr(self, "_shard_access_times", None),
        ]
        for holder in holders:
            # streaming's SharedMemory has cleanup(); SharedArray holds one as .shm
            shm = holder if hasattr(holder, "cleanup") else getattr(holder, "shm", None)
            if shm is None or not hasattr(shm, "cleanup"):
                continue
            try:
                shm.cleanup()
            except BufferError:  # a numpy view is still alive; streaming's atexit hook retries
                logger.debug("shared memory still referenced; left for streaming's exit handler")

    # -- shard downloads: failures name the shard ------------------------------------------------
    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's download (+ hash check) of one shard; a failure raises a DataError naming it.

        The failed shard goes back to "remote" (so other ranks do not wait for it forever) and its
        bad local copy is deleted (so a restart cannot read it unchecked).
        """
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as exc:
            self._release_cache_lock_after_failure()
            error = self._shard_error(shard_id, exc)
            self._forget_shard(shard_id)
            self._shard_failure = error
            raise error from exc

    def _shard_error(self, shard_id: int, exc: BaseException) -> DataError:
        stream = self.streams[self.stream_per_shard[shard_id]]
        names = [raw.basename for raw, _ in self.shards[shard_id].file_pairs]
        name = ", ".join(names)
        source = stream.remote or stream.local
        text = str(exc)
        if text.startswith("Checksum failure"):
            return DataError(
                f"shard '{name}' of '{source}' failed its {stream.validate_hash} check: the downloaded bytes "
                "differ from the hash recorded in index.json at preparation. The object in the store is corrupt "
                "or was overwritten; re-upload it from the prepared data set or re-run af-prepare"
            )
        if text.startswith("Hash algorithm"):
            return DataError(
                f"data.validate_hash={stream.validate_hash} but shard '{name}' of '{source}' records no such hash "
                "(its index.json was written without it); re-prepare the shards with af-prepare "
                "(it records sha1 and xxh64) or set data.validate_hash=null"
            )
        return DataError(f"could not download shard '{name}' from '{source}' ({self.download_retry} attempts, "
                         f"timeout {self.download_timeout:g} s): {type(exc).__name__}: {exc}")

    def _forget_shard(self, shard_id: int) -> None:
        from streaming.base.dataset import _ShardState

        stream = self.streams[self.stream_per_shard[shard_id]]
        if stream.remote is None:  # never delete the user's own shard files
            return
        for raw, zipped in self.shards[shard_id].file_pairs:
            for info in (raw, zipped):
                if info is not None:
                    Path(stream.local, stream.split or "", info.basename).unlink(missing_ok=True)
        if getattr(self, "_shard_states", None) is not None:
            self._shard_states[shard_id] = _ShardState.REMOTE

    def _release_cache_lock_after_failure(self) -> None:
        # streaming's prepare_shard can raise while this thread holds the cache lock (e.g. eviction
        # finding nothing to evict); every other download would then wait for it forever.
        lock = getattr(self, "_cache_filelock", None)
        if lock is not None and lock.is_locked:  # thread-local: True only if this thread holds it
            lock.release(force=True)

    # streaming's background threads report their exit to the epoch's iterator only when they end
    # normally; one that dies with an exception never does, and iterator.exit() (next epoch,
    # close()) then waits forever. Report it on the way out too.
    def _prepare_thread(self, it) -> None:
        _report_exit_on_error(super()._prepare_thread, it)

    def _ready_thread(self, it) -> None:
        _report_exit_on_error(super()._ready_thread, it)

    @staticmethod
    def _stop_threads(iterator, timeout: float) -> bool:
        """Ask the epoch's download threads to stop; False if they are still running after ``timeout``."""
        iterator.non_blocking_exit()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with iterator._lock:
                if iterator._num_exited >= iterator._num_threads_to_exit:
                    return True
            time.sleep(0.01)
        logger.warning("streaming's download threads did not stop within %g s; left running", timeout)
        return False

    def __iter__(self):
        # streaming ends the epoch early (silently) when its download thread fails, and only says
        # "Background thread failed" on the next epoch; raise the shard's error right away instead.
        self._shard_failure: DataError | None = None
        try:
            yield from super().__iter__()
        except Exception as exc:
            # The epoch is over for this consumer: stop downloading ahead for it.
            iterator = getattr(self, "_iterator", None)
            if iterator is not None:
                iterator.non_blocking_exit()
            if isinstance(exc, RuntimeError) and self._shard_failure is not None \
                    and "Background thread failed" in str(exc):
                raise self._shard_failure from exc
            raise
        if self._shard_failure is not None:
            raise self._shard_failure
        event = getattr(self, "_event", None)
        if event is not None and event.is_set():
            raise DataError(f"streaming's download thread failed while reading '{self.streams[0].remote}' "
                            "(see the traceback above); the epoch was not read completely")

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        raw = super().get_item(sample_id, retry)
        return self.encode_sample(raw, sample_id, self._epoch_for_masking)

    def encode_sample(self, raw: dict[str, Any], sample_id: int, epoch: int) -> dict[str, Any]:
        """One stored clip -> unpadded token rows (+ MLM corruption); see the class docstring."""
        clip_id = raw["id"]
        codes = raw["codes"]
        if codes.ndim != 2 or codes.shape[0] != self.manifest.codec.codebooks:
            raise DataError(
                f"clip '{clip_id}': codes have shape {tuple(codes.shape)} but the manifest says "
                f"{self.manifest.codec.codebooks} codebooks; the shards and manifest.json disagree"
            )
        length = int(raw["length"])
        if not 0 <= length <= codes.shape[1]:
            raise DataError(f"clip '{clip_id}': length {length} outside [0, {codes.shape[1]}] frames")
        n = min(length, self.max_codes)
        rows = torch.from_numpy(np.ascontiguousarray(codes[self.code_rows, :n])).long()
        if n and (int(rows.min()) < 0 or int(rows.max()) >= self.tokens.codebook_size):
            raise DataError(
                f"clip '{clip_id}': code values outside [0, {self.tokens.codebook_size}) "
                f"(min {int(rows.min())}, max {int(rows.max())}); the shards are corrupt or were written "
                "with another codebook size than manifest.json says"
            )
        labels = torch.from_numpy(np.asarray(raw["labels"], dtype=np.int64).reshape(-1))
        if self.drop_labels:
            labels = labels[:0]
        else:
            self._check_labels(clip_id, labels)

        sample: dict[str, Any] = {"id": clip_id, "labels": labels}
        if self.masking is not None:
            generator = masking_generator(self.mask_seed, epoch, sample_id)
            corrupted, targets = mask_codes(
                rows,
                self.masking,
                mask_id=self.tokens.mask,
                codebook_size=self.tokens.codebook_size,
                generator=generator,
            )
            sample["input_ids"] = self._frame(corrupted, self.tokens.boa, self.tokens.eoa)
            if self.mask_targets:
                sample["mlm_labels"] = self._frame(targets, -100, -100)
        else:
            sample["input_ids"] = self._frame(rows, self.tokens.boa, self.tokens.eoa)
        return sample

    def _frame(self, rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return frame_rows(rows, start if self.add_boa else None, end if self.add_eoa else None)

    def _check_labels(self, clip_id: str, labels: torch.Tensor) -> None:
        num_classes = self.manifest.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise DataError(
                f"clip '{clip_id}': label indices {labels.tolist()} outside the manifest's "
                f"{num_classes}-class vocabulary; the shards and manifest.json disagree"
            )
        if not self.manifest.multi_label and labels.numel() != 1:
            raise DataError(
                f"clip '{clip_id}' has {labels.numel()} labels {labels.tolist()} but the data set is "
                "single-label (manifest multi_label: false); each clip needs exactly one class"
            )


def check_rows(code_rows: Sequence[int], manifest: Manifest, where: str = "data.code_rows") -> None:
    """Every requested code row must exist in the shards (0 .. codebooks-1)."""
    available = manifest.codec.codebooks
    bad = [r for r in code_rows if not 0 <= r < available]
    if bad or not code_rows:
        raise DataError(
            f"{where}={list(code_rows)} asks for code rows {bad or '(none)'}, but the shards hold "
            f"{available} codebooks (rows 0..{available - 1}, {manifest.codec.bandwidth} kbps); "
            f"choose rows in that range, e.g. {where}=[0]"
        )
    if len(set(code_rows)) != len(code_rows):
        raise DataError(f"{where}={list(code_rows)} repeats a row; each code row may appear once")
