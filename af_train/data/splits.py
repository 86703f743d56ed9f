"""The splits of a data recipe and the checks between them, without mosaicml-streaming: which shards each split
reads (``split_source``), and val/test against train (``check_splits``: tokenizer, class list, clip length),
run by the Trainer on every rank and by af-train's pre-flight before any rank starts (``preflight_splits``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from af_train.config import DataConfig
from af_train.data.manifests import DataError, load_manifest
from af_train.data.mixing import first_train_source, is_mixture
from af_train.shards import LabelsMismatch, Manifest, ManifestError, check_same_labels
from af_train.tokenizers import TokenizerError, check_same_tokenizer

SPLITS = ("train", "val", "test")


def split_source(cfg: DataConfig, split: str) -> tuple[str, str | None]:
    """(path or remote URL of the split's shards, remote URL or None)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    configured = getattr(cfg, split)
    if isinstance(configured, list):
        raise DataError(f"data.{split} is a mixture of {len(configured)} data sets; see train_streams")
    if cfg.remote:
        remote = f"{cfg.remote.rstrip('/')}/{(configured or split).strip('/')}"
        return remote, remote
    if not configured:
        raise DataError(
            f"data.{split} is not set; point it at a shard directory written by af-prepare "
            f"(e.g. data.{split}=data/esc50/{split})"
        )
    return configured, None


def _evaluation_manifests(cfg: DataConfig) -> Iterator[tuple[str, str, Manifest]]:
    """(split, source, manifest) of every configured val/test split. A local split whose manifest is missing or
    unreadable is refused now (DataError), not at the first evaluation, maybe hours into training; a bucket's
    manifest that cannot be fetched now is left to ``build_dataset``, which retries when the split is used."""
    for split in SPLITS:
        if split == "train" or (getattr(cfg, split) is None and not (cfg.remote and split == "val")):
            continue
        source, remote = split_source(cfg, split)
        try:
            manifest = (load_manifest(source) if remote is None else
                        load_manifest(remote, timeout=cfg.download_timeout, retries=cfg.download_retry))
        except (DataError, ManifestError) as exc:
            if remote is None:
                raise DataError(f"data.{split}: {exc}") from None
            continue
        yield split, source, manifest


def check_splits(cfg: DataConfig, train: Manifest, same_labels: bool) -> list[str]:
    """Every check of val/test against the training split's manifest (``train``), reading each manifest once.

    - Another tokenizer than the training shards': a refusal (DataError), always.
    - Another class list (names or order), with ``same_labels`` (fine-tuning): a refusal. A class index would
      mean another class there, so selection and test metrics would score permuted classes. Nothing is
      remapped; the fix is to prepare every split with the same ``--labels`` file.
    - Clips of another length than the training clips: allowed, as it may be meant, but the model then selects
      checkpoints on, and reports, clips of another length than it learned from. Returned as warnings for the
      caller to log (local splits only).
    """
    train_name = f"data.train ({first_train_source(cfg)})"
    warnings = []
    for split, source, manifest in _evaluation_manifests(cfg):
        name = f"data.{split} ({source})"
        try:
            check_same_tokenizer(train.tokenizer, manifest.tokenizer, train_name, name)
        except TokenizerError as exc:
            raise DataError(str(exc)) from None
        if same_labels:
            try:
                check_same_labels(train.labels, manifest.labels, train_name, name, "prepare every split with the "
                                  "same --labels vocabulary file (af-prepare), in the same order")
            except LabelsMismatch as exc:
                raise DataError(str(exc)) from None
        if not cfg.remote and abs(manifest.clip_seconds - train.clip_seconds) > 1e-6:
            warnings.append(f"data.{split} holds clips of {manifest.clip_seconds:g} s, data.train clips of "
                            f"{train.clip_seconds:g} s: the model is evaluated on clips of another length than it "
                            "learned from; prepare both with the same af-prepare --clip-seconds unless this is meant")
    return warnings


def preflight_splits(cfg: DataConfig, same_labels: bool) -> list[str]:
    """The checks of the splits' manifests, before any process starts (af-train): a refusal is then one line
    (DataError) instead of a traceback on every rank. Only a training split given as a local shard directory
    that exists here is checked (a mixture, a bucket or another node's folder is checked by the Trainer).
    Returns the warnings to show."""
    if is_mixture(cfg) or cfg.remote or not cfg.train or not Path(cfg.train).is_dir():
        return []
    try:
        train = load_manifest(cfg.train)
    except (DataError, ManifestError) as exc:
        raise DataError(str(exc)) from None
    return check_splits(cfg, train, same_labels=same_labels)
