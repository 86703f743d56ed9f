#!/usr/bin/env python3
"""Make a realistic held-out-speaker speech data set offline: spoken words from many synthetic voices.

    af-synth-speech --out data/speech [--train-speakers 40 --val-speakers 10 --test-speakers 10]
                    [--repeats 2] [--words yes,no,...] [--clip-seconds 1.0] [--seed 0] [--workers 2]
                    [--words-per-clip 1]

The words are spoken by eSpeak NG (the ``espeakng-loader`` wheel ships the library and its voice data; no
download, no apt). Unlike the synthetic tones of ``af-synth-audio``, these classes are not separable by
any tokenizer: a model has to hear *which word* was said, by a voice it never heard in training.

Speakers. A speaker is one eSpeak voice (an English accent such as ``en-us``, ``en-GB-scotland``,
``en-029``, or a foreign-language voice reading the English word, i.e. an accent) combined with one
voice variant (``f3``, ``m2``, ``klatt4``, ``whisper``, ...: formants, pitch band, breathiness), plus
its own pitch, pitch range and speaking rate. Every (voice, variant) pair belongs to at most one
speaker, and every speaker to exactly one split: **train, val and test speakers are disjoint**, so the
test split measures generalisation to unseen voices. ``speakers.csv`` lists every speaker with its
split and settings. Each speaker says every word ``--repeats`` times (small pitch/rate jitter per take),
so the classes are exactly balanced in every split.

Multi-label (``--words-per-clip K``, K >= 2): every clip holds K different words of one speaker, one
in each of K equal slots of the clip (at a random offset inside its slot, each at its own level), and
is labelled with all K (``labels`` ``yes;up``). In each take a speaker says every word exactly once,
in clips of K words drawn by a seeded shuffle: K must divide the number of words, every word still
occurs ``--repeats`` times per speaker, so the classes stay balanced in every split; which words share
a clip changes from take to take and speaker to speaker.

Recording conditions, drawn per clip: the word starts at a random offset in the clip; an optional
small room (exponentially decaying noise reverb) and an optional band limit (high-pass / low-pass);
background noise (white, pink or brown) at 10-30 dB SNR; a peak level between -25 and -3 dBFS.

Determinism. eSpeak NG seeds its noise generator from the clock and carries hidden state from one
utterance to the next (the same call gives slightly different samples the second time in a process).
So the noise generator is seeded before every utterance, and every speaker is rendered in a fresh
worker process, its words in a fixed order: the same seed gives identical files whatever
``--workers`` is. Files are written atomically (temporary name, then rename).

Output in ``--out``:
    audio/<split>/<speaker>/<word>_<take>.wav     mono PCM_16 at --sample-rate (several words: w1+w2_<take>.wav)
    train.csv, val.csv, test.csv                  header ``path,labels`` (af-prepare --format csv)
    labels.csv                                    header ``path,labels,split``: all splits in one file
    vocabulary.txt                                the words, one per line (af-prepare --labels)
    speakers.csv                                  speaker, split, voice, variant, pitch, range, rate
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import soundfile as sf

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is an install requirement
    tqdm = None

# The ten keywords of Speech Commands: short, common, and several pairs that differ in one sound.
WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]

# English accents shipped with eSpeak NG (voice file names, case as in espeak-ng-data/lang).
ENGLISH_VOICES = ["en", "en-US", "en-029", "en-GB-scotland", "en-GB-x-gbclan", "en-GB-x-gbcwmd", "en-GB-x-rp",
                  "en-US-nyc"]
# Foreign-language voices reading the English word with their own letter-to-sound rules: accented English.
ACCENT_VOICES = ["de", "nl", "fr", "es", "it", "pt-BR", "sv", "pl", "af"]
ACCENT_SHARE = 0.25  # share of speakers with a foreign-language voice

SPLITS = ("train", "val", "test")
ESPEAK_RATE, ESPEAK_PITCH, ESPEAK_RANGE = 1, 3, 4  # espeak_PARAMETER values (speak_lib.h)
ESPEAK_SAMPLE_RATE = 22050


class SpeechSynthesisError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------
# eSpeak NG through ctypes
# --------------------------------------------------------------------------------------------------


def espeak_paths() -> tuple[str, Path]:
    """(library path, espeak-ng-data folder) of the ``espeakng-loader`` wheel."""
    try:
        import espeakng_loader
    except ImportError as exc:
        raise SpeechSynthesisError("af-synth-speech needs the espeakng-loader wheel: python3 -m pip install "
                                   "-c constraints.txt espeakng-loader (or reinstall af_train)") from exc
    return espeakng_loader.get_library_path(), Path(espeakng_loader.get_data_path())


def check_voices(voices: list[str]) -> None:
    """Every voice must be a file under ``espeak-ng-data/lang`` (eSpeak would silently keep the previous voice)."""
    _, data = espeak_paths()
    present = {p.name.lower() for p in (data / "lang").rglob("*") if p.is_file()}
    missing = [v for v in voices if v.lower() not in present]
    if missing:
        raise SpeechSynthesisError(f"eSpeak voices {', '.join(missing)} are not in {data / 'lang'}")


def available_variants() -> list[str]:
    """Names of the voice variants in the wheel's data (``espeak-ng-data/voices/!v``), sorted."""
    _, data = espeak_paths()
    folder = data / "voices" / "!v"
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not names:
        raise SpeechSynthesisError(f"no voice variants in {folder}: the espeakng-loader install is incomplete; "
                                   "reinstall it")
    return names


_ENGINE_IN_PROCESS = False  # eSpeak state carries over between utterances: one engine per process, used once


class Espeak:
    """Synchronous eSpeak NG: ``say(text, voice, rate, pitch, pitch_range) -> int16 samples at 22,050 Hz``.

    Only one per process, because the library is a process-wide singleton whose hidden state makes
    output depend on everything said before in the process (see the module docstring).
    """

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        global _ENGINE_IN_PROCESS
        if _ENGINE_IN_PROCESS:
            raise SpeechSynthesisError("eSpeak was already used in this process; its output would depend on what "
                                       "it said before. Render each speaker in a fresh process (render_speakers).")
        _ENGINE_IN_PROCESS = True
        library, data = espeak_paths()
        self._lib = ctypes.CDLL(library)
        self._lib.espeak_ng_InitializePath(str(data).encode())
        # The compiled-in data path points at the wheel's build machine: name the folder explicitly.
        rate = self._lib.espeak_Initialize(2, 0, str(data.parent).encode(), 0)  # 2: AUDIO_OUTPUT_SYNCHRONOUS
        if rate != ESPEAK_SAMPLE_RATE:
            raise SpeechSynthesisError(f"espeak_Initialize returned {rate} (expected {ESPEAK_SAMPLE_RATE} Hz): "
                                       f"the voice data in {data} did not load")
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # kept alive on self: the library holds the pointer
        self._lib.espeak_SetSynthCallback(self._callback)
        self._variants = set(available_variants())

    def _collect(self, samples, count: int, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0: continue synthesis

    def say(self, text: str, voice: str, variant: str, rate: int, pitch: int, pitch_range: int,
            noise_seed: int) -> np.ndarray:
        # A misspelled variant silently falls back to the plain voice: check the name first.
        if variant not in self._variants:
            raise SpeechSynthesisError(f"voice variant {variant!r} is not in the espeak-ng data; known: "
                                       f"{', '.join(sorted(self._variants))}")
        if self._lib.espeak_SetVoiceByName(f"{voice}+{variant}".encode()) != 0:
            raise SpeechSynthesisError(f"eSpeak has no voice {voice!r} (voice names: the files under "
                                       "espeak-ng-data/lang, e.g. en-US, en-GB-scotland, de)")
        for parameter, value in ((ESPEAK_RATE, rate), (ESPEAK_PITCH, pitch), (ESPEAK_RANGE, pitch_range)):
            self._lib.espeak_SetParameter(parameter, int(value), 0)
        # espeak_Initialize seeds the generator of breath/frication noise from the clock: seed it ourselves.
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(noise_seed))
        self._chunks.clear()
        encoded = text.encode("utf-8") + b"\0"
        # position 0, POS_CHARACTER, no end, espeakCHARS_AUTO, no id, no user data
        status = self._lib.espeak_Synth(encoded, len(encoded), 0, 1, 0, 0, None, None)
        self._lib.espeak_Synchronize()
        if status != 0:
            raise SpeechSynthesisError(f"espeak_Synth({text!r}, voice {voice}+{variant}) failed with status {status}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)


# --------------------------------------------------------------------------------------------------
# Speakers and their split
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speaker:
    speaker: str  # id, e.g. spk007
    split: str
    voice: str
    variant: str
    pitch: int  # eSpeak 0-99 (50 = the voice's own)
    pitch_range: int  # eSpeak 0-99 (0 = monotone)
    rate: int  # words per minute


def plan_speakers(seed: int, counts: dict[str, int], variants: list[str]) -> list[Speaker]:
    """Speakers with distinct (voice, variant) pairs; the first ``counts['train']`` go to train, and so on."""
    total = sum(counts.values())
    check_voices(ENGLISH_VOICES + ACCENT_VOICES)
    rng = np.random.default_rng([seed, 0x5EED])
    english = [(v, x) for v in ENGLISH_VOICES for x in variants]
    accent = [(v, x) for v in ACCENT_VOICES for x in variants]
    num_accent = int(round(ACCENT_SHARE * total))
    if total - num_accent > len(english) or num_accent > len(accent):
        raise SpeechSynthesisError(f"{total} speakers asked for; this eSpeak data has {len(english)} English and "
                                   f"{len(accent)} accented (voice, variant) pairs")
    pairs = [english[i] for i in rng.choice(len(english), total - num_accent, replace=False)]
    pairs += [accent[i] for i in rng.choice(len(accent), num_accent, replace=False)]
    pairs = [pairs[i] for i in rng.permutation(total)]  # accents spread over the splits
    speakers = []
    split_of = [split for split in SPLITS for _ in range(counts[split])]
    for index, ((voice, variant), split) in enumerate(zip(pairs, split_of)):
        speakers.append(Speaker(f"spk{index:03d}", split, voice, variant, pitch=int(rng.integers(15, 86)),
                                pitch_range=int(rng.integers(20, 91)), rate=int(rng.integers(120, 211))))
    return speakers


# --------------------------------------------------------------------------------------------------
# Recording conditions
# --------------------------------------------------------------------------------------------------


def trim_silence(samples: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Cut the leading and trailing near-silence eSpeak pads an utterance with."""
    level = np.abs(samples.astype(np.float64))
    loud = np.flatnonzero(level > threshold * max(level.max(), 1e-9))
    return samples[loud[0]: loud[-1] + 1] if loud.size else samples[:0]


def coloured_noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white, pink (1/f) or brown (1/f^2) noise."""
    white = rng.standard_normal(n)
    if colour != "white":
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n)
        freqs[0] = freqs[1] if n > 1 else 1.0
        spectrum /= freqs ** (0.5 if colour == "pink" else 1.0)
        white = np.fft.irfft(spectrum, n=n)
    return white / (np.sqrt(np.mean(white ** 2)) + 1e-12)


def record(word: np.ndarray, sample_rate: int, clip_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Place ``word`` (float, at ``sample_rate``) in a clip under random recording conditions; float32 in [-1, 1]."""
    x = word.astype(np.float64)
    x /= np.abs(x).max() + 1e-12
    x = _room_and_line(x, sample_rate, rng)
    clip = np.zeros(clip_samples)
    x = x[:clip_samples]
    offset = int(rng.integers(0, clip_samples - x.size + 1))
    clip[offset: offset + x.size] = x
    return _noise_and_level(clip, np.sqrt(np.mean(x ** 2)) + 1e-12, rng)


def record_words(words: list[np.ndarray], sample_rate: int, clip_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Several words in one clip, word i at a random offset inside the i-th of ``len(words)`` equal slots, each
    at its own level (0.5-1 of full scale), then the room, line, noise and level of one recording."""
    slot = clip_samples // len(words)
    track = np.zeros(clip_samples)
    for index, word in enumerate(words):
        x = word.astype(np.float64)[:slot]
        x = x / (np.abs(x).max() + 1e-12) * rng.uniform(0.5, 1.0)
        offset = index * slot + int(rng.integers(0, slot - x.size + 1))
        track[offset: offset + x.size] = x
    active = np.abs(track) > 1e-6
    speech_rms = np.sqrt(np.mean(track[active] ** 2)) + 1e-12 if active.any() else 1e-12
    track = _room_and_line(track, sample_rate, rng)[:clip_samples]
    return _noise_and_level(track, speech_rms, rng)


def _room_and_line(x: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Optionally a small room and a band-limited line (each with probability 1/2)."""
    from scipy import signal

    if rng.random() < 0.5:  # a small room: exponentially decaying noise tail, mixed in
        rt60 = rng.uniform(0.1, 0.5)
        t = np.arange(int(rt60 * sample_rate)) / sample_rate
        impulse = rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60)
        impulse[0] = 0.0
        wet = signal.fftconvolve(x, impulse)[: x.size]
        x = x + rng.uniform(0.1, 0.4) * wet / (np.abs(wet).max() + 1e-12)
    if rng.random() < 0.5:  # a band-limited microphone or line
        high = rng.uniform(60.0, 300.0)
        low = min(rng.uniform(2500.0, 7000.0), 0.45 * sample_rate)
        x = signal.sosfilt(signal.butter(2, [high, low], btype="bandpass", fs=sample_rate, output="sos"), x)
    return x


def _noise_and_level(clip: np.ndarray, speech_rms: float, rng: np.random.Generator) -> np.ndarray:
    """Background noise at 10-30 dB SNR below ``speech_rms``, then a peak level of -25 to -3 dBFS; float32."""
    clip_samples = clip.size
    snr_db = rng.uniform(10.0, 30.0)
    clip += coloured_noise(clip_samples, str(rng.choice(["white", "pink", "brown"])), rng) * speech_rms \
        * 10 ** (-snr_db / 20)
    peak_db = rng.uniform(-25.0, -3.0)
    return (clip / (np.abs(clip).max() + 1e-12) * 10 ** (peak_db / 20)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Rendering (one fresh process per speaker)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderJob:
    index: int  # the speaker's position in plan_speakers' list: its random streams derive from it
    speaker: Speaker
    words: tuple[str, ...]
    repeats: int
    seed: int
    sample_rate: int
    clip_seconds: float
    out: str
    words_per_clip: int = 1


def clip_path(speaker: Speaker, word: str, take: int) -> str:
    return f"audio/{speaker.split}/{speaker.speaker}/{word}_{take}.wav"


def clip_groups(job: RenderJob, take: int) -> list[tuple[int, ...]]:
    """The word indices of each clip of one take: every word once, ``words_per_clip`` to a clip (a seeded
    shuffle per speaker and take; in the words' order for one word per clip)."""
    count = len(job.words)
    if job.words_per_clip == 1:
        return [(i,) for i in range(count)]
    order = np.random.default_rng([job.seed, job.index, 0x3A17, take]).permutation(count)
    k = job.words_per_clip
    return [tuple(int(i) for i in sorted(order[j: j + k])) for j in range(0, count, k)]


def render_speaker(job: RenderJob) -> list[dict[str, str]]:
    """Every word of one speaker, ``repeats`` takes each; writes the wavs and returns their CSV rows.

    Must run in a process that has not used eSpeak before (``render_speakers`` sees to it).
    """
    from scipy import signal

    engine = Espeak()
    s = job.speaker
    clip_samples = int(round(job.clip_seconds * job.sample_rate))
    room = clip_samples // job.words_per_clip  # each word must fit its slot

    def speak(word: str, rng: np.random.Generator) -> np.ndarray:
        rate = s.rate * rng.uniform(0.92, 1.08)
        pitch = int(np.clip(s.pitch + rng.integers(-5, 6), 0, 99))
        for _ in range(12):  # a slow voice may not fit the clip: speak faster until it does
            raw = trim_silence(engine.say(word, s.voice, s.variant, int(rate), pitch, s.pitch_range,
                                         noise_seed=int(rng.integers(1, 2**31))))
            audio = signal.resample_poly(raw.astype(np.float64) / 32768.0, job.sample_rate, ESPEAK_SAMPLE_RATE)
            if audio.size <= 0.9 * room:
                break
            rate *= 1.15
        if raw.size == 0:
            raise SpeechSynthesisError(f"eSpeak produced no sound for {word!r} with voice {s.voice}+{s.variant}")
        return audio[:room]

    rows = []
    takes = [(take, group) for take in range(job.repeats) for group in clip_groups(job, take)]
    if job.words_per_clip == 1:  # word by word, then take by take (the order of the single-word files)
        takes.sort(key=lambda item: item[1])
    for take, group in takes:
        if job.words_per_clip == 1:
            (word_index,) = group
            rng = np.random.default_rng([job.seed, job.index, word_index, take])
            clip = record(speak(job.words[word_index], rng), job.sample_rate, clip_samples, rng)
        else:
            rng = np.random.default_rng([job.seed, job.index, 0x3A17, take, *group])
            clip = record_words([speak(job.words[i], rng) for i in group], job.sample_rate, clip_samples, rng)
        rel = clip_path(s, "+".join(job.words[i] for i in group), take)
        target = Path(job.out) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.wav")
        sf.write(str(tmp), clip, job.sample_rate, subtype="PCM_16")
        os.replace(tmp, target)  # atomic: a concurrent or killed run never leaves half a file
        rows.append({"path": rel, "labels": ";".join(job.words[i] for i in group), "split": s.split})
    return rows


def _render_numbered(numbered: tuple[int, RenderJob]) -> tuple[int, list[dict[str, str]]]:
    return numbered[0], render_speaker(numbered[1])


def render_speakers(jobs: list[RenderJob], workers: int, progress: bool = True) -> list[dict[str, str]]:
    """Render every job, each in a fresh process (deterministic whatever ``workers`` is); rows in job order."""
    if _ENGINE_IN_PROCESS:  # a forked worker would inherit the engine's state
        raise SpeechSynthesisError("render_speakers must run in a process that has not used eSpeak")
    # fork: cheap, and the workers stay children of this process (their CPU time is accounted to it);
    # maxtasksperchild=1: a new process for every speaker.
    context = multiprocessing.get_context("fork")
    results: dict[int, list[dict[str, str]]] = {}
    total = sum(len(j.words) // j.words_per_clip * j.repeats for j in jobs)
    bar = tqdm(total=total, unit="clip", desc="speaking", disable=not progress) if tqdm is not None else None
    pool = context.Pool(processes=max(1, workers), maxtasksperchild=1)
    try:
        for index, rows in pool.imap_unordered(_render_numbered, list(enumerate(jobs))):
            results[index] = rows
            if bar is not None:
                bar.update(len(rows))
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        if bar is not None:
            bar.close()
    return [row for i in range(len(jobs)) for row in results[i]]


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="af-synth-speech",
        description="Write a spoken-word data set (many synthetic voices, speakers disjoint between "
                    "train/val/test) as wav files + one CSV per split, offline.",
        epilog="Speakers: distinct eSpeak NG (voice, variant) pairs with their own pitch and rate; see speakers.csv.")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--words", default=",".join(WORDS), help=f"comma-separated words, one class each (default: "
                                                            f"{','.join(WORDS)})")
    p.add_argument("--train-speakers", type=int, default=40)
    p.add_argument("--val-speakers", type=int, default=10)
    p.add_argument("--test-speakers", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="takes of every word per speaker (default 2)")
    p.add_argument("--clip-seconds", type=float, default=1.0, help="clip duration (default 1.0)")
    p.add_argument("--words-per-clip", type=int, default=1,
                   help="words in every clip (default 1: single-label); 2 or more make a multi-label set (labels "
                        "'yes;up'), each word in its own slot of the clip; must divide the number of words")
    p.add_argument("--sample-rate", type=int, default=16000, help="sample rate of the files (default 16000)")
    p.add_argument("--seed", type=int, default=0, help="everything derives from this seed (default 0)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel processes (default: up to 4); the output does not depend on it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    words = [w.strip() for w in args.words.split(",") if w.strip()]
    counts = {"train": args.train_speakers, "val": args.val_speakers, "test": args.test_speakers}
    errors = []
    if len(words) < 2 or len(set(words)) != len(words):
        errors.append("--words needs at least two distinct words")
    if any(c in w for w in words for c in ";,\"\n"):
        errors.append("--words: a word may not contain ';', ',' or quotes")
    if counts["train"] < 1 or counts["val"] < 0 or counts["test"] < 0:
        errors.append("--train-speakers must be >= 1, --val-speakers and --test-speakers >= 0")
    if args.repeats < 1:
        errors.append("--repeats must be >= 1")
    if not 0.3 <= args.clip_seconds <= 30:
        errors.append("--clip-seconds must be between 0.3 and 30 (a word takes about 0.3-0.7 s)")
    if args.words_per_clip < 1 or (words and len(words) % args.words_per_clip):
        errors.append(f"--words-per-clip {args.words_per_clip} must be >= 1 and divide the number of words "
                      f"({len(words)}), so that every word is said equally often")
    elif args.clip_seconds / args.words_per_clip < 0.3:
        errors.append(f"--clip-seconds {args.clip_seconds:g} leaves less than 0.3 s for each of "
                      f"{args.words_per_clip} words; give at least {0.3 * args.words_per_clip:g}")
    if args.sample_rate < 8000:
        errors.append("--sample-rate must be >= 8000")
    if errors:
        print("af-synth-speech: error: " + "; ".join(errors), file=sys.stderr)
        return 2
    try:
        speakers = plan_speakers(args.seed, counts, available_variants())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        jobs = [RenderJob(i, s, tuple(words), args.repeats, args.seed, args.sample_rate, args.clip_seconds, str(out),
                          args.words_per_clip) for i, s in enumerate(speakers)]
        rows = render_speakers(jobs, args.workers, progress=not args.quiet)
    except SpeechSynthesisError as exc:
        print(f"af-synth-speech: error: {exc}", file=sys.stderr)
        return 1
    for split in SPLITS:
        write_csv(out / f"{split}.csv", ["path", "labels"], [r for r in rows if r["split"] == split])
    write_csv(out / "labels.csv", ["path", "labels", "split"], rows)
    write_csv(out / "speakers.csv", [f.name for f in fields(Speaker)], [asdict(s) for i, s in enumerate(speakers)])
    (out / "vocabulary.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    per_split = {split: sum(r["split"] == split for r in rows) for split in SPLITS}
    kind = "" if args.words_per_clip == 1 else f", {args.words_per_clip} words each (multi-label)"
    print(f"wrote {len(rows)} clips ({args.clip_seconds:g} s, {args.sample_rate} Hz{kind}) of {len(words)} words to "
          f"{out}: "
          + ", ".join(f"{split} {per_split[split]} ({counts[split]} speakers)" for split in SPLITS)
          + f"; speakers disjoint between splits (speakers.csv); labels in {out / 'labels.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
