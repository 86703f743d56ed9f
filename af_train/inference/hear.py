"""The HEAR 2021 API (https://hearbenchmark.com/hear-api.html) for af_train models.

    from af_train.inference import hear
    model = hear.load_model("runs/demo/ft1")                         # any MODEL af-predict takes
    scene = hear.get_scene_embeddings(audio, model)                  # [n_sounds, scene_embedding_size]
    frames, times_ms = hear.get_timestamp_embeddings(audio, model)   # [n_sounds, n_frames, size], [n_sounds, n_frames]

``audio`` is a float32 tensor [n_sounds, n_samples] of mono audio at ``model.sample_rate`` (48 kHz by
default, a rate HEAR's data sets come in; resampled to the tokenizer's 24 kHz inside). Timestamp
embeddings are the last hidden state at every code frame (75 per second, a 13.3 ms hop), timestamps
the frame centres in milliseconds, every one within the audio (a partial last frame whose centre would
lie past the end is left out, as hear-validator v2021.0.6 requires); scene embeddings the mean-pooled
last hidden state averaged over the windows of the training clip length. Integer PCM (int16, int32) is
scaled to [-1, 1) as a WAV reader scales it; other integer types are refused. Silent and short sounds
are embedded like any other (as training pads short clips), never rejected. hear-eval-kit loads this module by name:
``python3 -m heareval.embeddings.runner af_train.inference.hear --model MODEL``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from af_train.inference.tagger import AudioTagger
from af_train.tokenizers.audio_io import pcm_to_float

HEAR_SAMPLE_RATE = 48_000


class HearModel(torch.nn.Module):
    """An ``AudioTagger`` with the attributes HEAR asks for."""

    def __init__(self, tagger: AudioTagger, sample_rate: int = HEAR_SAMPLE_RATE):
        super().__init__()
        self.tagger = tagger
        self.encoder = tagger.encoder  # so .to()/.eval() and parameter listings reach the weights
        self.sample_rate = int(sample_rate)
        self.scene_embedding_size = tagger.embedding_size
        self.timestamp_embedding_size = tagger.embedding_size


def load_model(model_file_path: str | Path = "", sample_rate: int = HEAR_SAMPLE_RATE, **kwargs) -> HearModel:
    """HEAR's ``load_model``: any model af-predict takes (run dir, model.pt, af-export-hf dir)."""
    if not model_file_path:
        raise ValueError("af_train's HEAR module needs a model: a run directory, a model.pt or an af-export-hf "
                         "directory (hear-eval-kit: --model PATH)")
    kwargs.setdefault("reject_silent", False)
    kwargs.setdefault("min_seconds", 0.0)
    return HearModel(AudioTagger.load(model_file_path, **kwargs), sample_rate)


def _sounds(audio: torch.Tensor, model: HearModel) -> list[tuple[np.ndarray, int]]:
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        raise ValueError(f"audio must be a tensor [n_sounds, n_samples], got {getattr(audio, 'shape', type(audio))}")
    if audio.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int16, torch.int32):
        raise ValueError(f"audio of dtype {audio.dtype}: give float32 samples in [-1, 1] (or int16/int32 PCM, "
                         "scaled as a WAV reader scales it)")
    return [(sound, model.sample_rate) for sound in pcm_to_float(audio.detach().cpu()).numpy()]


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """[n_sounds, scene_embedding_size] float32."""
    if audio.shape[0] == 0:
        return torch.zeros((0, model.scene_embedding_size), dtype=torch.float32)
    return torch.from_numpy(model.tagger.embed(_sounds(audio, model)).astype(np.float32))


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_sounds, n_timestamps, timestamp_embedding_size] float32, [n_sounds, n_timestamps] float32 ms)."""
    if audio.shape[0] == 0:
        return (torch.zeros((0, 0, model.timestamp_embedding_size), dtype=torch.float32),
                torch.zeros((0, 0), dtype=torch.float32))
    frames = model.tagger.frame_embeddings(_sounds(audio, model))
    embeddings = torch.from_numpy(np.stack([f for f, _ in frames]).astype(np.float32))
    timestamps = torch.from_numpy((np.stack([t for _, t in frames]) * 1000.0).astype(np.float32))
    return embeddings, timestamps
