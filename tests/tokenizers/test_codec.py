"""AcousticCodec: shapes across rates/channels/bandwidths, input conversions, weights handling."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from af_train.tokenizers import encodec as codec_module
from af_train.tokenizers.audio_io import AudioRejected
from af_train.tokenizers.encodec import (
    OFFICIAL_CHECKPOINT,
    AcousticCodec,
    CodecWeightsError,
    codebooks_for_bandwidth,
    frames_for_samples,
)


def _tone_noise(rate: int, seconds: float, channels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(round(rate * seconds))
    t = torch.arange(n) / rate
    rows = [0.3 * torch.sin(2 * math.pi * (300 + 200 * c) * t) + 0.05 * torch.randn(n, generator=g)
            for c in range(channels)]
    return torch.stack(rows)


@pytest.mark.parametrize("rate,channels", [(8000, 1), (16000, 2), (22050, 1), (24000, 3), (44100, 2), (48000, 6)])
def test_shape_at_any_rate_and_channel_count(random_codec, rate, channels):
    wav = _tone_noise(rate, 0.5, channels, seed=rate + channels)
    codes = random_codec.encode(wav, rate)
    # 0.5 s → 12000 samples at 24 kHz → ceil(12000 / 320) = 38 frames
    assert codes.shape == (4, 38) and codes.dtype == torch.int16
    assert int(codes.min()) >= 0 and int(codes.max()) < 1024


def test_ten_seconds_give_750_frames(random_codec):
    codes = random_codec.encode(_tone_noise(44100, 10.0, 2, seed=1), 44100)
    assert codes.shape == (4, 750)


def test_stereo_is_downmixed_by_averaging(random_codec):
    wav = _tone_noise(24000, 0.4, 2, seed=5)
    assert torch.equal(random_codec.encode(wav, 24000), random_codec.encode(wav.mean(0, keepdim=True), 24000))


def test_integer_pcm_is_scaled_like_float(random_codec):
    wav = _tone_noise(16000, 0.4, 1, seed=7).clamp(-1, 1)
    pcm = torch.round(wav * 32767).to(torch.int16)
    assert torch.equal(random_codec.encode(pcm, 16000), random_codec.encode(pcm.double() / 32768.0, 16000))
    pcm32 = pcm.to(torch.int32) * 65536  # the same signal as 32-bit PCM
    assert torch.equal(random_codec.encode(pcm32, 16000), random_codec.encode(pcm, 16000))


def test_bandwidths_select_codebooks_and_share_residual_rows(random_codec):
    assert [codebooks_for_bandwidth(b) for b in (1.5, 3, 6, 12, 24)] == [2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="1.5, 3, 6, 12, 24"):
        codebooks_for_bandwidth(5.0)
    wav = _tone_noise(24000, 0.3, 1, seed=11)
    reference = random_codec.encode(wav, 24000)
    for bandwidth, rows in ((1.5, 2), (6.0, 8)):
        codec = AcousticCodec(bandwidth=bandwidth, random_init_seed=0, device="cpu")
        codes = codec.encode(wav, 24000)
        assert codes.shape == (rows, frames_for_samples(wav.shape[1]))
        shared = min(rows, 4)  # residual stages: a row is the same at every bandwidth that has it
        assert torch.equal(codes[:shared], reference[:shared])
        assert codec.num_rows == codec.identity()["rows"] == rows


def test_random_init_is_deterministic_informative_and_leaves_rng_alone(random_codec):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    codec_module._random_init_state.cache_clear()  # really rebuild, not reuse the cached model
    again = AcousticCodec(random_init_seed=0, device="cpu")
    assert again.model is not random_codec.model
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    other = AcousticCodec(random_init_seed=1, device="cpu")

    rate = 24000
    t = torch.arange(rate) / rate
    tone = (0.3 * torch.sin(2 * math.pi * 440 * t)).unsqueeze(0)
    noise = 0.1 * torch.randn(1, rate, generator=torch.Generator().manual_seed(0))
    a, b = random_codec.encode(tone, rate), random_codec.encode(noise, rate)
    assert torch.equal(a, again.encode(tone, rate))
    assert not torch.equal(a, other.encode(tone, rate))
    assert random_codec.weights == "random-init seed 0" and other.weights == "random-init seed 1"
    # encodec's untouched random model maps everything to code 0; ours must separate sounds
    assert len(set(a[0].tolist()) | set(b[0].tolist())) > 40
    overlap = set(a[0].tolist()) & set(b[0].tolist())
    assert len(overlap) < 0.2 * min(len(set(a[0].tolist())), len(set(b[0].tolist())))


def test_bad_inputs_raise_clear_errors(random_codec):
    with pytest.raises(ValueError, match="NaN or inf"):
        random_codec.encode(torch.tensor([[0.1, float("nan"), 0.2] * 100]), 24000)
    with pytest.raises(ValueError, match="empty"):
        random_codec.encode(torch.zeros(1, 0), 24000)
    with pytest.raises(ValueError, match=r"\[channels, samples\]"):
        random_codec.encode(torch.zeros(1, 2, 300), 24000)
    with pytest.raises(ValueError, match="not both"):
        AcousticCodec(checkpoint="x.th", random_init_seed=0)
    with pytest.raises(ValueError, match="random_init_seed"):
        AcousticCodec(random_init_seed=-1)


def test_missing_weights_error_explains_how_to_provide_them(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(CodecWeightsError) as info:
        AcousticCodec()
    message = str(info.value)
    for needle in (OFFICIAL_CHECKPOINT, str(hub / "checkpoints"), "https://dl.fbaipublicfiles.com/encodec/v0/",
                   "--codec-checkpoint", "--codec-random-init"):
        assert needle in message
    missing = tmp_path / "nowhere" / "weights.th"
    with pytest.raises(CodecWeightsError, match="weights.th"):
        AcousticCodec(checkpoint=missing)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, random_codec):
    """The random-init codec's state dict saved under the official file name, plus its sha256."""
    codec = random_codec
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    folder.mkdir()
    path = folder / OFFICIAL_CHECKPOINT
    torch.save(codec.model.state_dict(), path)
    return codec, path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_file_loads_and_records_its_hash(saved_checkpoint, monkeypatch):
    source, path, sha = saved_checkpoint
    wav = _tone_noise(22050, 0.3, 1, seed=2)
    expected_identity = f"pretrained sha256:{sha[:16]} ({OFFICIAL_CHECKPOINT})"
    for where in (path, path.parent):  # a file, or a folder holding the official name
        codec = AcousticCodec(checkpoint=where, device="cpu")
        assert codec.weights == expected_identity == codec.identity()["weights"]
        assert torch.equal(codec.encode(wav, 22050), source.encode(wav, 22050))
    # the default lookup: torch hub's cache
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(path.parent.parent))
    assert AcousticCodec(device="cpu").weights == expected_identity


def test_unusable_checkpoints_are_refused_with_names(saved_checkpoint, tmp_path):
    source, _, _ = saved_checkpoint
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CodecWeightsError, match="garbage.th"):
        AcousticCodec(checkpoint=garbage)
    state = dict(source.model.state_dict())
    name = "encoder.model.0.conv.conv.bias"
    state[name] = torch.zeros(3)
    wrong = tmp_path / "wrong_shape.th"
    torch.save(state, wrong)
    with pytest.raises(CodecWeightsError, match=rf"{name}.*\(3,\).*\(32,\)"):
        AcousticCodec(checkpoint=wrong)
    partial = tmp_path / "partial.th"
    torch.save({k: v for k, v in source.model.state_dict().items() if not k.startswith("decoder")}, partial)
    with pytest.raises(CodecWeightsError, match="missing tensors"):
        AcousticCodec(checkpoint=partial)


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_24"), ("OGG", "VORBIS")])
def test_encode_file_formats_and_clip_length(random_codec, tmp_path, fmt, subtype):
    wav = _tone_noise(32000, 0.6, 2, seed=4).numpy().T
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(str(path), wav, 32000, format=fmt, subtype=subtype)
    assert random_codec.encode_file(path).shape == (4, frames_for_samples(int(0.6 * 24000)))
    assert random_codec.encode_file(path, clip_seconds=1.0).shape == (4, 75)  # zero-padded to 1 s
    assert random_codec.encode_file(path, clip_seconds=0.4).shape == (4, 30)  # cropped
    with pytest.raises(AudioRejected, match="no such file"):
        random_codec.encode_file(tmp_path / "absent.wav")


def test_batch_encoding_matches_one_by_one(random_codec):
    clips = np.stack([_tone_noise(24000, 0.25, 1, seed=s)[0].numpy() for s in range(3)])
    batched = random_codec.encode_batch(clips)
    single = torch.stack([random_codec.encode_batch(c[None])[0] for c in clips])
    assert batched.shape == (3, 4, frames_for_samples(clips.shape[1]))
    # CPU kernels may round differently by batch size; a code can flip only at a near-tie
    assert (batched == single).float().mean() > 0.98


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    yield


def test_identity_re_creates_exactly_the_codec_and_matches_old_manifests(saved_checkpoint, random_codec, tmp_path,
                                                                          monkeypatch):
    from af_train.shards import CodecInfo, legacy_tokenizer_identity
    from af_train.tokenizers import TokenizerError, check_same_tokenizer, tokenizer_from_identity

    source, path, sha = saved_checkpoint
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    identity = AcousticCodec(checkpoint=path, device="cpu").identity()
    assert identity == {"kind": "encodec", "model": "encodec_24khz", "bandwidth": 3.0, "rows": 4, "codes": 1024,
                        "weights": f"pretrained sha256:{sha[:16]} ({OFFICIAL_CHECKPOINT})"}
    with pytest.raises(TokenizerError, match=f"sha256 starting {sha[:16]}"):
        tokenizer_from_identity(identity)  # not in the (empty) hub cache, no search path
    found = tokenizer_from_identity(identity, search_paths=[path.parent], device="cpu")
    wav = _tone_noise(24000, 0.2, 1, seed=4)
    assert found.weights == identity["weights"] and torch.equal(found.encode(wav, 24000), source.encode(wav, 24000))
    other = tmp_path / "other" / OFFICIAL_CHECKPOINT
    other.parent.mkdir()
    other.write_bytes(path.read_bytes() + b"\0")  # another file under the official name is not substituted
    with pytest.raises(TokenizerError, match="not here"):
        tokenizer_from_identity(identity, search_paths=[other.parent])
    random_identity = random_codec.identity()
    assert tokenizer_from_identity(random_identity, device="cpu").weights == "random-init seed 0"
    # a manifest written before identities existed reads as the same tokenizer
    old = legacy_tokenizer_identity(CodecInfo(codebooks=4, weights="random-init seed 0"))
    check_same_tokenizer(old, random_identity, "old shards", "new shards")
    with pytest.raises(TokenizerError, match="old shards and checkpoint shards come from different tokenizers"):
        check_same_tokenizer(old, identity, "old shards", "checkpoint shards")
