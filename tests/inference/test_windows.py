"""Windowing arithmetic (af_train.inference.windows), independent of any model."""

from __future__ import annotations

import numpy as np
import pytest

from af_train.inference.windows import Windowing, aggregate, stitch_frames


def windowing(clip_frames: int = 10, window_frames: int = 10, hop_frames: int = 5) -> Windowing:
    return Windowing(sample_rate=1000, samples_per_frame=10, clip_samples=clip_frames * 10,
                     window_frames=window_frames, hop_frames=hop_frames)


@pytest.mark.parametrize("num_samples", [1, 37, 100, 101, 155, 999, 1000, 1234])
def test_windows_cover_every_sample_without_a_gap(num_samples):
    w = windowing()
    starts = w.starts(num_samples)
    assert starts[0] == 0 and all(b - a == w.hop_samples for a, b in zip(starts, starts[1:]))
    assert starts[-1] + w.window_samples >= num_samples  # the last window reaches the end
    if len(starts) > 1:
        assert starts[-2] + w.window_samples < num_samples  # ... and is the first that does
        assert num_samples - starts[-1] > w.window_samples - w.hop_samples
    spans = [w.span(s, num_samples) for s in starts]
    assert spans[-1][1] == num_samples / 1000


def test_a_file_no_longer_than_a_window_is_one_training_clip():
    w = windowing()
    assert w.starts(100) == [0] and w.frames_read(37) == 4 and w.frames_read(100) == 10


def test_the_model_window_can_be_shorter_than_the_clip():
    w = windowing(clip_frames=10, window_frames=6, hop_frames=3)
    assert w.window_samples == 60 and w.frames_read(100) == 6 and w.starts(100) == [0, 30, 60]


def test_stitched_frames_come_from_the_most_central_window():
    starts, counts = [0, 50, 100], [10, 10, 6]  # frames 0-9, 5-14, 10-15
    plan = stitch_frames(starts, counts, samples_per_frame=10)
    assert len(plan) == 16
    window = plan[:, 0].tolist()
    assert window[:8] == [0] * 8 or window[:7] == [0] * 7
    assert window[8:12].count(1) >= 3 and window[-3:] == [2, 2, 2]
    # every frame index is the global frame minus its window's first frame
    np.testing.assert_array_equal(plan[:, 1] + np.array(starts)[plan[:, 0]] // 10, np.arange(16))


def test_aggregation_and_bad_settings():
    scores = np.array([[0.1, 0.9], [0.5, 0.3]])
    np.testing.assert_allclose(aggregate(scores, "mean"), [0.3, 0.6])
    np.testing.assert_allclose(aggregate(scores, "max"), [0.5, 0.9])
    with pytest.raises(ValueError, match="mean' or 'max"):
        aggregate(scores, "median")
    with pytest.raises(ValueError, match="hop"):
        windowing(hop_frames=11)
