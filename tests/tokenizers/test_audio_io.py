"""Audio decoding: formats, PCM types, downmix, resampling, crop/pad, and every rejection reason."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from af_train.tokenizers import audio_io
from af_train.tokenizers.audio_io import AudioRejected, load_clip


def _sine(rate: int, seconds: float, freq: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return amp * np.sin(2 * np.pi * freq * t)


@pytest.mark.parametrize(
    "fmt,subtype,tolerance",
    [("WAV", "PCM_U8", 1e-2), ("WAV", "PCM_16", 1e-4), ("WAV", "PCM_24", 1e-6), ("WAV", "PCM_32", 1e-6),
     ("WAV", "FLOAT", 1e-6), ("FLAC", "PCM_16", 1e-4)],
)
def test_pcm_types_decode_to_the_same_float_signal(tmp_path, fmt, subtype, tolerance):
    rate = 24000  # no resampling: compare sample by sample
    signal = _sine(rate, 0.25, 440.0)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(str(path), signal, rate, format=fmt, subtype=subtype)
    clip = load_clip(path, sample_rate=24000, clip_seconds=0.25)
    assert clip.samples.dtype == np.float32 and clip.samples.shape == (6000,)
    assert np.abs(clip.samples - signal).max() < tolerance
    assert (clip.source_sample_rate, clip.source_channels, clip.valid_samples) == (rate, 1, 6000)


def test_channels_are_averaged(tmp_path):
    rate = 24000
    left, right = _sine(rate, 0.2, 300.0), _sine(rate, 0.2, 1200.0, amp=0.2)
    four = np.stack([left, right, -left, right * 3], axis=1)
    sf.write(str(tmp_path / "quad.wav"), four, rate, subtype="FLOAT")
    clip = load_clip(tmp_path / "quad.wav", sample_rate=24000, clip_seconds=0.2)
    np.testing.assert_allclose(clip.samples, four.mean(axis=1), atol=1e-6)
    assert clip.source_channels == 4


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resampling_preserves_a_sine(tmp_path, rate):
    freq = 1000.0
    sf.write(str(tmp_path / "s.wav"), _sine(rate, 0.5, freq), rate, subtype="FLOAT")
    clip = load_clip(tmp_path / "s.wav", sample_rate=24000, clip_seconds=0.5)
    expected = _sine(24000, 0.5, freq)
    middle = slice(1200, 10800)  # away from the filter's edge effects
    assert clip.valid_samples == 12000
    assert np.abs(clip.samples[middle] - expected[middle]).max() < 5e-3


def test_crop_keeps_the_start_and_pad_records_true_length(tmp_path):
    rate = 24000
    ramp = np.linspace(-0.5, 0.5, 24000)
    sf.write(str(tmp_path / "long.wav"), ramp, rate, subtype="FLOAT")
    crop = load_clip(tmp_path / "long.wav", sample_rate=rate, clip_seconds=0.5)
    np.testing.assert_allclose(crop.samples, ramp[:12000], atol=1e-7)
    assert crop.valid_samples == 12000 and math.isclose(crop.source_seconds, 1.0)
    pad = load_clip(tmp_path / "long.wav", sample_rate=rate, clip_seconds=1.5)
    assert pad.samples.shape == (36000,) and pad.valid_samples == 24000
    assert not pad.samples[24000:].any()
    np.testing.assert_allclose(pad.samples[:24000], ramp, atol=1e-7)


def test_every_reason_is_reported(tmp_path):
    rate = 16000

    def reason(path, **kw):
        with pytest.raises(AudioRejected) as info:
            load_clip(path, sample_rate=24000, clip_seconds=1.0, **kw)
        return info.value.reason

    assert reason(tmp_path / "absent.wav") == audio_io.MISSING_FILE
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(200)))
    assert reason(tmp_path / "corrupt.wav") == audio_io.UNREADABLE
    (tmp_path / "text.flac").write_text("definitely not audio")
    assert reason(tmp_path / "text.flac") == audio_io.UNREADABLE
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 1)), rate)
    assert reason(tmp_path / "empty.wav") == audio_io.ZERO_LENGTH
    sf.write(str(tmp_path / "silent.wav"), np.zeros(rate), rate)
    assert reason(tmp_path / "silent.wav") == audio_io.SILENT
    quiet = _sine(rate, 0.5, 440.0, amp=10 ** (-70 / 20))  # -70 dBFS peak
    sf.write(str(tmp_path / "quiet.wav"), quiet, rate, subtype="FLOAT")
    assert reason(tmp_path / "quiet.wav", silence_dbfs=-60.0) == audio_io.SILENT
    assert load_clip(tmp_path / "quiet.wav", sample_rate=24000, clip_seconds=1.0).valid_samples == 12000
    assert load_clip(tmp_path / "silent.wav", sample_rate=24000, clip_seconds=1.0, silence_dbfs=None).valid_samples
    bad = _sine(rate, 0.5, 440.0)
    bad[100] = np.nan
    sf.write(str(tmp_path / "nan.wav"), bad, rate, subtype="FLOAT")
    assert reason(tmp_path / "nan.wav") == audio_io.NON_FINITE
    bad[100] = np.inf
    sf.write(str(tmp_path / "inf.wav"), bad, rate, subtype="DOUBLE")
    assert reason(tmp_path / "inf.wav") == audio_io.NON_FINITE


def test_helpers_reject_wrong_inputs():
    with pytest.raises(TypeError, match="pcm_to_float"):
        audio_io.downmix(torch.zeros(2, 10, dtype=torch.int16))
    with pytest.raises(ValueError, match="channels, samples"):
        audio_io.downmix(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="> 0 seconds"):
        audio_io.clip_length(0.0, 24000)
    assert torch.equal(audio_io.pcm_to_float(torch.tensor([0, 128, 255], dtype=torch.uint8)),
                       torch.tensor([-1.0, 0.0, 127 / 128]))


def test_mp3_decodes_where_libsndfile_supports_it(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} has no MP3 support")
    signal = _sine(16000, 0.5, 440.0, amp=0.4)
    sf.write(str(tmp_path / "s.mp3"), signal, 16000, format="MP3")
    clip = load_clip(tmp_path / "s.mp3", sample_rate=24000, clip_seconds=0.5)
    assert clip.valid_samples > 0.9 * 12000 and clip.source_sample_rate == 16000
    rms = float(np.sqrt(np.mean(clip.samples[: clip.valid_samples] ** 2)))
    assert abs(rms - 0.4 / np.sqrt(2)) < 0.2 * 0.4 / np.sqrt(2)  # lossy, but the same sound level


def test_wav_shortfall_finds_a_wav_cut_shorter_than_its_header_says(tmp_path):
    from af_train.tokenizers.audio_io import wav_shortfall

    path = tmp_path / "a.wav"
    sf.write(str(path), np.zeros(1000, dtype=np.float32), 16000, subtype="PCM_16")
    whole = path.read_bytes()
    assert wav_shortfall(path) is None
    path.write_bytes(whole[:-600])  # 300 of the 1000 samples (2 bytes each) are gone
    assert wav_shortfall(path) == (2000, 1400)
    flac = tmp_path / "a.flac"
    sf.write(str(flac), np.zeros(1000, dtype=np.float32), 16000)
    assert wav_shortfall(flac) is None and wav_shortfall(tmp_path / "missing.wav") is None


def test_load_clip_warns_about_a_cut_wav_and_float_peaks_beyond_full_scale(tmp_path):
    tone = (np.sin(np.arange(8000) / 5.0) * 0.5).astype(np.float32)
    sf.write(str(tmp_path / "fine.wav"), tone, 16000)
    sf.write(str(tmp_path / "loud.wav"), tone * 100, 16000, subtype="FLOAT")
    whole = (tmp_path / "fine.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 2])
    reasons = {name: [r for r, _ in load_clip(tmp_path / name, sample_rate=24000, clip_seconds=1.0).warnings]
               for name in ("fine.wav", "loud.wav", "cut.wav")}
    assert reasons == {"fine.wav": [], "loud.wav": [audio_io.BEYOND_FULL_SCALE], "cut.wav": [audio_io.TRUNCATED]}
