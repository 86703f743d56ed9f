"""The ``encodec`` tokenizer: EnCodec 24 kHz turning audio into discrete codes ``[codebooks, frames]``.

``AcousticCodec`` wraps encodec's 24 kHz model. At the default 3 kbps it emits 4 codebook rows at
75 Hz (one frame per 320 samples): 10.0 s of audio at any sample rate becomes int16 codes [4, 750].
Bandwidths 1.5/3/6/12/24 kbps give 2/4/8/16/32 rows; the rows are residual stages, so row k is the
same at every bandwidth that includes it.

Weights, in the order they are looked for:

* ``checkpoint=FILE`` (``--codec-checkpoint``): a state dict of ``EncodecModel.encodec_model_24khz``
  (the official ``encodec_24khz-d7cc33bc.th`` or a compatible file); a directory is searched for the
  official file name.
* ``random_init_seed=N`` (``--codec-random-init N``): a randomly initialised codec, for tests and
  demos without network access. Only on explicit request: its codes mean nothing outside this repo.
* otherwise the official checkpoint in torch hub's cache (``torch.hub.get_dir()/checkpoints``), the
  place ``encodec`` itself downloads it to. It is never downloaded implicitly here.

Random initialisation detail: encodec creates its codebooks empty (all zeros, to be filled by
k-means on the first training batch), so an untouched random model maps every frame to code 0.
We therefore fill each residual codebook with k-means centroids of the encoder's output on
synthetic calibration audio generated from the same seed. Everything derives from the seed, so
the same seed gives the same weights and the same codes, and the codes do carry acoustic
information (different sounds get different codes), which the demo and the tests rely on.

Numerics: a code is a nearest-centroid decision, and CPU kernels round differently for different
batch sizes, so a frame close to a decision boundary may get another code in another batch. With
the random codec this is frequent for near-silent frames (its centroids crowd there): up to a
third of the frames of a sparse clip (clicks) were seen to differ between batch sizes 1 and 16.
``af-prepare`` (``af_train.prepare``) pins batch and chunk size in its resume fingerprint, so an
interrupted and resumed preparation reproduces the uninterrupted codes bit for bit.

The weights identity written into shard manifests is ``"pretrained sha256:<16 hex> (<file>)"`` or
``"random-init seed N"``; ``identity()`` adds the kind, model, bandwidth, rows and codebook size.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from af_train.files import sha256_file
from af_train.tokenizers.audio_io import downmix, load_clip, pcm_to_float, resample
from af_train.tokenizers.base import (
    FRAME_RATE,
    HOP_LENGTH,
    SAMPLE_RATE,
    TokenizerError,
    frames_for_samples,
    resolve_device,
)

log = logging.getLogger(__name__)

MODEL_NAME = "encodec_24khz"
OFFICIAL_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + OFFICIAL_CHECKPOINT
KIND = "encodec"
CODEBOOK_SIZE = 1024
BANDWIDTH_CODEBOOKS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}

_CALIBRATION_SECONDS = 16  # 1200 frames ≥ 1024 centroids per codebook
_KMEANS_ITERS = 8


__all__ = ["AcousticCodec", "CodecWeightsError", "frames_for_samples", "HOP_LENGTH",
           "SAMPLE_RATE", "FRAME_RATE", "CODEBOOK_SIZE", "OFFICIAL_CHECKPOINT", "OFFICIAL_URL", "hub_checkpoint_dir"]


class CodecWeightsError(FileNotFoundError, TokenizerError):
    """The codec weights cannot be found or loaded; the message says how to provide them."""


def codebooks_for_bandwidth(bandwidth: float) -> int:
    try:
        return BANDWIDTH_CODEBOOKS[float(bandwidth)]
    except KeyError:
        allowed = ", ".join(f"{b:g}" for b in BANDWIDTH_CODEBOOKS)
        raise ValueError(f"unsupported EnCodec bandwidth {bandwidth} kbps; choose one of {allowed}") from None


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """Find the checkpoint file, or raise :class:`CodecWeightsError` explaining how to provide it."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            searched = [path / OFFICIAL_CHECKPOINT]
        else:
            searched = [path]
    else:
        searched = [hub_checkpoint_dir() / OFFICIAL_CHECKPOINT]
    for candidate in searched:
        if candidate.is_file():
            return candidate
    where = ", ".join(str(s) for s in searched)
    raise CodecWeightsError(
        f"EnCodec weights '{OFFICIAL_CHECKPOINT}' not found (looked for: {where}). Provide them in one of "
        f"these ways: (1) download {OFFICIAL_URL} into {hub_checkpoint_dir()}/ (torch hub's cache, where "
        "`encodec` puts it when it has network access); (2) pass the file explicitly with "
        "--codec-checkpoint FILE (AcousticCodec(checkpoint=FILE)); (3) for tests and demos only, use a "
        "randomly initialised codec with --codec-random-init SEED (AcousticCodec(random_init_seed=SEED)); "
        "its codes are not comparable with the pretrained codec's."
    )


def _build_encodec(seed: int = 0) -> torch.nn.Module:
    """An untrained encodec 24 kHz model whose weights are drawn from ``seed``; the caller's RNG
    streams are left untouched."""
    from encodec import EncodecModel

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore", FutureWarning)  # encodec uses the deprecated weight_norm
        warnings.simplefilter("ignore", UserWarning)
        return EncodecModel.encodec_model_24khz(pretrained=False)


def calibration_audio(seed: int, seconds: int = _CALIBRATION_SECONDS) -> torch.Tensor:
    """Deterministic varied synthetic audio [seconds, 1, 24000] (tones, noise, clicks, sweeps)."""
    rng = np.random.default_rng([seed, 0xC0DEC])
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    segments = []
    for _ in range(seconds):
        seg = np.zeros(SAMPLE_RATE)
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(0, 6)
            if kind == 0:  # pure tone
                seg += np.sin(2 * np.pi * np.exp(rng.uniform(np.log(40), np.log(11000))) * t)
            elif kind == 1:  # harmonic stack
                f0 = np.exp(rng.uniform(np.log(60), np.log(600)))
                seg += sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 12) if f0 * k < 11000)
            elif kind == 2:  # white or coloured noise
                noise = rng.standard_normal(SAMPLE_RATE)
                if rng.random() < 0.5:
                    noise = np.cumsum(noise)
                    noise -= np.linspace(noise[0], noise[-1], SAMPLE_RATE)
                seg += noise / (np.abs(noise).max() + 1e-9)
            elif kind == 3:  # exponential sweep
                f_lo, f_hi = np.exp(rng.uniform(np.log(50), np.log(10000), size=2))
                phase = 2 * np.pi * f_lo * (np.power(f_hi / f_lo, t) - 1) / np.log(f_hi / f_lo + 1e-12)
                seg += np.sin(phase) if abs(f_hi - f_lo) > 1 else np.sin(2 * np.pi * f_lo * t)
            elif kind == 4:  # click train
                period = int(SAMPLE_RATE / rng.uniform(2, 60))
                seg[:: max(period, 1)] += 1.0
            else:  # amplitude-modulated noise
                seg += rng.standard_normal(SAMPLE_RATE) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 20) * t))
        seg = seg / (np.abs(seg).max() + 1e-9) * 10 ** (rng.uniform(-40, -1) / 20)
        segments.append(seg)
    return torch.tensor(np.stack(segments), dtype=torch.float32).unsqueeze(1)


def _kmeans(data: torch.Tensor, k: int, iters: int, seed: list[int]) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations on [N, D], in float64 numpy (small, single-threaded ops).

    Calibration audio has many identical frames (silence, repeated clicks). Plain random seeding
    would pick duplicate centres, and a frame equidistant to two identical centres gets its code
    from float rounding noise. k-means++ never picks a point at distance zero from an existing
    centre; when fewer than ``k`` distinct points exist, the spare centres are parked far outside
    the data, where they are never the nearest.
    """
    rng = np.random.default_rng(seed)
    x = data.double().numpy()
    n, dim = x.shape
    centres = np.empty((k, dim))
    centres[0] = x[rng.integers(n)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    tiny = 1e-12 * max(float((x**2).sum(1).mean()), 1e-30)
    used = 1
    while used < k:
        total = float(d2.sum())
        if total <= tiny * n:
            break
        pick = min(int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right")), n - 1)
        centres[used] = x[pick]
        d2 = np.minimum(d2, ((x - centres[used]) ** 2).sum(1))
        used += 1
    if used < k:  # spare centres: far away, on distinct random directions
        directions = rng.standard_normal((k - used, dim))
        scale = 1e3 * max(float(np.abs(x).max()), 1e-6)
        centres[used:] = x.mean(0) + scale * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    x2 = (x**2).sum(1, keepdims=True)
    for _ in range(iters):
        live = centres[:used]
        assign = np.argmin(x2 - 2 * x @ live.T + (live**2).sum(1), axis=1)
        counts = np.bincount(assign, minlength=used)
        sums = np.zeros((used, dim))
        np.add.at(sums, assign, x)
        filled = counts > 0
        centres[:used][filled] = sums[filled] / counts[filled, None]
    return torch.from_numpy(centres).float()


@dataclass
class _RandomInitModel:
    """A random-init model whose first ``calibrated`` codebooks are filled (see module doc)."""

    model: torch.nn.Module
    seed: int
    residual: torch.Tensor  # [N, D] calibration residual after the calibrated layers
    calibrated: int = 0

    def calibrate(self, num_layers: int) -> None:
        """Fill codebooks up to ``num_layers``; layer k depends only on the seed and layers < k, so
        calibrating more layers later never changes the earlier ones."""
        for index in range(self.calibrated, num_layers):
            centres = _kmeans(self.residual, CODEBOOK_SIZE, _KMEANS_ITERS, seed=[self.seed, index])
            book = self.model.quantizer.vq.layers[index]._codebook
            with torch.no_grad():
                book.embed.copy_(centres)
                book.embed_avg.copy_(centres)
                book.cluster_size.fill_(1.0)
                book.inited.fill_(1.0)
            nearest = torch.cdist(self.residual, centres).argmin(dim=1)
            self.residual = self.residual - centres[nearest]
            self.calibrated = index + 1


@functools.lru_cache(maxsize=4)
def _random_init_state(seed: int) -> _RandomInitModel:
    model = _build_encodec(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        emb = model.encoder(calibration_audio(seed))  # [S, D, frames]
    residual = emb.transpose(1, 2).reshape(-1, emb.shape[1]).clone()
    return _RandomInitModel(model.eval(), seed, residual)


def _random_init_model(seed: int, calibrated_layers: int) -> torch.nn.Module:
    """The random-init CPU model for ``seed``, cached because it costs seconds of encoder time.
    Codecs share it: they only run inference and pass their bandwidth per call (nothing about the
    bandwidth is stored in the model), so sharing is safe as long as nobody trains it."""
    state = _random_init_state(seed)
    state.calibrate(calibrated_layers)
    return state.model


class AcousticCodec:
    """EnCodec 24 kHz as a tokenizer: audio → int16 codes [codebooks, frames] at 75 Hz."""

    kind = KIND
    codebook_size = CODEBOOK_SIZE

    def __init__(
        self,
        bandwidth: float = 3.0,
        checkpoint: str | Path | None = None,
        random_init_seed: int | None = None,
        device: str | torch.device | None = None,
    ):
        self.codebooks = codebooks_for_bandwidth(bandwidth)
        self.bandwidth = float(bandwidth)
        if checkpoint is not None and random_init_seed is not None:
            raise ValueError(
                "give either a codec checkpoint or a random-init seed, not both "
                f"(checkpoint={checkpoint!s}, random_init_seed={random_init_seed})"
            )
        if random_init_seed is not None:
            if isinstance(random_init_seed, bool) or not isinstance(random_init_seed, int) or random_init_seed < 0:
                raise ValueError(f"random_init_seed must be an integer >= 0, got {random_init_seed!r}")
            model = _random_init_model(random_init_seed, self.codebooks)  # shared on the CPU: read-only
            if resolve_device(device).type != "cpu":
                template, model = model, _build_encodec()
                model.load_state_dict(template.state_dict())
            self.weights = f"random-init seed {random_init_seed}"
            self.checkpoint_path: Path | None = None
        else:
            path = resolve_checkpoint(checkpoint)  # fails fast, before building anything
            model = _build_encodec()
            self._load_checkpoint(model, path)
            self.weights = f"pretrained sha256:{sha256_file(path)[:16]} ({path.name})"
            self.checkpoint_path = path
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _load_checkpoint(model: torch.nn.Module, path: Path) -> None:
        expected = OFFICIAL_CHECKPOINT.split("-")[1].split(".")[0]
        if path.name == OFFICIAL_CHECKPOINT and not sha256_file(path).startswith(expected):
            log.warning(
                "%s is named like the official EnCodec checkpoint but its sha256 does not start with %s: "
                "not the official weights (the manifest records its actual hash)",
                path,
                expected,
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure here means "not a usable checkpoint"
            raise CodecWeightsError(f"cannot read EnCodec checkpoint {path}: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CodecWeightsError(f"{path} does not hold a state dict (got {type(state).__name__})")
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CodecWeightsError(
                f"{path} is not an encodec_24khz checkpoint: {len(missing)} missing tensors "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise CodecWeightsError(
                    f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, the 24 kHz model expects "
                    f"{tuple(own[name].shape)}"
                )
        model.load_state_dict(state)

    # ------------------------------------------------------------------ description
    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def frame_rate(self) -> float:
        return FRAME_RATE

    @property
    def num_rows(self) -> int:
        return self.codebooks

    def identity(self) -> dict:
        """What manifests and checkpoints record; ``tokenizer_from_identity`` re-creates the codec from it."""
        return encodec_identity(self.bandwidth, self.weights)

    def __repr__(self) -> str:
        return (
            f"AcousticCodec({MODEL_NAME}, {self.bandwidth:g} kbps = {self.codebooks} codebooks at "
            f"{FRAME_RATE:g} Hz, weights={self.weights!r}, device={self.device})"
        )

    # ------------------------------------------------------------------ encoding
    def encode_batch(self, clips: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Equal-length 24 kHz mono clips [batch, samples] → int16 codes [batch, codebooks, frames]."""
        clips = torch.as_tensor(clips, dtype=torch.float32)
        if clips.dim() != 2 or clips.shape[1] == 0:
            raise ValueError(f"encode_batch expects [batch, samples] with samples > 0, got {tuple(clips.shape)}")
        with torch.inference_mode():
            x = clips.to(self.device).unsqueeze(1)  # [B, 1, samples]
            codes = self.model.encoder(x)
            codes = self.model.quantizer.encode(codes, self.model.frame_rate, self.bandwidth)  # [K, B, F]
            codes = codes.transpose(0, 1)
        return codes.to(torch.int16).cpu()

    def encode(self, wav: torch.Tensor | np.ndarray, sample_rate: int) -> torch.Tensor:
        """Audio [channels, samples] (or [samples]) at ``sample_rate`` → int16 codes [codebooks, frames].

        Integer PCM is scaled to [-1, 1), channels are averaged, the rate converted to 24 kHz.
        """
        wav = torch.as_tensor(wav)
        if wav.dim() not in (1, 2):
            raise ValueError(f"expected audio [channels, samples] or [samples], got shape {tuple(wav.shape)}")
        if wav.dim() == 2 and wav.shape[0] > wav.shape[1]:
            log.warning("audio shaped %s has more channels than samples; expected [channels, samples]",
                        tuple(wav.shape))
        mono = downmix(pcm_to_float(wav))
        if not torch.isfinite(mono).all():
            raise ValueError("audio contains NaN or inf samples")
        mono = resample(mono, int(sample_rate), SAMPLE_RATE)
        if mono.numel() == 0:
            raise ValueError("cannot encode empty audio")
        return self.encode_batch(mono.unsqueeze(0))[0]

    def encode_file(self, path: str | Path, clip_seconds: float | None = None) -> torch.Tensor:
        """Decode an audio file and encode it; with ``clip_seconds`` the clip is cropped/zero-padded
        to exactly that length (10.0 s → 750 frames). Raises ``AudioRejected`` for unusable files."""
        if clip_seconds is None:
            import soundfile as sf

            from af_train.tokenizers.audio_io import MISSING_FILE, UNREADABLE, AudioRejected

            if not Path(path).is_file():
                raise AudioRejected(MISSING_FILE, f"no such file: {path}")
            try:
                data, rate = sf.read(str(path), dtype="float32", always_2d=True)
            except Exception as exc:  # noqa: BLE001
                raise AudioRejected(UNREADABLE, f"cannot decode {path}: {exc}") from None
            return self.encode(torch.from_numpy(np.ascontiguousarray(data.T)), rate)
        clip = load_clip(path, sample_rate=SAMPLE_RATE, clip_seconds=clip_seconds, silence_dbfs=None)
        return self.encode_batch(torch.from_numpy(clip.samples).unsqueeze(0))[0]


def encodec_identity(bandwidth: float, weights: str, model: str = MODEL_NAME) -> dict:
    """The identity of an EnCodec tokenizer (also derived from manifests written before identities)."""
    return {
        "kind": KIND,
        "model": model,
        "bandwidth": float(bandwidth),
        "rows": codebooks_for_bandwidth(bandwidth) if float(bandwidth) in BANDWIDTH_CODEBOOKS else None,
        "codes": CODEBOOK_SIZE,
        "weights": weights,
    }


def codec_from_identity(identity: dict, search_paths=(), device: str | torch.device | None = None) -> AcousticCodec:
    """Exactly the EnCodec of ``identity``: the same random-init seed, or a checkpoint with the same
    sha256 prefix (looked for in torch hub's cache and in ``search_paths``). Never another one."""
    weights = str(identity.get("weights", ""))
    bandwidth = float(identity.get("bandwidth", 3.0))
    if weights.startswith("random-init seed "):
        try:
            seed = int(weights.rsplit(" ", 1)[1])
        except ValueError:
            raise TokenizerError(f"unreadable EnCodec weights identity {weights!r}") from None
        return AcousticCodec(bandwidth=bandwidth, random_init_seed=seed, device=device)
    if not weights.startswith("pretrained sha256:"):
        raise TokenizerError(
            f"EnCodec weights {weights!r} cannot be re-created (neither 'pretrained sha256:...' nor "
            "'random-init seed N'); re-prepare the data with a real tokenizer"
        )
    wanted = weights.split(":", 1)[1].split(" ", 1)[0]
    name = weights.split("(", 1)[1].rstrip(")") if "(" in weights else OFFICIAL_CHECKPOINT
    candidates = [hub_checkpoint_dir() / name, hub_checkpoint_dir() / OFFICIAL_CHECKPOINT]
    for folder in search_paths:
        folder = Path(folder)
        candidates += [folder, folder / name, folder / OFFICIAL_CHECKPOINT]
    for path in candidates:
        if path.is_file() and sha256_file(path).startswith(wanted):
            return AcousticCodec(bandwidth=bandwidth, checkpoint=path, device=device)
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise TokenizerError(
        f"the EnCodec weights these codes were made with ({weights}) are not here (looked in: {looked}); put "
        f"that checkpoint (sha256 starting {wanted}) into {hub_checkpoint_dir()}/ or pass its folder"
    )
