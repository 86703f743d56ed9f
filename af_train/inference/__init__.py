"""Using a trained model: audio files of any length -> labels and embeddings.

Python: ``AudioTagger.load(MODEL)`` (a run directory, a ``model.pt`` with its shards' manifest, or an
``af-export-hf`` directory), then ``tag`` / ``embed`` / ``frame_embeddings`` / ``results``.
Command line: ``af-predict`` (``af_train.inference.predict``), ``af-embed`` (``af_train.inference.embed``).
HEAR 2021 API: ``af_train.inference.hear``.
"""

from af_train.inference.model import InferenceError, LoadedModel, ModelCard, load_model
from af_train.inference.tagger import AudioTagger, FileResult

__all__ = ["AudioTagger", "FileResult", "InferenceError", "LoadedModel", "ModelCard", "load_model"]
