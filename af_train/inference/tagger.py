"""``AudioTagger``: audio files or waveforms of any length -> class scores and embeddings.

Every input goes the way training data went: decoded to mono at the tokenizer's sample rate, cut into
windows of the training clip length (``af_train.inference.windows``; a file is decoded one window at a
time by af-prepare's ``probe`` + ``load_clip``, never whole), each window zero-padded and
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
    ZERO_LENGTH,
    AudioRejected,
    downmix,
    file_warnings,
    fit_to_length,
    load_clip,
    pcm_to_float,
    probe,
    resample,
)
from af_train.tokens import SpecialTokens, frame_rows

log = logging.getLogger(__name__)

AudioInput = str | Path | np.ndarray | torch.Tensor | tuple  # path | waveform | (waveform, sample_rate)


@dataclass
class _Pending:
    """An input on its way through ``results``: its windows' outputs as they come back from the model."""

    result: FileResult
    num_samples: int = 0
    queued: int = 0  # windows decoded and waiting for the model
    decoded: bool = False  # every window decoded (or the input refused)
    starts: list[int] = field(default_factory=list)
    valid: list[int] = field(default_factory=list)
    outputs: dict[str, list[Any]] = field(default_factory=dict)


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
        layer = self.resolve_layer(layer)
        names_iter = iter(names) if names is not None else None
        chunk = 4 * max(self.batch_size, self.encode_batch_size)
        waiting: list[_Pending] = []  # inputs not yet yielded, in order
        queue: list[tuple[_Pending, int, torch.Tensor, int]] = []  # windows decoded, not yet run through the model
        for index, item in enumerate(inputs):
            pending = _Pending(FileResult(next(names_iter) if names_iter is not None else _name_of(item, index)))
            waiting.append(pending)
            try:  # one window of audio at a time: memory does not grow with the file's length
                for start, clip, real, total in self._windows(item, pending.result):
                    pending.num_samples = total
                    pending.queued += 1
                    queue.append((pending, start, clip, real))
                    if len(queue) >= chunk:
                        self._compute(queue, scores, embeddings or frames, layer)
                        queue = []
            except AudioRejected as exc:
                result = pending.result
                result.ok, result.reason, result.message = False, exc.reason, exc.message
            pending.decoded = True
            while waiting and waiting[0].decoded and waiting[0].queued == 0:
                yield self._finish(waiting.pop(0), embeddings, frames, aggregate_how)
        self._compute(queue, scores, embeddings or frames, layer)
        for pending in waiting:
            yield self._finish(pending, embeddings, frames, aggregate_how)

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

    def resolve_layer(self, layer: int | None) -> int:
        """The layer index 0 (embeddings) .. num_layers that ``layer`` names (None: the last; negative: from the
        end); raises ``InferenceError`` naming the valid range."""
        last = self.num_layers
        if layer is None:
            return last
        chosen = layer if layer >= 0 else last + 1 + layer
        if not 0 <= chosen <= last:
            raise InferenceError(f"layer {layer} does not exist: the encoder has layers 0 (embeddings) .. {last} "
                                 f"(or -1 .. -{last + 1} from the end)")
        return chosen

    def _windows(self, item: AudioInput, result: FileResult) -> Iterator[tuple[int, torch.Tensor, int, int]]:
        """(start, clip [clip_samples] zero-padded, real samples in it, the input's length) of every window of
        ``item``, at ``sample_rate``; sets ``result.seconds`` and appends the problems that do not refuse the
        input to ``result.warnings``. A file is decoded one window at a time (its header first: af-prepare's
        ``probe`` and ``load_clip``), never whole. AudioRejected with af-prepare's reasons, in its order (a
        silent file only after its last window: silence is a property of the whole file)."""
        w = self.windowing
        if not isinstance(item, (str, Path)):
            wav, result.seconds = self._decode(item, result.warnings)
            for start in w.starts(wav.numel()):
                clip, real = fit_to_length(wav[start:start + w.clip_samples], w.clip_samples)
                yield start, clip, real, wav.numel()
            return
        path, name = Path(item), str(item)
        if path.is_symlink() and not path.is_file():
            raise AudioRejected(MISSING_FILE, f"{path} is a link to {os.readlink(path)}, which is not a readable "
                                              "file; fix or remove the link")
        info = probe(path)  # missing, unreadable, empty
        result.seconds = info.seconds
        self._check_length(name, result.seconds)
        # the length at our rate, as resampling the whole file gives it (torchaudio rounds up)
        total = -(-info.frames * self.sample_rate // info.sample_rate)
        peak = 0.0
        for start in w.starts(total):
            clip = load_clip(path, sample_rate=self.sample_rate, clip_seconds=self.card.clip_seconds,
                             silence_dbfs=None, start_frame=round(start * info.sample_rate / self.sample_rate))
            peak = max(peak, clip.peak)
            yield start, torch.from_numpy(clip.samples), min(total - start, w.clip_samples), total
        self._check_level(path, name, peak, result.warnings)

    def _decode(self, item: AudioInput, warnings: list[tuple[str, str]]) -> tuple[torch.Tensor, float]:
        """A waveform input: (mono float32 [samples] at ``sample_rate``, its duration in seconds); AudioRejected
        with af-prepare's reasons; problems that do not refuse the input are appended to ``warnings``."""
        wav, rate = (item[0], int(item[1])) if isinstance(item, tuple) else (item, self.sample_rate)
        wav = torch.as_tensor(np.asarray(wav) if not isinstance(wav, torch.Tensor) else wav)
        wav = downmix(pcm_to_float(wav).cpu())
        name = "waveform"
        # af-prepare's checks, in its order
        if wav.numel() == 0:
            raise AudioRejected(ZERO_LENGTH, f"{name} holds no samples")
        seconds = wav.numel() / rate
        self._check_length(name, seconds)
        if not torch.isfinite(wav).all():
            raise AudioRejected(NON_FINITE, f"{name} has {int((~torch.isfinite(wav)).sum())} NaN/inf samples")
        self._check_level(None, name, float(wav.abs().max()), warnings)
        return resample(wav, rate, self.sample_rate).contiguous(), seconds

    def _check_length(self, name: str, seconds: float) -> None:
        if seconds < self.min_seconds:
            raise AudioRejected(TOO_SHORT, f"{name} lasts {seconds:.3f} s, shorter than the {self.min_seconds:g} s "
                                           "the training data required (af-prepare --min-seconds)")

    def _check_level(self, path: Path | None, name: str, peak: float, warnings: list[tuple[str, str]]) -> None:
        """af-prepare's warnings (a cut WAV, samples beyond full scale) for the whole input, then its silence check."""
        warnings.extend(file_warnings(path, peak, name))
        if self.silence_dbfs is not None:
            peak_db = 20.0 * math.log10(peak) if peak > 0 else -math.inf
            if peak_db < self.silence_dbfs:
                raise AudioRejected(SILENT, f"{name} is silent (peak {peak_db:.1f} dBFS < {self.silence_dbfs:.1f} "
                                            "dBFS, the threshold the training data was prepared with)")

    def _compute(self, queue: list[tuple[_Pending, int, torch.Tensor, int]], want_scores: bool, want_hidden: bool,
                 layer: int) -> None:
        """Encode the queued windows and run the model on them; each window's outputs go to its input."""
        if not queue:
            return
        codes = self._encode(torch.stack([clip for _, _, clip, _ in queue]))
        outputs = self._run_model(codes, [real for _, _, _, real in queue], want_scores, want_hidden, layer)
        for i, (pending, start, _, real) in enumerate(queue):
            pending.starts.append(start)
            pending.valid.append(real)
            for key, values in outputs.items():
                if values:
                    pending.outputs.setdefault(key, []).append(values[i])
            pending.queued -= 1

    def _finish(self, pending: _Pending, want_embedding: bool, want_frames: bool,
                aggregate_how: str | None) -> FileResult:
        result = pending.result
        if result.ok:
            self._fill(result, pending.num_samples, pending.starts, pending.valid, pending.outputs, want_embedding,
                       want_frames, aggregate_how or self.aggregate)
        return result


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
