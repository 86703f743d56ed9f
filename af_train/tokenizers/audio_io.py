"""Reading audio files into fixed-length 24 kHz mono clips, with a reason for every refusal.

Decoding goes through soundfile (libsndfile: wav, flac, ogg, mp3 where the library supports it);
any sample rate, channel count and PCM type is accepted: samples are read as float32, channels are
averaged, and the result is resampled with ``torchaudio.functional.resample``. A clip is then
cropped or zero-padded to ``clip_samples`` and the number of real (unpadded) samples is kept so the
padding can be masked later. Problems a data set really contains (missing, corrupt, empty, silent,
non-finite files, or files shorter than a minimum duration) raise :class:`AudioRejected` with a short
machine-readable ``reason``.

Long files are read a clip at a time: :func:`probe` reads only the header, :func:`segment_starts` cuts
the file's length into consecutive clips, and :func:`load_clip` with ``start_frame`` seeks to one of
them and decodes just that clip. Memory therefore depends on the clip length, never on the file's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

# Reasons a clip can be refused; af-prepare counts them by these names.
MISSING_FILE = "missing_file"
UNREADABLE = "unreadable_audio"
ZERO_LENGTH = "zero_length"
SILENT = "silent"
NON_FINITE = "non_finite_samples"
TOO_SHORT = "too_short"
# Problems that do not refuse a file but are logged and counted as warnings
TRUNCATED = "truncated_file"
BEYOND_FULL_SCALE = "beyond_full_scale"

DEFAULT_SILENCE_DBFS = -80.0  # peak level below which a clip counts as all-silent


class AudioRejected(Exception):
    """A file that cannot become a training clip; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says: its length in frames at its own sample rate, and its channels."""

    frames: int
    sample_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def probe(path: str | Path) -> AudioInfo:
    """Read only the header of ``path``; AudioRejected for a missing, unreadable or empty file."""
    path = Path(path)
    if not path.is_file():
        raise AudioRejected(MISSING_FILE, f"no such file: {path}")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError, EOFError) as exc:
        raise AudioRejected(UNREADABLE, f"cannot decode {path}: {exc}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioRejected(ZERO_LENGTH, f"{path} holds no samples")
    return AudioInfo(frames=int(info.frames), sample_rate=int(info.samplerate), channels=int(info.channels))


def segment_starts(frames: int, sample_rate: int, clip_seconds: float, hop_seconds: float) -> list[int]:
    """Start frame (at the file's ``sample_rate``) of every clip of a file of ``frames`` frames.

    Clip k starts at k × ``hop_seconds``, rounded to the nearest frame (no drift over a long file). The
    last clip is the first one that reaches the end of the file, so every sample is read once the hop is
    at most the clip; a file no longer than one clip is one clip starting at 0. The inference windows
    (``af_train.inference.windows``) follow the same rule.
    """
    if not clip_seconds > 0 or not hop_seconds > 0:
        raise ValueError(f"clip ({clip_seconds}) and hop ({hop_seconds}) must be > 0 seconds")
    clip_frames = clip_seconds * sample_rate
    starts = []
    while True:
        start = int(round(len(starts) * hop_seconds * sample_rate))
        starts.append(start)
        if start + clip_frames >= frames:
            return starts


@dataclass
class Clip:
    """A clip ready for the codec: float32 mono at ``sample_rate``, exactly ``clip_samples`` long."""

    samples: np.ndarray  # [clip_samples] float32
    valid_samples: int  # samples of real audio before the zero padding
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    source_seconds: float  # duration of the whole file
    warnings: tuple[tuple[str, str], ...] = ()  # (reason, message): used, but worth a word (TRUNCATED, ...)
    peak: float = 0.0  # largest absolute sample of the audio decoded for the clip (mono, before resampling)

    @property
    def valid_seconds(self) -> float:
        return self.valid_samples / self.sample_rate


def downmix(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[channels, samples] (or [samples]) → float32 mono [samples] by averaging channels."""
    wav = torch.as_tensor(wav)
    if not wav.is_floating_point():
        raise TypeError(
            f"expected floating-point samples, got {wav.dtype}; convert integer PCM with "
            "pcm_to_float (int16 → /32768, int32 → /2**31) first"
        )
    wav = wav.to(torch.float32)
    if wav.dim() == 1:
        return wav
    if wav.dim() != 2:
        raise ValueError(f"expected audio shaped [channels, samples], got shape {tuple(wav.shape)}")
    return wav.mean(dim=0)


def pcm_to_float(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Integer PCM (int8/16/32, uint8) → float32 in [-1, 1); floats pass through unchanged."""
    wav = torch.as_tensor(wav)
    if wav.is_floating_point():
        return wav.to(torch.float32)
    if wav.dtype == torch.uint8:  # 8-bit WAV is unsigned with a 128 offset
        return (wav.to(torch.float32) - 128.0) / 128.0
    scale = {torch.int8: 2.0**7, torch.int16: 2.0**15, torch.int32: 2.0**31}.get(wav.dtype)
    if scale is None:
        raise TypeError(f"unsupported sample type {wav.dtype}")
    return wav.to(torch.float32) / scale


def resample(wav: torch.Tensor, source_rate: int, target_rate: int) -> torch.Tensor:
    """Band-limited resampling of [..., samples] (identity when the rates agree)."""
    if source_rate == target_rate:
        return wav
    import torchaudio.functional as AF  # imported lazily: torchaudio is slow to import

    return AF.resample(wav, int(source_rate), int(target_rate))


def fit_to_length(wav: torch.Tensor, clip_samples: int) -> tuple[torch.Tensor, int]:
    """Crop (keep the start) or zero-pad a mono clip; returns (clip, number of real samples)."""
    valid = min(int(wav.shape[-1]), clip_samples)
    if wav.shape[-1] >= clip_samples:
        return wav[..., :clip_samples].contiguous(), valid
    pad = clip_samples - wav.shape[-1]
    return torch.nn.functional.pad(wav, (0, pad)), valid


def load_clip(
    path: str | Path,
    *,
    sample_rate: int,
    clip_seconds: float,
    silence_dbfs: float | None = DEFAULT_SILENCE_DBFS,
    min_seconds: float = 0.0,
    start_frame: int = 0,
) -> Clip:
    """Decode ``path`` into a :class:`Clip` of ``clip_seconds`` at ``sample_rate`` (mono).

    Only the ``clip_seconds`` from ``start_frame`` (a frame at the file's own rate, see
    :func:`segment_starts`) are decoded: the file is never read whole. ``silence_dbfs=None`` keeps silent
    clips. Raises :class:`AudioRejected` for missing, unreadable, empty, non-finite or silent audio, and
    for audio shorter than ``min_seconds`` (a header-only or one-sample file would otherwise become a
    clip of one valid frame).
    """
    path = Path(path)
    if not path.is_file():
        raise AudioRejected(MISSING_FILE, f"no such file: {path}")
    try:
        with sf.SoundFile(str(path)) as f:
            source_rate, channels, total_frames = f.samplerate, f.channels, f.frames
            wanted = math.ceil(clip_seconds * source_rate) + 1
            if start_frame:
                f.seek(start_frame)
            data = f.read(frames=wanted, dtype="float32", always_2d=True)  # [frames, channels]
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError, EOFError) as exc:
        raise AudioRejected(UNREADABLE, f"cannot decode {path}: {exc}") from None
    if data.shape[0] == 0 or source_rate <= 0:
        raise AudioRejected(ZERO_LENGTH, f"{path} holds no samples")
    if data.shape[0] < min_seconds * source_rate:
        raise AudioRejected(
            TOO_SHORT, f"{path} holds {data.shape[0] / source_rate:.3f} s of audio, less than the minimum "
            f"{min_seconds:g} s (--min-seconds)"
        )
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioRejected(NON_FINITE, f"{path} has {bad} NaN/inf samples")
    mono = downmix(torch.from_numpy(np.ascontiguousarray(data.T)))
    peak = float(mono.abs().max())
    warnings = file_warnings(path, peak)
    if silence_dbfs is not None:
        peak_db = 20.0 * math.log10(peak) if peak > 0 else -math.inf
        if peak_db < silence_dbfs:
            raise AudioRejected(
                SILENT, f"{path} is silent (peak {peak_db:.1f} dBFS < threshold {silence_dbfs:.1f} dBFS)"
            )
    clip_samples = clip_length(clip_seconds, sample_rate)
    wav = resample(mono, source_rate, sample_rate)
    wav, valid = fit_to_length(wav, clip_samples)
    return Clip(
        samples=wav.numpy().astype(np.float32, copy=False),
        valid_samples=valid,
        sample_rate=sample_rate,
        source_sample_rate=int(source_rate),
        source_channels=int(channels),
        source_seconds=float(total_frames) / source_rate if total_frames > 0 else 0.0,
        warnings=warnings,
        peak=peak,
    )


def file_warnings(path: str | Path | None, peak: float, name: str | None = None) -> tuple[tuple[str, str], ...]:
    """(reason, message) of what is wrong with decoded audio that is still used: a WAV cut shorter than its
    header says (``path``; None for a waveform), and float samples beyond full scale (``peak``: the largest
    absolute sample, mono, as read). ``name``: how messages name the audio (default: ``path``)."""
    warnings = []
    name = name or str(path)
    shortfall = wav_shortfall(path) if path is not None else None
    if shortfall is not None:
        warnings.append((TRUNCATED, f"{name} is cut short: its header promises {shortfall[0]} bytes of samples, "
                                    f"the file holds {shortfall[1]}; only those were read (re-export or "
                                    "re-download the file)"))
    if peak > 1.0:  # integer PCM is read into [-1, 1): only float samples get here
        warnings.append((BEYOND_FULL_SCALE, f"{name} peaks at {peak:.3g}, beyond full scale (+-1); used as it is, "
                                            "unlike the rest of the audio: normalise it first"))
    return tuple(warnings)


def wav_shortfall(path: str | Path) -> tuple[int, int] | None:
    """(bytes of samples the header promises, bytes the file holds) of a RIFF/WAVE file cut short; None for
    an intact file, another format, or a streaming header (data size 0 or 0xFFFFFFFF). libsndfile reads
    such a file short without a word."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            size = os.fstat(f.fileno()).st_size
            while len(chunk := f.read(8)) == 8:
                length = int.from_bytes(chunk[4:], "little")
                if chunk[:4] == b"data":
                    present = size - f.tell()
                    return None if length in (0, 0xFFFFFFFF) or length <= present else (length, present)
                f.seek(length + (length & 1), os.SEEK_CUR)  # chunks are padded to even sizes
    except OSError:
        return None
    return None


def clip_length(clip_seconds: float, sample_rate: int) -> int:
    """Samples in a clip of ``clip_seconds`` (rounded to the nearest sample)."""
    if not clip_seconds > 0:
        raise ValueError(f"clip length must be > 0 seconds, got {clip_seconds}")
    return int(round(clip_seconds * sample_rate))
