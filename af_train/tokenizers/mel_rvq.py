"""The ``mel-rvq`` tokenizer: log-mel frames at 75 Hz, quantised by a residual k-means fitted on training audio.

Frames: the power spectrum of a 512-point (21 ms) Hann window every 320 samples at 24 kHz, on a 64-band mel
scale (0-12 kHz), log-compressed and normalised per band with the mean and standard deviation of the
training split. A clip of n samples gives ``ceil(n / 320)`` frames, exactly as many as EnCodec.

Codes: R residual rows (default 4) of K centroids (default 1024). Row 0 quantises the normalised
frame, row r the residual left by rows 0..r-1, so each row adds detail to the ones before it, like
EnCodec's residual codebooks. The centroids come from faiss's k-means on the training split only
(``af-fit-tokenizer``): fitting the tokenizer on validation or test audio would leak it.

The features are computed in float64, on the GPU when there is one, and each code is the float64
nearest centroid (found with float32 arithmetic where that is provably the same answer): a decision
then only flips between devices (or batch sizes) when two centroids are within ~1e-13 of each other,
so the CPU and the GPU give the same codes.

The fitted tokenizer is one ``.safetensors`` file: the mel filters, the window, the normalisation
statistics and the codebooks as tensors, and the settings plus a description of the fit as JSON
metadata (key ``af_train``). The file's sha256 is the tokenizer's identity; the same audio, settings
and seed give a byte-identical file.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from af_train.files import sha256_file
from af_train.tokenizers.base import (
    FRAME_RATE,
    HOP_LENGTH,
    SAMPLE_RATE,
    TokenizerError,
    frames_for_samples,
    resolve_device,
)

log = logging.getLogger(__name__)

KIND = "mel-rvq"
FILE_FORMAT = "af_train.mel-rvq/1"
METADATA_KEY = "af_train"
POINTS_PER_CENTROID = 256  # frames kept per centroid for k-means (faiss's own sampling cap)
KMEANS_ITERATIONS = 20


@dataclass(frozen=True)
class MelConfig:
    """Feature and codebook settings stored in the fitted file."""

    rows: int = 4
    codes: int = 1024
    seed: int = 0
    n_fft: int = 512  # 21.3 ms Hann window
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 12_000.0
    log_floor: float = 1e-8  # added to the mel power before the log: 80 dB below a full-scale sine
    sample_rate: int = SAMPLE_RATE
    hop_length: int = HOP_LENGTH

    def validate(self) -> None:
        if self.rows < 1 or self.codes < 2:
            raise TokenizerError(f"mel-rvq needs rows >= 1 and codes >= 2, got rows={self.rows} codes={self.codes}")
        if self.codes > 32767:
            raise TokenizerError(f"mel-rvq codes must fit int16 codes (<= 32767), got {self.codes}")
        if self.sample_rate != SAMPLE_RATE or self.hop_length != HOP_LENGTH:
            raise TokenizerError("mel-rvq runs at 24 kHz with hop 320 (75 Hz), the frame rate of the shards")


def mel_filters(config: MelConfig) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] float64 triangular mel filters (HTK mel scale, no area normalisation)."""
    import torchaudio.functional as AF  # imported lazily: torchaudio is slow to import

    return AF.melscale_fbanks(config.n_fft // 2 + 1, config.f_min, config.f_max, config.n_mels,
                              config.sample_rate, norm=None, mel_scale="htk").double()


def log_mel(clips: torch.Tensor, filters: torch.Tensor, window: torch.Tensor, config: MelConfig) -> torch.Tensor:
    """float clips [B, samples] → float64 log-mel [B, ceil(samples / hop), n_mels] on the clips' device."""
    x = clips.to(torch.float64)
    frames = frames_for_samples(x.shape[-1])
    x = torch.nn.functional.pad(x, (0, frames * config.hop_length - x.shape[-1]))
    spec = torch.stft(x, config.n_fft, hop_length=config.hop_length, win_length=config.n_fft, window=window,
                      center=True, pad_mode="constant", return_complex=True)  # [B, freqs, frames + 1]
    power = spec[..., :frames].abs().square() / window.sum().square()  # a full-scale sine peaks near 0.25
    return torch.log(power.transpose(1, 2) @ filters + config.log_floor)


def assign_codes(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Residual nearest-centroid codes: x float64 [N, D], codebooks float64 [R, K, D] → int64 [N, R].

    Each decision is the float64 argmin of the distance. It is found with a float32 matrix product
    (the bulk of the work, several times faster), and only the frames whose best and second-best
    float32 scores are closer than the float32 error bound are decided again in float64.
    """
    residual = x.clone()
    codes = []
    for book in codebooks:
        norms = (book * book).sum(1)  # |c|^2
        scores = torch.addmm(norms.float(), residual.float(), book.float().T, alpha=-2.0)  # |x-c|^2 - |x|^2
        best, index = scores.min(dim=1)
        # float32 rounding of x, c and of the D-term sums stays below 1e-5 * (|x||c|max + |c|max^2)
        c_max = float(norms.max().sqrt())
        bound = 1e-5 * (residual.norm(dim=1) * c_max + c_max * c_max) + 1e-30
        second = scores.scatter_(1, index[:, None], float("inf")).amin(dim=1)
        ambiguous = (second - best < 2 * bound).nonzero().squeeze(1)
        if ambiguous.numel():
            exact = norms - 2.0 * residual[ambiguous] @ book.T
            index[ambiguous] = exact.argmin(dim=1)
        residual -= book[index]
        codes.append(index)
    return torch.stack(codes, dim=1)


class MelRVQTokenizer:
    """A fitted mel-rvq tokenizer (see the module doc); build it with :meth:`load` or :class:`MelRVQFitter`."""

    kind = KIND
    sample_rate = SAMPLE_RATE
    frame_rate = FRAME_RATE

    def __init__(
        self,
        config: MelConfig,
        mean: torch.Tensor,
        std: torch.Tensor,
        codebooks: torch.Tensor,
        fit_info: dict[str, Any] | None = None,
        path: Path | None = None,
        sha256: str | None = None,
        device: str | torch.device | None = None,
    ):
        config.validate()
        if tuple(codebooks.shape) != (config.rows, config.codes, config.n_mels):
            raise TokenizerError(
                f"mel-rvq codebooks shaped {tuple(codebooks.shape)}, the settings say "
                f"({config.rows}, {config.codes}, {config.n_mels})"
            )
        self.config = config
        self.fit_info = dict(fit_info or {})
        self.path, self.sha256 = path, sha256
        self.device = resolve_device(device)
        self._mean = mean.to(torch.float64)
        self._std = std.to(torch.float64)
        self._codebooks = codebooks.to(torch.float32)  # stored precision; computed in float64
        self._filters = mel_filters(config)
        self._window = torch.hann_window(config.n_fft, dtype=torch.float64)
        self._on_device = {name: t.to(self.device) for name, t in self._tensors64().items()}

    def _tensors64(self) -> dict[str, torch.Tensor]:
        return {"mean": self._mean, "std": self._std, "codebooks": self._codebooks.double(),
                "filters": self._filters, "window": self._window}

    # ------------------------------------------------------------------ description
    @property
    def num_rows(self) -> int:
        return self.config.rows

    @property
    def codebook_size(self) -> int:
        return self.config.codes

    def identity(self) -> dict[str, Any]:
        if self.sha256 is None:
            raise TokenizerError("this mel-rvq tokenizer has not been saved yet; its identity is its file's sha256 "
                                 "(call save(path) first)")
        return {
            "kind": KIND,
            "rows": self.config.rows,
            "codes": self.config.codes,
            "sha256": self.sha256,
            "file": str(self.path) if self.path is not None else None,
            "seed": self.config.seed,
            "n_mels": self.config.n_mels,
        }

    def __repr__(self) -> str:
        where = f"{self.path} sha256 {self.sha256[:16]}" if self.sha256 else "not saved"
        return (f"MelRVQTokenizer({self.config.rows} rows x {self.config.codes} codes at {FRAME_RATE:g} Hz, "
                f"{self.config.n_mels} mel bands, {where}, device={self.device})")

    # ------------------------------------------------------------------ encoding
    def features(self, clips: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Normalised log-mel frames: float clips [B, samples] → float64 [B, frames, n_mels] on ``device``."""
        clips = torch.as_tensor(clips, dtype=torch.float32)
        if clips.dim() != 2 or clips.shape[1] == 0:
            raise ValueError(f"expected clips [batch, samples] with samples > 0, got {tuple(clips.shape)}")
        t = self._on_device
        mel = log_mel(clips.to(self.device), t["filters"], t["window"], self.config)
        return (mel - t["mean"]) / t["std"]

    def encode_batch(self, clips: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Equal-length 24 kHz mono clips [batch, samples] → int16 codes [batch, rows, frames] (CPU)."""
        with torch.inference_mode():
            x = self.features(clips)
            batch, frames, dim = x.shape
            codes = assign_codes(x.reshape(-1, dim), self._on_device["codebooks"])
            codes = codes.reshape(batch, frames, -1).transpose(1, 2)
        return codes.to(torch.int16).cpu()

    # ------------------------------------------------------------------ file
    def save(self, path: str | Path) -> str:
        """Write the one-file tokenizer (atomically); returns its sha256, now this tokenizer's identity."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": self._mean.contiguous(),
            "std": self._std.contiguous(),
            "codebooks": self._codebooks.contiguous(),
            "mel_filters": self._filters.contiguous(),
        }
        # one metadata entry holding sorted JSON: the file bytes depend on nothing but the content
        meta = {"format": FILE_FORMAT, "config": asdict(self.config), "fit": self.fit_info}
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # nothing half-written is left behind
            raise
        self.path, self.sha256 = path, sha256_file(path)
        return self.sha256

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> MelRVQTokenizer:
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"mel-rvq tokenizer file not found: {path} (fit one with af-fit-tokenizer)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except (SafetensorError, OSError, ValueError) as exc:
            raise TokenizerError(f"{path} is not a readable safetensors file ({exc})") from None
        if meta.get("format") != FILE_FORMAT:
            raise TokenizerError(f"{path} is not a fitted mel-rvq tokenizer (format {meta.get('format')!r}, "
                                 f"expected {FILE_FORMAT!r})")
        config = MelConfig(**meta["config"])
        missing = {"mean", "std", "codebooks", "mel_filters"} - set(tensors)
        if missing:
            raise TokenizerError(f"{path}: tensors {sorted(missing)} are missing; fit the tokenizer again")
        tokenizer = cls(config, tensors["mean"], tensors["std"], tensors["codebooks"], meta.get("fit"), path,
                        sha256_file(path), device)
        if not torch.allclose(tokenizer._filters, tensors["mel_filters"], rtol=0, atol=1e-12):
            raise TokenizerError(f"{path}: its mel filters differ from the ones this torchaudio computes; "
                                 "the file was written by an incompatible version")
        return tokenizer


class MelRVQFitter:
    """Fits a :class:`MelRVQTokenizer` from training clips fed one at a time (only their real samples).

    Every frame counts towards the normalisation statistics; a seeded reservoir of at most
    ``POINTS_PER_CENTROID * codes`` frames (what k-means looks at) bounds the memory, so hundreds of
    hours fit in a few hundred MB.
    """

    def __init__(self, config: MelConfig):
        config.validate()
        self.config = config
        self.capacity = POINTS_PER_CENTROID * config.codes
        self._filters = mel_filters(config)
        self._window = torch.hann_window(config.n_fft, dtype=torch.float64)
        self._sum = np.zeros(config.n_mels)
        self._sumsq = np.zeros(config.n_mels)
        self._reservoir = np.empty((self.capacity, config.n_mels), dtype=np.float64)
        self._rng = np.random.default_rng([config.seed, 0x3E1])
        self.frames_seen = 0
        self.clips = 0
        self.seconds = 0.0

    def add(self, samples: np.ndarray | torch.Tensor) -> None:
        """One clip's real samples (no padding), float mono at 24 kHz."""
        samples = torch.as_tensor(samples, dtype=torch.float32).reshape(1, -1)
        if samples.shape[1] == 0:
            return
        with torch.inference_mode():
            frames = log_mel(samples, self._filters, self._window, self.config)[0].numpy()
        self._sum += frames.sum(0)
        self._sumsq += (frames * frames).sum(0)
        start = self.frames_seen
        take = max(0, min(self.capacity - start, len(frames)))
        self._reservoir[start : start + take] = frames[:take]
        rest = frames[take:]
        if len(rest):  # reservoir sampling: frame number t replaces a random slot with probability capacity/(t+1)
            positions = np.arange(start + take, start + len(frames)) + 1
            slots = (self._rng.random(len(rest)) * positions).astype(np.int64)
            keep = slots < self.capacity
            self._reservoir[slots[keep]] = rest[keep]
        self.frames_seen += len(frames)
        self.clips += 1
        self.seconds += samples.shape[1] / SAMPLE_RATE

    def fit(self, description: dict[str, Any] | None = None, device: str | torch.device | None = None,
            progress: bool = False) -> MelRVQTokenizer:
        """Normalisation statistics from every frame seen, then R rows of k-means on the residuals."""
        import faiss

        cfg = self.config
        if self.frames_seen < cfg.codes:
            raise TokenizerError(
                f"mel-rvq with {cfg.codes} codes per row needs at least {cfg.codes} training frames, got "
                f"{self.frames_seen} ({self.seconds:.1f} s of audio); give more training audio or fewer --codes"
            )
        started = time.monotonic()
        mean = self._sum / self.frames_seen
        std = np.sqrt(np.maximum(self._sumsq / self.frames_seen - mean * mean, 0.0)) + 1e-5
        sample = self._reservoir[: min(self.frames_seen, self.capacity)]
        residual = torch.from_numpy((sample - mean) / std)
        books = []
        for row in range(cfg.rows):
            kmeans = faiss.Kmeans(cfg.n_mels, cfg.codes, niter=KMEANS_ITERATIONS, seed=cfg.seed * 1009 + row,
                                  max_points_per_centroid=POINTS_PER_CENTROID, verbose=False)
            kmeans.train(np.ascontiguousarray(residual.numpy(), dtype=np.float32))
            book = torch.from_numpy(np.array(kmeans.centroids, dtype=np.float32))
            index = assign_codes(residual, book.double().unsqueeze(0))[:, 0]
            residual = residual - book.double()[index]
            books.append(book)
            if progress:
                log.info("  row %d/%d: %d centroids, residual energy %.4f per band", row + 1, cfg.rows, cfg.codes,
                         float(residual.square().mean()))
        self.kmeans_seconds = time.monotonic() - started
        info = {
            "split": "train",
            "clips": self.clips,
            "frames": self.frames_seen,
            "hours": round(self.seconds / 3600, 6),
            "kmeans_frames": int(len(sample)),
            "kmeans": f"faiss {faiss.__version__} Kmeans, {KMEANS_ITERATIONS} iterations",
            **(description or {}),
        }
        return MelRVQTokenizer(cfg, torch.from_numpy(mean), torch.from_numpy(std), torch.stack(books), info,
                               device=device)


def fit_from_clips(clips, config: MelConfig, description: dict[str, Any] | None = None) -> MelRVQTokenizer:
    """Convenience: fit on an iterable of 1-D sample arrays (each clip's real samples)."""
    fitter = MelRVQFitter(config)
    for clip in clips:
        fitter.add(clip)
    return fitter.fit(description)
