"""``AudioTagger``: audio files or waveforms of any length -> class scores and embeddings.

Every input goes the way training data went: decoded to mono at the tokenizer's sample rate, cut into
windows of the training clip length (``af_train.inference.windows``), each window zero-padded and
encoded as af-prepare encodes a clip, its code row framed BOA + codes + EOA and padded exactly as the
data loader's collator pads it, then the encoder and the classifier of the fine-tuned model. A file no
longer than one window therefore gets the logits that training-time evaluation gives that clip.

Bit-exact codes: a code is a nearest-centroid decision, and CPU convolutions round differently for
different batch sizes, which can flip a decision (often with a random-initialised codec, whose
centroids crowd near silence). af-prepare encodes every clip in a batch of exactly its ``--batch-size``
(zero-padding a chunk's last batch), and windows here are encoded the same way: in batches of that
size (``encode_batch_size``, recorded in the manifest), zero-padded when not full. Same machine and
thread count, same codes; elsewhere a rare near-tie frame may still differ.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from af_train.data.collate import Collator
from af_train.inference.model import InferenceError, LoadedModel, load_model, tokenizer_for
from af_train.inference.windows import Windowing, stitch_frames
from af_train.inference.windows import aggregate as aggregate_windows
from af_train.model.heads import masked_mean_pool
from af_train.objectives import row_type_ids
from af_train.tokenizers.audio_io import (
    MISSING_FILE,
    NON_FINITE,
    SILENT,
    TOO_SHORT,
    UNREADABLE,
    ZERO_LENGTH,
    AudioRejected,
    downmix,
    file_warnings,
    fit_to_length,
    pcm_to_float,
    resample,
)
from af_train.tokens import SpecialTokens, frame_rows

log = logging.getLogger(__name__)

AudioInput = str | Path | np.ndarray | torch.Tensor | tuple  # path | waveform | (waveform, sample_rate)


@dataclass
class FileResult:
    """What one input gave. ``ok`` False: ``reason`` (af-prepare's names) and ``message`` say why."""

    name: str
    ok: bool = True
    reason: str | None = None
    message: str | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (reason, message): used, but worth a word
    seconds: float = 0.0  # duration of the input
    windows: np.ndarray | None = None  # [W, 2] start and end (seconds) of the audio each window reads
    window_logits: np.ndarray | None = None  # [W, C]
    window_scores: np.ndarray | None = None  # [W, C] probabilities (sigmoid, or softmax for single-label)
    scores: np.ndarray | None = None  # [C] window probabilities aggregated (mean or max)
    logits: np.ndarray | None = None  # [C] window logits aggregated the same way (what evaluation ranks:
    # a softmax is not monotonic per class, so single-label mAP must be computed on these)
    embedding: np.ndarray | None = None  # [H] mean over windows of the mean-pooled hidden state
    frame_embeddings: np.ndarray | None = None  # [F, H] one per code frame
    frame_times: np.ndarray | None = None  # [F] centre of each frame, seconds (all within the audio)


class AudioTagger:
    """A fine-tuned model ready for audio. Build with :meth:`load` (run dir, model.pt, af-export-hf dir).

    - ``tag(inputs) -> [N, C]`` scores over ``labels``; ``embed(inputs) -> [N, H]``;
      ``frame_embeddings(inputs) -> [(frames [F, H], times [F])]``; ``results(inputs)`` yields a
      :class:`FileResult` per input with per-window scores and timestamps, failures included.
    - inputs: paths, or waveforms (1-D, or [channels, samples]) at ``sample_rate``, or
      ``(waveform, rate)`` tuples at any rate.
    """

    def __init__(self, loaded: LoadedModel, *, tokenizer: Any = None, device: str | torch.device | None = None,
                 hop_seconds: float | None = None, aggregate: str = "mean", batch_size: int = 16,
                 encode_batch_size: int | None = None, reject_silent: bool = True,
                 min_seconds: float | None = None, tokenizer_search: list[Path] | tuple = ()):
        for name, value in (("batch_size", batch_size), ("encode_batch_size", encode_batch_size)):
            if value is not None and int(value) < 1:
                raise InferenceError(f"{name} must be >= 1, got {value}")
        self.device = resolve_device(device)
        self.card = loaded.card
        self.source = loaded.source
        self.encoder = loaded.encoder.to(self.device).eval()
        self.classifier = loaded.classifier.to(self.device).eval() if loaded.classifier is not None else None
        self.tokenizer = tokenizer_for(self.card.tokenizer, tokenizer, tokenizer_search, self.device)
        self.sample_rate = int(self.tokenizer.sample_rate)
        samples_per_frame = round(self.sample_rate / float(self.tokenizer.frame_rate))
        clip_samples = int(round(self.card.clip_seconds * self.sample_rate))
        window_frames = min(math.ceil(clip_samples / samples_per_frame), self.card.max_codes)
        hop_frames = max(1, window_frames // 2) if hop_seconds is None else \
            hop_in_frames(hop_seconds, float(self.tokenizer.frame_rate), window_frames)
        self.windowing = Windowing(self.sample_rate, samples_per_frame, clip_samples, window_frames, hop_frames)
        aggregate_windows(np.zeros((1, 1)), aggregate)  # a bad name fails now, not after decoding
        self.aggregate = aggregate
        self.batch_size = int(batch_size)
        self.encode_batch_size = int(encode_batch_size or self.card.encode_batch_size)
        self.silence_dbfs = self.card.silence_dbfs if reject_silent else None
        self.min_seconds = self.card.min_seconds if min_seconds is None else float(min_seconds)
        tokens = SpecialTokens(self.card.codebook_size)
        self._boa = tokens.boa if self.card.add_boa else None
        self._eoa = tokens.eoa if self.card.add_eoa else None
        # the data loader's own collator: the same padding length and attention mask as in training
        self._collator = Collator(tokens.pad, self.card.max_length, num_classes=1, multi_label=True,
                                  dynamic_padding=self.card.dynamic_padding)

    @classmethod
    def load(cls, path: str | Path, *, checkpoint: str | Path | None = None, weights: str | Path | None = None,
             manifest: str | Path | None = None, **kwargs: Any) -> AudioTagger:
        """From a run directory (checkpoint selected on validation by default), a model.pt (+ ``manifest``)
        or an af-export-hf directory; ``kwargs`` go to the constructor."""
        kwargs["device"] = resolve_device(kwargs.get("device"))  # a bad device fails before the weights load
        return cls(load_model(path, checkpoint=checkpoint, weights=weights, manifest=manifest), **kwargs)

    # ------------------------------------------------------------------ description
    @property
    def labels(self) -> list[str]:
        return list(self.card.labels or [])

    @property
    def multi_label(self) -> bool:
        return self.card.multi_label

    @property
    def embedding_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.encoder.config.num_hidden_layers)

    @property
    def window_seconds(self) -> float:
        return self.windowing.window_samples / self.sample_rate

    @property
    def hop_seconds(self) -> float:
        return self.windowing.hop_samples / self.sample_rate

    @property
    def thresholds(self) -> np.ndarray | None:
        """Per-class thresholds chosen on validation (NaN for a class without positives there), if stored."""
        return None if self.card.thresholds is None else np.asarray(self.card.thresholds, dtype=np.float64)

    def __repr__(self) -> str:
        return (f"AudioTagger({self.source}, {len(self.labels)} classes, window {self.window_seconds:g} s, hop "
                f"{self.hop_seconds:g} s, device={self.device})")

    # ------------------------------------------------------------------ public API
    def tag(self, inputs: Iterable[AudioInput] | AudioInput, aggregate: str | None = None) -> np.ndarray:
        """Scores [N, C] (probabilities) over ``labels``; raises on the first input that cannot be used."""
        return np.stack([r.scores for r in self._strict(inputs, scores=True, aggregate_how=aggregate)])

    def embed(self, inputs: Iterable[AudioInput] | AudioInput, layer: int | None = None) -> np.ndarray:
        """Clip embeddings [N, H]: the hidden state of ``layer`` (default: the last; 0 = the embedding
        layer; negative counts from the end) mean-pooled over each window, averaged over windows."""
        return np.stack([r.embedding for r in self._strict(inputs, scores=False, embeddings=True, layer=layer)])

    def frame_embeddings(self, inputs: Iterable[AudioInput] | AudioInput,
                         layer: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per input: (embeddings [F, H] one per code frame, centre times [F] in seconds)."""
        return [(r.frame_embeddings, r.frame_times)
                for r in self._strict(inputs, scores=False, frames=True, layer=layer)]

    def results(self, inputs: Iterable[AudioInput], *, scores: bool = True, embeddings: bool = False,
                frames: bool = False, layer: int | None = None, aggregate_how: str | None = None,
                names: Iterable[str] | None = None) -> Iterator[FileResult]:
        """One :class:`FileResult` per input, in order; unusable inputs give ``ok=False`` (never raise)."""
        if scores and self.classifier is None:
            raise InferenceError(f"{self.source} has no classifier (an encoder or pretraining checkpoint); "
                                 "it can embed but not tag")
        layer = self._check_layer(layer)
        names_iter = iter(names) if names is not None else None
        pending: list[tuple[FileResult, torch.Tensor | None]] = []
        queued_windows = 0
        chunk = 4 * max(self.batch_size, self.encode_batch_size)
        for index, item in enumerate(inputs):
            name = next(names_iter) if names_iter is not None else _name_of(item, index)
            result = FileResult(name)
            wav = None
            try:
                wav, result.seconds = self._decode(item, result.warnings)
            except AudioRejected as exc:
                result.ok, result.reason, result.message = False, exc.reason, exc.message
            pending.append((result, wav))
            if wav is not None:
                queued_windows += len(self.windowing.starts(wav.numel()))
            if queued_windows >= chunk:
                yield from self._compute(pending, scores, embeddings, frames, layer, aggregate_how)
                pending, queued_windows = [], 0
        yield from self._compute(pending, scores, embeddings, frames, layer, aggregate_how)

    # ------------------------------------------------------------------ internals
    def _strict(self, inputs: Iterable[AudioInput] | AudioInput, **kwargs: Any) -> list[FileResult]:
        if isinstance(inputs, (str, Path, np.ndarray, torch.Tensor, tuple)):
            inputs = [inputs]
        out = []
        for result in self.results(inputs, **kwargs):
            if not result.ok:
                raise InferenceError(f"{result.name}: {result.message} ({result.reason})")
            out.append(result)
        return out

    def _check_layer(self, layer: int | None) -> int:
        last = self.num_layers
        if layer is None:
            return last
        chosen = layer if layer >= 0 else last + 1 + layer
        if not 0 <= chosen <= last:
            raise InferenceError(f"layer {layer} does not exist: the encoder has layers 0 (embeddings) .. {last} "
                                 "(or -1 .. -{last + 1} from the end)")
        return chosen

    def _decode(self, item: AudioInput, warnings: list[tuple[str, str]]) -> tuple[torch.Tensor, float]:
        """(mono float32 [samples] at ``sample_rate``, the input's duration in seconds); AudioRejected with
        af-prepare's reasons; problems that do not refuse the input are appended to ``warnings``."""
        if isinstance(item, (str, Path)):
            wav, rate = _read_file(Path(item))
            name, path = str(item), item
        else:
            wav, rate = (item[0], int(item[1])) if isinstance(item, tuple) else (item, self.sample_rate)
            wav = torch.as_tensor(np.asarray(wav) if not isinstance(wav, torch.Tensor) else wav)
            wav = downmix(pcm_to_float(wav).cpu())
            name, path = "waveform", None
        # af-prepare's checks, in its order
        if wav.numel() == 0:
            raise AudioRejected(ZERO_LENGTH, f"{name} holds no samples")
        seconds = wav.numel() / rate
        if seconds < self.min_seconds:
            raise AudioRejected(TOO_SHORT, f"{name} lasts {seconds:.3f} s, shorter than the {self.min_seconds:g} s "
                                           "the training data required (af-prepare --min-seconds)")
        if not torch.isfinite(wav).all():
            raise AudioRejected(NON_FINITE, f"{name} has {int((~torch.isfinite(wav)).sum())} NaN/inf samples")
        peak = float(wav.abs().max())
        warnings.extend(file_warnings(path, peak, name))  # af-prepare's warnings, counted the same way
        if self.silence_dbfs is not None:
            peak_db = 20.0 * math.log10(peak) if peak > 0 else -math.inf
            if peak_db < self.silence_dbfs:
                raise AudioRejected(SILENT, f"{name} is silent (peak {peak_db:.1f} dBFS < {self.silence_dbfs:.1f} "
                                            "dBFS, the threshold the training data was prepared with)")
        return resample(wav, rate, self.sample_rate).contiguous(), seconds

    def _compute(self, pending: list[tuple[FileResult, torch.Tensor | None]], want_scores: bool, want_embedding: bool,
                 want_frames: bool, layer: int, aggregate_how: str | None) -> Iterator[FileResult]:
        w = self.windowing
        segments, valid, owner, starts = [], [], [], []
        for index, (_, wav) in enumerate(pending):
            if wav is None:
                continue
            for start in w.starts(wav.numel()):
                clip, real = fit_to_length(wav[start:start + w.clip_samples], w.clip_samples)
                segments.append(clip)
                valid.append(real)
                owner.append(index)
                starts.append(start)
        outputs: dict[str, list[Any]] = {}
        if segments:
            codes = self._encode(torch.stack(segments))
            outputs = self._run_model(codes, valid, want_scores, want_embedding or want_frames, layer)
        for index, (result, wav) in enumerate(pending):
            if wav is not None:
                mine = [i for i, o in enumerate(owner) if o == index]
                self._fill(result, wav.numel(), [starts[i] for i in mine], [valid[i] for i in mine],
                           {k: [v[i] for i in mine] for k, v in outputs.items() if v}, want_embedding, want_frames,
                           aggregate_how or self.aggregate)
            yield result

    def _encode(self, clips: torch.Tensor) -> torch.Tensor:
        """Code row [n, frames] of every clip, in tokenizer batches of ``encode_batch_size`` (see module doc)."""
        rows = []
        size = self.encode_batch_size
        for begin in range(0, clips.shape[0], size):
            batch = clips[begin:begin + size]
            real = batch.shape[0]
            if real < size:
                batch = torch.cat([batch, batch.new_zeros(size - real, batch.shape[1])])
            codes = self.tokenizer.encode_batch(batch)[:real]
            rows.append(codes[:, self.card.code_row].long())
        return torch.cat(rows)

    @torch.no_grad()
    def _run_model(self, codes: torch.Tensor, valid: list[int], want_scores: bool, want_hidden: bool,
                   layer: int) -> dict[str, list[Any]]:
        samples = []
        for i, (row, real) in enumerate(zip(codes, valid)):
            n = self.windowing.frames_read(real)
            samples.append({"id": str(i), "input_ids": frame_rows(row[None, :n], self._boa, self._eoa),
                            "labels": torch.empty(0, dtype=torch.long)})
        out: dict[str, list[Any]] = {"logits": [], "pooled": [], "frames": []}
        for begin in range(0, len(samples), self.batch_size):
            batch = self._collator(samples[begin:begin + self.batch_size])
            ids = batch["input_ids"][:, 0].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            types = row_type_ids(self.encoder, self.card.code_row, ids)
            if layer == self.num_layers:
                last = chosen = self.encoder(ids, mask, types)
            else:
                states = self.encoder(ids, mask, types, output_hidden_states=True)
                chosen, last = states[layer], states[-1]
            if want_scores:
                out["logits"].extend(self.classifier(masked_mean_pool(last, mask)).float().cpu())
            if want_hidden:
                out["pooled"].extend(masked_mean_pool(chosen, mask).float().cpu())
                skip = int(self._boa is not None)
                for j in range(ids.shape[0]):
                    n = int(mask[j].sum()) - skip - int(self._eoa is not None)
                    out["frames"].append(chosen[j, skip:skip + n].float().cpu())
        return out

    def _fill(self, result: FileResult, num_samples: int, starts: list[int], valid: list[int],
              outputs: dict[str, list[Any]], want_embedding: bool, want_frames: bool, how: str) -> None:
        w = self.windowing
        result.windows = np.array([w.span(s, num_samples) for s in starts], dtype=np.float64)
        if outputs.get("logits"):
            logits = torch.stack(outputs["logits"])
            probabilities = torch.sigmoid(logits) if self.multi_label else logits.softmax(dim=-1)
            result.window_logits = logits.numpy()
            result.window_scores = probabilities.numpy()
            result.scores = aggregate_windows(result.window_scores, how)
            result.logits = aggregate_windows(result.window_logits, how)
        if want_embedding:
            result.embedding = torch.stack(outputs["pooled"]).mean(dim=0).numpy()
        if want_frames:
            counts = [len(f) for f in outputs["frames"]]
            plan = stitch_frames(starts, counts, w.samples_per_frame)
            result.frame_embeddings = torch.stack([outputs["frames"][k][j] for k, j in plan]).numpy() \
                if len(plan) else np.zeros((0, self.embedding_size), dtype=np.float32)
            times = (np.arange(len(plan)) + 0.5) * w.samples_per_frame / self.sample_rate
            # a partial last frame is centred past the end of the audio: a timestamp must lie within it (HEAR)
            keep = max(1, int(np.count_nonzero(times <= result.seconds)))
            result.frame_embeddings = result.frame_embeddings[:keep]
            result.frame_times = np.minimum(times[:keep], result.seconds)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (None: cuda when available, else cpu); InferenceError naming the fix for a device
    that is not a device name or not on this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InferenceError(f"device {device!r} is not a device name; give cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InferenceError(f"device {device!r}: this machine has no usable CUDA GPU; give --device cpu")
        if chosen.index is not None and chosen.index >= count:
            raise InferenceError(f"device {device!r}: this machine has {count} GPU(s), cuda:0 .. cuda:{count - 1}")
    return chosen


def hop_in_frames(hop_seconds: float, frame_rate: float, window_frames: int) -> int:
    """``hop_seconds`` (--hop) in whole code frames; InferenceError naming the fix when it is no usable hop."""
    if not (isinstance(hop_seconds, (int, float)) and math.isfinite(hop_seconds) and hop_seconds > 0):
        raise InferenceError(f"hop of {hop_seconds!r} s: the hop (--hop, hop_seconds) must be a finite number of "
                             "seconds > 0")
    frames = round(hop_seconds * frame_rate)
    if frames < 1:
        raise InferenceError(f"hop of {hop_seconds:g} s is shorter than one code frame (1/{frame_rate:g} s); give "
                             f"a hop of at least {1 / frame_rate:.4f} s")
    if frames > window_frames:
        raise InferenceError(f"hop of {hop_seconds:g} s is longer than the window ({window_frames / frame_rate:g} "
                             f"s): audio between windows would never be read; give a hop of at most "
                             f"{window_frames / frame_rate:g} s")
    return frames


def _name_of(item: AudioInput, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"input_{index}"


def _read_file(path: Path) -> tuple[torch.Tensor, int]:
    import soundfile as sf

    if not path.is_file():
        if path.is_symlink():
            raise AudioRejected(MISSING_FILE, f"{path} is a link to {os.readlink(path)}, which is not a readable "
                                              "file; fix or remove the link")
        raise AudioRejected(MISSING_FILE, f"no such file: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [frames, channels]
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError, EOFError) as exc:
        raise AudioRejected(UNREADABLE, f"cannot decode {path}: {exc}") from None
    if rate <= 0:
        raise AudioRejected(ZERO_LENGTH, f"{path} holds no samples")
    return downmix(torch.from_numpy(np.ascontiguousarray(data.T))), int(rate)
