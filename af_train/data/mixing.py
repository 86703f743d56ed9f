"""Training mixtures: ``data.train`` as a list of data sets, each one streaming ``Stream``.

    data:
      train:
        - {path: data/audioset/train, proportion: 0.7}
        - {remote: s3://bucket/fsd50k/train, proportion: 0.3}

Weights are streaming's own: ``proportion`` (relative, for every entry or none; the epoch keeps the
total number of clips), ``repeat`` (times per epoch, fractional allowed) or ``choose`` (clips per
epoch); none: each clip once. streaming draws the per-stream samples from ``data.shuffle_seed`` and
the epoch, and partitions the mixed sample space over canonical nodes, ranks and workers like a
single data set, so resumption and world-size independence carry over unchanged.

Manifests must agree on the codec (codebook size and rows). Label vocabularies must be equal (same
names, same order, same multi-label flag) for fine-tuning; pretraining ignores labels, so there they
may differ, and the mixed data set carries none.
"""

from __future__ import annotations

import dataclasses
import logging

from af_train.config import DataConfig, StreamConfig
from af_train.data.manifests import DataError
from af_train.shards import Manifest, first_label_difference

logger = logging.getLogger(__name__)


def stream_weights(entry: StreamConfig) -> dict[str, float | int]:
    """The ``Stream`` keyword arguments of an entry's weight (none: each clip once)."""
    return {key: getattr(entry, key) for key in ("proportion", "repeat", "choose") if getattr(entry, key) is not None}


def merge_manifests(manifests: list[Manifest], sources: list[str], need_labels: bool) -> tuple[Manifest, bool]:
    """(the manifest the mixture is read with, whether labels are dropped); see the module docstring."""
    from af_train.tokenizers import TokenizerError, check_same_tokenizer

    first, where = manifests[0], sources[0]
    for manifest, source in zip(manifests[1:], sources[1:]):
        try:
            check_same_tokenizer(first.tokenizer, manifest.tokenizer, f"data.train '{where}'", f"data.train '{source}'")
        except TokenizerError as exc:
            raise DataError(str(exc)) from None
        a, b = first.codec, manifest.codec
        if (a.codebook_size, a.codebooks) != (b.codebook_size, b.codebooks):
            raise DataError(
                f"data.train mixes '{where}' (codebook size {a.codebook_size}, {a.codebooks} rows) with '{source}' "
                f"(codebook size {b.codebook_size}, {b.codebooks} rows): the token ids would mean different things; "
                "prepare both with the same tokenizer"
            )
    differing = [(source, m) for source, m in zip(sources[1:], manifests[1:])
                 if m.labels != first.labels or m.multi_label != first.multi_label]
    if not differing:
        return first, False
    source, other = differing[0]
    detail = _vocabulary_difference(first, other)
    if need_labels:
        raise DataError(
            f"data.train mixes data sets with different label vocabularies: '{where}' and '{source}' ({detail}). "
            "Fine-tuning needs one vocabulary: re-prepare the shards with the same --labels file, or train on one "
            "data set"
        )
    logger.info("data.train: the mixed data sets have different label vocabularies ('%s' vs '%s': %s); "
                "pretraining ignores labels, so none are read", where, source, detail)
    return dataclasses.replace(first, labels=[], labels_hash="", multi_label=True), True


def _vocabulary_difference(a: Manifest, b: Manifest) -> str:
    if a.multi_label != b.multi_label:
        return f"multi_label {a.multi_label} vs {b.multi_label}"
    return first_label_difference(a.labels, b.labels)


def is_mixture(cfg: DataConfig) -> bool:
    return isinstance(cfg.train, list)


def first_train_source(cfg: DataConfig) -> str | None:
    """The training data set whose manifest names the run's classes (the first of a mixture)."""
    if isinstance(cfg.train, list):
        return cfg.train[0].source
    return cfg.train
