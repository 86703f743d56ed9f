"""Reading a shard directory's manifest, local or remote, and the data layer's user-facing error.

Light on purpose (no mosaicml-streaming, whose import pulls in transformers and scikit-learn): af-train's
pre-flight (:mod:`af_train.data.splits`) reads manifests before any rank starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from af_train import remote as remote_io
from af_train.shards import MANIFEST_NAME, Manifest, ManifestError


class DataError(ValueError):
    """Shards, manifest or data recipe that cannot be read as asked; the message says how to fix it."""


def load_manifest(path: str | os.PathLike, *, timeout: float = 60.0, retries: int = 2) -> Manifest:
    """Read ``manifest.json`` of a shard directory, local or remote (``s3://…``).

    A remote manifest is read fresh into memory (``retries`` retries, ``timeout`` seconds each); a
    failure says why (no such bucket, nothing under the prefix, credentials, unreachable endpoint).
    """
    path = str(path)
    if not remote_io.is_remote(path):
        if not Path(path).is_dir():
            raise DataError(
                f"shard directory '{path}' does not exist; write one with af-prepare "
                "(or fix data.train / data.val / data.test in the recipe)"
            )
        return Manifest.load(path)
    try:
        text = remote_io.RemoteDir(path, timeout=timeout, retries=retries).read_bytes(MANIFEST_NAME)
    except remote_io.RemoteError as exc:
        raise ManifestError(f"could not fetch {MANIFEST_NAME} from '{path}': {exc}") from None
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{remote_io.join(path, MANIFEST_NAME)}: not valid JSON ({exc})") from None
    return Manifest.from_dict(data, remote_io.join(path, MANIFEST_NAME))
