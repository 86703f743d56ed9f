"""Using a trained model: audio files of any length -> labels and embeddings.

Python: ``AudioTagger.load(MODEL)`` (a run directory, a ``model.pt`` with its shards' manifest, or an
``af-export-hf`` directory), then ``tag`` / ``embed`` / ``frame_embeddings`` / ``results``.
Command line: ``af-predict`` (``af_train.inference.predict``), ``af-embed`` (``af_train.inference.embed``),
``af-export-hf`` (``af_train.inference.export_hf``, the writer of the directory ``load_from_hf`` reads).
HEAR 2021 API: ``af_train.inference.hear``.

The names below are imported on first use (PEP 562): importing a command's module runs this file, and
``af-predict --help`` must not wait for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from af_train.inference.model import InferenceError, LoadedModel, ModelCard, load_model
    from af_train.inference.tagger import AudioTagger, FileResult

__all__ = ["AudioTagger", "FileResult", "InferenceError", "LoadedModel", "ModelCard", "load_model"]


def __getattr__(name: str) -> Any:
    if name in ("AudioTagger", "FileResult"):
        from af_train.inference import tagger as home
    elif name in ("InferenceError", "LoadedModel", "ModelCard", "load_model"):
        from af_train.inference import model as home
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(home, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
