"""The on-disk contract between data preparation and training: MDS columns and ``manifest.json``.

Written by ``af-prepare`` (``af_train.prepare``), read by ``af_train.data`` and the engine. A shard
directory holds mosaicml-streaming MDS shards (``index.json`` + ``shard.*.mds``) with the columns
below, and beside them ``manifest.json`` describing how the codes were made.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from af_train.files import atomic_write

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SEGMENT_SEPARATOR = "#"  # af-prepare --segment: clip k of file FILE is "FILE#k"


def shard_columns(codebooks: int, frames: int) -> dict[str, str]:
    """MDS column encodings. ``codes`` has a fixed shape (clips are padded to the clip length)."""
    return {
        "id": "str",
        "codes": f"ndarray:int16:{codebooks},{frames}",
        "length": "int32",  # valid frames (the rest of ``codes`` is padding)
        "labels": "ndarray:int32",  # class indices into the manifest's label vocabulary (ragged)
    }


def segment_id(file_id: str, k: int) -> str:
    """The id of clip ``k`` (from 0) of the file ``file_id`` cut by ``af-prepare --segment``."""
    return f"{file_id}{SEGMENT_SEPARATOR}{k}"


class ManifestError(ValueError):
    """A shard directory without a readable, consistent manifest."""


class LabelsMismatch(ValueError):
    """Two class lists (of shards, weights or a model) that differ, in names or in order."""


def labels_hash(labels: list[str]) -> str:
    """``sha256:<hex>`` of the ordered class list (its JSON form): equal hashes, equal names in equal order."""
    text = json.dumps(list(labels), ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def first_label_difference(a: list[str], b: list[str]) -> str | None:
    """None when ``a`` and ``b`` are the same ordered list, else their first difference in words."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"class {index} is {x!r} vs {y!r}"
    if len(a) != len(b):
        common, longer = min(len(a), len(b)), a if len(a) > len(b) else b
        return f"{len(a)} vs {len(b)} classes (class {common} is {longer[common]!r} in one only)"
    return None


def check_same_labels(expected: list[str], given: list[str], what_expected: str, what_given: str, fix: str) -> None:
    """Refuse (``LabelsMismatch``) two class lists that differ, naming both and their first difference.

    Class indices mean nothing without their list: a permuted vocabulary would silently relabel every
    score, so order matters as much as names. Nothing is remapped."""
    difference = first_label_difference(list(expected), list(given))
    if difference is not None:
        raise LabelsMismatch(f"{what_expected} and {what_given} have different class lists ({difference}); {fix}")


@dataclass
class CodecInfo:
    model: str = "encodec_24khz"
    bandwidth: float = 3.0
    sample_rate: int = 24000
    frame_rate: float = 75.0
    codebooks: int = 4
    codebook_size: int = 1024
    weights: str = ""  # "pretrained sha256:<hash> (<file>)", "random-init seed N", "fitted sha256:<hash> (<file>)"


@dataclass
class Manifest:
    codec: CodecInfo
    clip_seconds: float
    frames: int  # code frames per clip (= clip_seconds * frame_rate)
    labels: list[str]  # vocabulary: index -> class name
    multi_label: bool  # True: multi-hot targets (AudioSet, FSD50K); False: one class per clip (ESC-50)
    source_format: str  # csv | audioset | fsd50k | esc50
    split: str = "train"
    written: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    rejects_log: str | None = None
    seconds_of_audio: float = 0.0
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # the tokenizer's identity (af_train.tokenizers: kind, weights or fitted-file sha256, rows, codes);
    # manifests written before it existed get the EnCodec identity their codec section describes
    tokenizer: dict[str, Any] = field(default_factory=dict)
    # ``labels_hash(labels)``; filled in when absent (manifests written before it existed)
    labels_hash: str = ""

    def __post_init__(self) -> None:
        if not self.tokenizer:
            self.tokenizer = legacy_tokenizer_identity(self.codec)
        computed = labels_hash(self.labels)
        if self.labels_hash and self.labels_hash != computed:
            raise ManifestError(f"manifest labels_hash {self.labels_hash} does not match its labels ({computed}): the "
                                "class list was edited after af-prepare wrote it; re-run af-prepare")
        self.labels_hash = computed

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, directory: str | Path) -> Path:
        return atomic_write(Path(directory) / MANIFEST_NAME, self.to_json() + "\n")  # never half a manifest

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "<manifest>") -> Manifest:
        try:
            codec = CodecInfo(**data["codec"])
            rest = {k: v for k, v in data.items() if k != "codec"}
            manifest = cls(codec=codec, **rest)
        except (KeyError, TypeError) as exc:
            raise ManifestError(
                f"{where}: malformed manifest ({exc}); re-run af-prepare to rebuild it"
            ) from None
        if manifest.version != MANIFEST_VERSION:
            raise ManifestError(f"{where}: manifest version {manifest.version}, this af_train reads {MANIFEST_VERSION}")
        return manifest

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(
                f"no {MANIFEST_NAME} in '{directory}': not a shard directory written by "
                "af-prepare (or the preparation has not finished)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))


def legacy_tokenizer_identity(codec: CodecInfo) -> dict[str, Any]:
    """The tokenizer identity a ``codec`` section implies (manifests written before identities existed).

    Same fields as ``af_train.tokenizers.encodec.AcousticCodec.identity()``, so a manifest written
    then and one written now by the same codec compare equal.
    """
    return {
        "kind": "encodec",
        "model": codec.model,
        "bandwidth": float(codec.bandwidth),
        "rows": int(codec.codebooks),
        "codes": int(codec.codebook_size),
        "weights": codec.weights,
    }


def segment_of(clip_id: str, manifest: Manifest) -> tuple[str, int, float] | None:
    """(file id, k, start in seconds) of a clip of a split prepared with ``--segment``; None otherwise.

    Clip k starts k × ``extra.prepare.segment.hop_seconds`` into its file (to the nearest sample of the
    file's own rate).
    """
    segment = (manifest.extra or {}).get("prepare", {}).get("segment")
    if not segment:
        return None
    file_id, sep, k = clip_id.rpartition(SEGMENT_SEPARATOR)
    if not sep or not k.isdigit():
        raise ManifestError(f"clip id {clip_id!r} is not FILE{SEGMENT_SEPARATOR}k, but its split was prepared "
                            "with --segment")
    return file_id, int(k), int(k) * float(segment["hop_seconds"])
