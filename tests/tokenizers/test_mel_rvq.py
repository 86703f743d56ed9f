"""mel-rvq: frames like EnCodec, exact nearest-centroid codes, determinism, one-file identity, CPU = GPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from af_train_tools import make_synthetic_audio as synth

from af_train.tokenizers import (
    TokenizerError,
    check_same_tokenizer,
    load_tokenizer,
    tokenizer_from_identity,
)
from af_train.tokenizers.mel_rvq import MelConfig, MelRVQFitter, MelRVQTokenizer

ROWS, CODES = 3, 32  # small: a fit takes well under a second


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    yield


def _clips(count: int, seconds: float, seed: int) -> list[np.ndarray]:
    """Synthetic sounds of several kinds, at 24 kHz."""
    return [synth.make_clip(i, seed=seed, sample_rate=24000, clip_seconds=seconds, multi_label_prob=0.0)[0][:, 0]
            for i in range(count)]


def _fit(seed: int = 0, clips: list[np.ndarray] | None = None) -> MelRVQTokenizer:
    fitter = MelRVQFitter(MelConfig(rows=ROWS, codes=CODES, seed=seed))
    for clip in clips if clips is not None else _clips(12, 1.0, seed=5):
        fitter.add(clip)
    return fitter.fit({"source": "unit test"}, device="cpu")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> MelRVQTokenizer:
    tokenizer = _fit()
    tokenizer.save(tmp_path_factory.mktemp("mel") / "mel.safetensors")
    return tokenizer


def test_frames_per_clip_match_encodec(fitted):
    for samples in (1, 319, 320, 321, 24000, 24001):
        codes = fitted.encode_batch(torch.zeros(2, samples) + 0.01)
        assert codes.shape == (2, ROWS, math.ceil(samples / 320)) and codes.dtype == torch.int16
    assert fitted.sample_rate == 24000 and fitted.frame_rate == 75.0
    assert (fitted.num_rows, fitted.codebook_size) == (ROWS, CODES)


def test_codes_are_the_exact_residual_nearest_centroids(fitted):
    """Independent reference: float64 Euclidean distances (torch.cdist) on the same features."""
    clips = torch.from_numpy(np.stack(_clips(4, 0.5, seed=11)))
    codes = fitted.encode_batch(clips)
    residual = fitted.features(clips).reshape(-1, 64)
    books = fitted._codebooks.double()
    for row in range(ROWS):
        nearest = torch.cdist(residual, books[row]).argmin(dim=1)
        assert torch.equal(codes[:, row, :].reshape(-1).long(), nearest), f"row {row}"
        residual = residual - books[row][nearest]


def test_codes_do_not_depend_on_the_batch(fitted):
    clips = torch.from_numpy(np.stack(_clips(6, 1.0, seed=3)))
    together = fitted.encode_batch(clips)
    alone = torch.cat([fitted.encode_batch(clips[i : i + 1]) for i in range(len(clips))])
    assert torch.equal(together, alone)


def test_codes_carry_information_about_the_sound(fitted):
    """Row-0 code histograms of two different kinds of sound differ far more than two takes of one kind."""
    def histogram(clip: np.ndarray) -> torch.Tensor:
        codes = fitted.encode_batch(torch.from_numpy(clip)[None])[0, 0].long()
        return torch.bincount(codes, minlength=CODES).double() / codes.numel()

    rng = np.random.default_rng(0)
    t = np.arange(24000) / 24000
    tone_a = (0.5 * np.sin(2 * np.pi * 440 * t) + 1e-2 * rng.standard_normal(24000)).astype(np.float32)
    tone_b = (0.5 * np.sin(2 * np.pi * 440 * t + 1.0) + 1e-2 * rng.standard_normal(24000)).astype(np.float32)
    noise = (0.3 * rng.standard_normal(24000)).astype(np.float32)
    same = (histogram(tone_a) - histogram(tone_b)).abs().sum()
    different = (histogram(tone_a) - histogram(noise)).abs().sum()
    assert different > 1.5 and same < 0.5, (float(same), float(different))
    sweep = (0.5 * np.sin(2 * np.pi * (200 * t + 4000 * t * t))).astype(np.float32)  # 200 Hz → 8.2 kHz
    assert len(torch.unique(fitted.encode_batch(torch.from_numpy(sweep)[None])[0, 0])) >= 4  # codes follow it


def test_fit_is_deterministic_for_a_seed_and_the_file_is_its_identity(tmp_path, fitted):
    again = _fit(seed=0)
    again_sha = again.save(tmp_path / "again.safetensors")
    assert again_sha == fitted.sha256  # byte-identical file: same audio, settings and seed
    other_sha = _fit(seed=1).save(tmp_path / "seed1.safetensors")
    assert other_sha != fitted.sha256
    loaded = load_tokenizer(tmp_path / "again.safetensors", device="cpu")
    assert loaded.identity()["sha256"] == again_sha and loaded.identity()["kind"] == "mel-rvq"
    clips = torch.from_numpy(np.stack(_clips(3, 0.7, seed=8)))
    assert torch.equal(loaded.encode_batch(clips), fitted.encode_batch(clips))
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "again.safetensors"), "pt").metadata()
                      ["af_train"])
    assert meta["config"]["rows"] == ROWS and meta["fit"]["split"] == "train" and meta["fit"]["clips"] == 12


def test_identity_round_trip_and_refusals(tmp_path, fitted):
    identity = fitted.identity()
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / fitted.path.name).write_bytes(fitted.path.read_bytes())
    gone = dict(identity, file=str(tmp_path / "deleted" / fitted.path.name))
    with pytest.raises(TokenizerError, match="sha256"):
        tokenizer_from_identity(gone)
    found = tokenizer_from_identity(gone, search_paths=[moved], device="cpu")
    assert found.sha256 == fitted.sha256
    (moved / fitted.path.name).write_bytes(b"not the same file")
    with pytest.raises(TokenizerError, match="not here"):
        tokenizer_from_identity(gone, search_paths=[moved])
    check_same_tokenizer(identity, gone, "a", "b")  # only the path differs: the same tokenizer
    other = dict(identity, sha256="0" * 64)
    with pytest.raises(TokenizerError, match=r"data\.train .* data\.val"):
        check_same_tokenizer(identity, other, "data.train", "data.val")


def test_too_little_audio_and_bad_files_are_refused(tmp_path):
    fitter = MelRVQFitter(MelConfig(rows=1, codes=CODES))
    fitter.add(np.zeros(320 * 10, dtype=np.float32))
    with pytest.raises(TokenizerError, match="at least 32 training frames"):
        fitter.fit()
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(TokenizerError, match="not a readable safetensors"):
        load_tokenizer(tmp_path / "junk.safetensors")
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "absent.safetensors")


@pytest.mark.cuda  # skipped with the reason where no GPU is visible (tests/conftest.py)
def test_gpu_codes_equal_cpu_codes(fitted):
    gpu = MelRVQTokenizer.load(fitted.path, device="cuda")
    clips = torch.from_numpy(np.stack(_clips(16, 2.0, seed=21)))
    noise = torch.randn(8, 48000, generator=torch.Generator().manual_seed(0)) * 0.2
    for batch in (clips, noise, clips[:1]):
        assert torch.equal(gpu.encode_batch(batch), fitted.encode_batch(batch))
