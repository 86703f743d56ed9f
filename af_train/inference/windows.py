"""Cutting audio of any length into the windows a model was trained on, and putting the results back
together (pure functions of sample counts; no model, no tokenizer).

A window is what af-prepare makes of one file: ``clip_samples`` of audio from the window's start,
zero-padded at the end when the file ends earlier, encoded as one clip; the model then reads its first
``window_frames`` code frames (the recipe's ``data.max_length`` minus BOA/EOA may be shorter than a
clip). Windows start every ``hop_frames`` frames; the last window is the first one that reaches the
end of the file, so every sample is read and the last window holds more than ``window - hop`` of real
audio. A file no longer than one window is one window starting at 0: exactly a training clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Windowing:
    sample_rate: int  # of the tokenizer
    samples_per_frame: int  # tokenizer hop (320 at 24 kHz, 75 frames/s)
    clip_samples: int  # audio encoded per window: the training clip length
    window_frames: int  # code frames the model reads per window
    hop_frames: int

    def __post_init__(self) -> None:
        if self.window_frames < 1 or self.hop_frames < 1:
            raise ValueError(f"window ({self.window_frames} frames) and hop ({self.hop_frames}) must be >= 1 frame")
        if self.hop_frames > self.window_frames:
            raise ValueError(
                f"hop of {self.hop_frames} frames is longer than the window ({self.window_frames} frames): "
                "audio between windows would never be read; choose a hop <= the window"
            )

    @property
    def clip_frames(self) -> int:
        return math.ceil(self.clip_samples / self.samples_per_frame)

    @property
    def window_samples(self) -> int:
        """Audio the model reads per window."""
        return min(self.clip_samples, self.window_frames * self.samples_per_frame)

    @property
    def hop_samples(self) -> int:
        return self.hop_frames * self.samples_per_frame

    def starts(self, num_samples: int) -> list[int]:
        """Start sample of every window of a file of ``num_samples``."""
        if num_samples <= self.window_samples:
            return [0]
        count = 1 + math.ceil((num_samples - self.window_samples) / self.hop_samples)
        return [k * self.hop_samples for k in range(count)]

    def frames_read(self, valid_samples: int) -> int:
        """Code frames the model reads of a window holding ``valid_samples`` of real audio (as training:
        a partial last hop counts as a frame)."""
        return min(math.ceil(valid_samples / self.samples_per_frame), self.clip_frames, self.window_frames)

    def span(self, start: int, num_samples: int) -> tuple[float, float]:
        """(start, end) in seconds of the real audio a window starting at ``start`` reads."""
        end = min(start + self.window_samples, num_samples)
        return start / self.sample_rate, end / self.sample_rate


def stitch_frames(window_starts: list[int], window_counts: list[int], samples_per_frame: int) -> np.ndarray:
    """For every code frame of the file: (window index, frame index in that window) to take it from.

    Overlapping windows read some frames twice; each frame is taken from the window whose centre is
    nearest (the one that gave it the most context on both sides). Returns int64 [frames, 2].
    """
    first = [s // samples_per_frame for s in window_starts]
    total = max(f + n for f, n in zip(first, window_counts))
    out = np.full((total, 2), -1, dtype=np.int64)
    distance = np.full(total, np.inf)
    for k, (f, n) in enumerate(zip(first, window_counts)):  # earlier windows win ties
        frames = np.arange(f, f + n)
        mine = np.abs(frames + 0.5 - (f + n / 2.0))
        nearer = mine < distance[frames]
        distance[frames[nearer]] = mine[nearer]
        out[frames[nearer], 0] = k
        out[frames[nearer], 1] = frames[nearer] - f
    if (out[:, 0] < 0).any():
        raise ValueError("windows leave frames uncovered; the hop must not exceed the window")
    return out


def aggregate(window_scores: np.ndarray, how: str) -> np.ndarray:
    """Per-file scores [C] from window scores [W, C]: their mean or their maximum."""
    if how == "mean":
        return window_scores.mean(axis=0)
    if how == "max":
        return window_scores.max(axis=0)
    raise ValueError(f"aggregation must be 'mean' or 'max', got {how!r}")
