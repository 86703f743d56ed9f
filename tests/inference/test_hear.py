"""The HEAR module against the checks of hear-validator v2021.0.6 (written from its published checks: the
validator itself pins Python < 3.9 and TensorFlow), and integer PCM input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

HEAR_SAMPLE_RATES = (16000, 22050, 44100, 48000)


@pytest.fixture(scope="module")
def hear_model(tiny_run):
    from af_train.inference import hear

    return hear.load_model(str(tiny_run), device="cpu")


def white_noise(count: int, seconds: float, sample_rate: int, seed: int = 0) -> torch.Tensor:
    """The validator's test audio: uniform noise in [-1, 1], ``int(seconds * rate)`` samples per sound."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((count, int(seconds * sample_rate)), generator=generator) * 2 - 1


def test_the_model_exposes_what_the_validator_asks_for(hear_model):
    assert isinstance(hear_model, torch.nn.Module)
    assert hear_model.sample_rate in HEAR_SAMPLE_RATES
    assert isinstance(hear_model.scene_embedding_size, int) and isinstance(hear_model.timestamp_embedding_size, int)


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0])
def test_timestamp_embeddings_pass_the_validators_checks(hear_model, seconds):
    from af_train.inference import hear

    embeddings, timestamps = hear.get_timestamp_embeddings(white_noise(2, seconds, hear_model.sample_rate), hear_model)
    assert embeddings.dtype == torch.float32
    embeddings, timestamps = embeddings.numpy(), timestamps.numpy()
    assert embeddings.ndim == 3 and timestamps.ndim == 2 and embeddings.shape[0] == 2
    assert embeddings.shape[:2] == timestamps.shape and embeddings.shape[2] == hear_model.timestamp_embedding_size
    assert timestamps.shape[1] > 1
    steps = np.diff(timestamps)
    average = float(np.mean(steps))
    assert float(np.max(np.abs(steps - average))) <= 1.0, "timestamps must be regular (within 1 ms)"
    audio_ms = 1000 * seconds
    assert float(np.max(timestamps)) <= audio_ms, f"timestamps end at {np.max(timestamps)} ms, past the audio"
    assert float(np.max(timestamps)) >= audio_ms - 2 * average, "no embeddings for the end of the audio"
    assert float(np.min(timestamps)) <= average, "timestamps begin too late"


def test_scene_embeddings_pass_the_validators_checks(hear_model):
    from af_train.inference import hear

    embeddings = hear.get_scene_embeddings(white_noise(4, 2.74, hear_model.sample_rate), hear_model)
    assert embeddings.dtype == torch.float32
    assert tuple(embeddings.shape) == (4, hear_model.scene_embedding_size)


def test_int16_audio_is_scaled_like_a_wav_reader_scales_it(hear_model):
    from af_train.inference import hear

    pcm = (white_noise(2, 1.0, hear_model.sample_rate, seed=1) * 20000).to(torch.int16)
    scaled = pcm.to(torch.float32) / 32768.0  # what soundfile/torchaudio give for 16-bit PCM
    torch.testing.assert_close(hear.get_scene_embeddings(pcm, hear_model),
                               hear.get_scene_embeddings(scaled, hear_model), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="int64.*float32"):
        hear.get_scene_embeddings(pcm.to(torch.int64), hear_model)
