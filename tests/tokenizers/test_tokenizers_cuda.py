"""The tokenizers give the same codes on CUDA as on the CPU, within a stated tolerance.

Needs a CUDA GPU (``pytest -m cuda``); collected and skipped with the reason elsewhere.

Tolerance and why: a code is a nearest-centroid decision, and the GPU's fp32 convolutions, STFTs and
matmuls sum in another order than the CPU's (TF32 is switched off here, so only the order differs).
Measured on the CPU (random-init EnCodec, seed 0, these clips): perturbing the encoder output by 1e-7
relative already changes 0.5 % of the row-0 codes, 1e-5 relative about 1.5 %; a change in one row
alters the residual of the rows after it. So: at least 98 % of the codes equal in every row, and where
row 0 differs, both choices are equally near (distances within 1e-3 relative: a tie within float error,
not another decision).
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.cuda

MIN_AGREEMENT = 0.98
TIE_RTOL = 1e-3
SAMPLE_RATE = 24000


def _clips(seconds: float = 2.0) -> torch.Tensor:
    """Four deterministic 24 kHz clips: amplitude-modulated tones of different pitch plus a little noise."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return torch.stack([0.3 * torch.sin(2 * math.pi * f * t) * (1 + 0.5 * torch.sin(2 * math.pi * 3 * t))
                        + 0.05 * torch.randn(t.shape, generator=g) for f in (220.0, 440.0, 880.0, 1500.0)])


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _acoustic_codec_class():
    from af_train.tokenizers.encodec import AcousticCodec

    return AcousticCodec


def _assert_same_codes(cpu: torch.Tensor, gpu: torch.Tensor, what: str) -> None:
    assert gpu.dtype == cpu.dtype == torch.int16 and gpu.device.type == "cpu"
    assert gpu.shape == cpu.shape, (what, gpu.shape, cpu.shape)
    agreement = (gpu == cpu).float().mean(dim=(0, 2))  # per row
    assert bool((agreement >= MIN_AGREEMENT).all()), f"{what}: codes equal per row {agreement.tolist()}"


def test_encodec_codes_on_cuda_match_cpu(no_tf32):
    codec_class = _acoustic_codec_class()
    clips = _clips()
    cpu_codec = codec_class(random_init_seed=0, device="cpu")
    gpu_codec = codec_class(random_init_seed=0, device="cuda")
    cpu, gpu = cpu_codec.encode_batch(clips), gpu_codec.encode_batch(clips)
    _assert_same_codes(cpu, gpu, "random-init EnCodec")

    # where row 0 differs, the two entries must be equally near the (CPU) encoder output
    with torch.inference_mode():
        frames = cpu_codec.model.encoder(clips.unsqueeze(1)).transpose(1, 2)  # [B, F, D]
    book = cpu_codec.model.quantizer.vq.layers[0]._codebook.embed  # [codes, D]
    differ = (cpu[:, 0] != gpu[:, 0]).nonzero().tolist()
    for b, f in differ:
        d_cpu = torch.dist(frames[b, f], book[int(cpu[b, 0, f])]).item()
        d_gpu = torch.dist(frames[b, f], book[int(gpu[b, 0, f])]).item()
        assert abs(d_gpu - d_cpu) <= TIE_RTOL * d_cpu, (b, f, d_cpu, d_gpu)


def test_tokenizers_from_identity_on_cuda_match_cpu(no_tf32, tmp_path):
    """Through the tokenizers package (branch tok's contract) where it exists: EnCodec re-created from
    its identity, and a mel-rvq tokenizer fitted here."""
    tokenizers = pytest.importorskip("af_train.tokenizers", reason="af_train.tokenizers is not in this checkout")
    clips = _clips()
    cpu_encodec = _acoustic_codec_class()(random_init_seed=0, device="cpu")
    identity = cpu_encodec.identity()
    gpu_encodec = tokenizers.tokenizer_from_identity(identity, device="cuda")
    _assert_same_codes(cpu_encodec.encode_batch(clips), gpu_encodec.encode_batch(clips), "EnCodec from identity")

    mel_rvq = pytest.importorskip("af_train.tokenizers.mel_rvq")
    if not hasattr(mel_rvq, "fit_from_clips"):
        pytest.skip("af_train.tokenizers.mel_rvq has no fit_from_clips to fit a tokenizer here")
    fitted = mel_rvq.fit_from_clips([c.numpy() for c in _clips(seconds=8.0)], mel_rvq.MelConfig(rows=4, codes=64))
    path = tmp_path / "mel_rvq.safetensors"
    fitted.save(path)
    cpu_tok = tokenizers.load_tokenizer(str(path), device="cpu")
    gpu_tok = tokenizers.tokenizer_from_identity(cpu_tok.identity(), search_paths=[tmp_path], device="cuda")
    assert gpu_tok.identity() == cpu_tok.identity()
    _assert_same_codes(cpu_tok.encode_batch(clips), gpu_tok.encode_batch(clips), "mel-rvq")
