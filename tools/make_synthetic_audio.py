#!/usr/bin/env python3
"""Make the embedded synthetic audio data set: real wav files of distinct synthetic sound classes.

Eight classes, each with its own spectral region and time structure so that they stay separable
after tokenisation (even by a randomly initialised codec) and a tiny model can learn them:

  tone            steady sine, 220-440 Hz
  chirp           rising exponential sweep, 600 Hz → 5 kHz, repeated
  noise_burst     high-passed white noise in short bursts
  clicks          impulse train, 8-25 clicks/s
  am_tone         1-1.6 kHz carrier, amplitude-modulated at 3-8 Hz
  fm_tone         2.5-3.5 kHz carrier with vibrato (frequency-modulated)
  harmonic_stack  60-120 Hz fundamental with 15 decaying harmonics (buzzy)
  low_rumble      low-passed brown noise below ~150 Hz

A clip holds one class, or with ``--multi-label-prob`` a mixture of two or three (multi-label).
The primary class cycles through the classes so every class occurs once per ``num_classes`` clips.
Clip ``i`` is generated from ``(seed, i)`` alone: the same seed gives identical files, and a
larger ``--num-clips`` extends a smaller set. Output: ``DIR/audio/*.wav``, ``DIR/labels.csv``
(header ``path,labels,split,id``; labels separated by ';'; ready for
``af-prepare --format csv --labels DIR/vocabulary.txt``) and ``DIR/vocabulary.txt``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is an install requirement
    tqdm = None

CLASSES = ["tone", "chirp", "noise_burst", "clicks", "am_tone", "fm_tone", "harmonic_stack", "low_rumble"]


def synthesize(name: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One source of class ``name``: ``n`` samples at ``sr``, peak-normalised to 1."""
    t = np.arange(n) / sr
    nyquist = sr / 2
    if name == "tone":
        x = np.sin(2 * np.pi * rng.uniform(220, 440) * t + rng.uniform(0, 2 * np.pi))
    elif name == "chirp":
        period = rng.uniform(0.4, 0.8)
        f0, f1 = 600.0, min(5000.0, 0.8 * nyquist)
        tau = np.mod(t + rng.uniform(0, period), period) / period
        inst_freq = f0 * (f1 / f0) ** tau
        x = np.sin(2 * np.pi * np.cumsum(inst_freq) / sr)
    elif name == "noise_burst":
        noise = rng.standard_normal(n)
        noise = noise - _fast_lowpass(noise, 2000.0, sr)  # keep the high band
        gate = np.zeros(n)
        pos = int(rng.uniform(0, 0.1) * sr)
        while pos < n:
            length = int(rng.uniform(0.05, 0.15) * sr)
            gate[pos : pos + length] = 1.0
            pos += length + int(rng.uniform(0.1, 0.3) * sr)
        x = noise * gate
    elif name == "clicks":
        x = np.zeros(n)
        period = max(1, int(sr / rng.uniform(8, 25)))
        x[int(rng.integers(0, period)) :: period] = 1.0
        x = x + 0.5 * np.concatenate([[0.0], x[:-1]]) - 0.3 * np.concatenate([[0.0, 0.0], x[:-2]])
    elif name == "am_tone":
        carrier = np.sin(2 * np.pi * rng.uniform(1000, 1600) * t)
        x = carrier * (0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(3, 8) * t))
    elif name == "fm_tone":
        fc = min(rng.uniform(2500, 3500), 0.7 * nyquist)
        depth, rate = rng.uniform(150, 300), rng.uniform(4, 7)
        x = np.sin(2 * np.pi * fc * t + (depth / rate) * np.sin(2 * np.pi * rate * t))
    elif name == "harmonic_stack":
        f0 = rng.uniform(60, 120)
        harmonics = [k for k in range(1, 16) if f0 * k < nyquist]
        x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in harmonics)
    elif name == "low_rumble":
        brown = np.cumsum(rng.standard_normal(n))
        brown -= np.linspace(brown[0], brown[-1], n)
        x = _fast_lowpass(brown, 150.0, sr)
    else:
        raise ValueError(f"unknown synthetic class '{name}'; classes: {', '.join(CLASSES)}")
    x = np.asarray(x, dtype=np.float64)
    return x / (np.abs(x).max() + 1e-12)


def _fast_lowpass(x: np.ndarray, cutoff: float, sr: int) -> np.ndarray:
    """Brick-wall low-pass through the FFT (fast, exact enough for synthetic sources)."""
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1.0 / sr)
    spectrum[freqs > cutoff] = 0.0
    return np.fft.irfft(spectrum, n=len(x))


def make_clip(
    index: int,
    *,
    seed: int,
    sample_rate: int,
    clip_seconds: float,
    multi_label_prob: float,
    channels: int = 1,
    classes: list[str] = CLASSES,
) -> tuple[np.ndarray, list[str]]:
    """Clip ``index``: float32 [samples, channels] in [-1, 1] and its sorted label names."""
    rng = np.random.default_rng([seed, index])
    n = int(round(clip_seconds * sample_rate))
    labels = [classes[index % len(classes)]]
    if rng.random() < multi_label_prob:
        extra = 2 if rng.random() < 0.25 else 1
        others = [c for c in classes if c != labels[0]]
        labels += list(rng.choice(others, size=min(extra, len(others)), replace=False))
    mix = np.zeros(n)
    for name in labels:
        mix += synthesize(name, n, sample_rate, rng) * 10 ** (rng.uniform(-12, 0) / 20)
    mix += rng.standard_normal(n) * 10 ** (-60 / 20)  # faint background noise floor
    fade = min(n // 2, int(0.01 * sample_rate))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        mix[:fade] *= ramp
        mix[-fade:] *= ramp[::-1]
    mix = mix / (np.abs(mix).max() + 1e-12) * 10 ** (rng.uniform(-20, -3) / 20)
    audio = np.repeat(mix[:, None], channels, axis=1)
    if channels > 1:  # slight inter-channel level difference, still the same content
        audio *= np.linspace(1.0, 0.8, channels)[None, :]
    return audio.astype(np.float32), sorted(labels, key=classes.index)


def split_of(index: int, val_fraction: float, test_fraction: float, seed: int) -> str:
    """Split of clip ``index``: a draw from ``(seed, index)`` alone, so it does not depend on --num-clips."""
    u = np.random.default_rng([seed, index, 7]).random()
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="af-synth-audio",
        description="Write a synthetic multi-label audio data set (wav files + labels.csv) for demos and tests.",
    )
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--num-clips", type=int, default=400, help="total clips over all splits (default 400)")
    p.add_argument("--clip-seconds", type=float, default=2.0, help="clip duration (default 2.0)")
    p.add_argument("--sample-rate", type=int, default=16000, help="sample rate of the files (default 16000)")
    p.add_argument("--channels", type=int, default=1, help="channels per file (default 1)")
    p.add_argument("--seed", type=int, default=0, help="everything derives from this seed (default 0)")
    p.add_argument("--multi-label-prob", type=float, default=0.3, help="share of clips mixing 2-3 classes")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--subtype", default="PCM_16", help="soundfile subtype, e.g. PCM_16, PCM_24, FLOAT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = []
    if args.num_clips < 1:
        errors.append("--num-clips must be >= 1")
    if args.clip_seconds <= 0:
        errors.append("--clip-seconds must be > 0")
    if args.sample_rate < 4000:
        errors.append("--sample-rate must be >= 4000")
    if args.channels < 1:
        errors.append("--channels must be >= 1")
    if not 0 <= args.multi_label_prob <= 1:
        errors.append("--multi-label-prob must be in [0, 1]")
    if min(args.val_fraction, args.test_fraction) < 0 or args.val_fraction + args.test_fraction >= 1:
        errors.append("--val-fraction and --test-fraction must be >= 0 and sum to < 1")
    if errors:
        print("af-synth-audio: error: " + "; ".join(errors), file=sys.stderr)
        return 2

    out = Path(args.out)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    indices = range(args.num_clips)
    bar = None if args.quiet or tqdm is None else tqdm(total=args.num_clips, unit="clip", desc="synthesising")
    for i in indices:
        audio, labels = make_clip(
            i,
            seed=args.seed,
            sample_rate=args.sample_rate,
            clip_seconds=args.clip_seconds,
            multi_label_prob=args.multi_label_prob,
            channels=args.channels,
        )
        clip_id = f"synth{i:06d}"
        rel = Path("audio") / f"{clip_id}.wav"
        sf.write(str(out / rel), audio, args.sample_rate, subtype=args.subtype)
        split = split_of(i, args.val_fraction, args.test_fraction, args.seed)
        rows.append({"path": rel.as_posix(), "labels": ";".join(labels), "split": split, "id": clip_id})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    tmp = out / "labels.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "labels", "split", "id"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "labels.csv")
    (out / "vocabulary.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")

    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    multi = sum(";" in r["labels"] for r in rows)
    print(
        f"wrote {len(rows)} clips ({args.clip_seconds:g} s, {args.sample_rate} Hz, {args.channels} ch) to {out}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; {multi} multi-label; {len(CLASSES)} classes; labels in {out / 'labels.csv'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
