"""af-prepare throughput per device, EnCodec and mel-rvq: one row each, for ``make gpu-check``.

Every row is a real ``python -m af_train.prepare`` run (worker processes decoding, the bounded prefetch
queue, batches encoded on ``--device``, chunks committed) over the same generated data set, and reads its
numbers from af-prepare's own log: clips/s after the first clip (start-up left out), the real-time factor
(seconds of audio per second of wall time, after the first clip) and where the time went (decode =
waiting for the workers, tokenize, write). Clips/s over the whole run, start-up included, is recorded too.

Weights: EnCodec's official checkpoint when it is where af-prepare looks for it (torch hub's cache,
``af_train.tokenizers.encodec.resolve_checkpoint``), otherwise the random-init codec: the same
architecture and FLOPs, so the same throughput, but codes worth nothing (``weights`` says which). The
mel-rvq tokenizer gets random codebooks of the default shape (4 rows x 1024 codes x 64 mels), since its
encoding cost does not depend on the centroids and fitting needs faiss, which the GPU image lacks.
Audio: ``af-synth-audio`` clips (the GPU image has no eSpeak NG for ``af-synth-speech``; decoding and
encoding cost do not depend on what the audio says).

    python -m af_train_tools.benchmark_prepare --devices cuda --out prepare.json             # every GPU
    python -m af_train_tools.benchmark_prepare --devices cpu --clips 4 --clip-seconds 1 --batch-size 2 \
        --workers 1 --out /tmp/prepare.json                                                 # smoke run

The JSON (``{"meta": ..., "rows": [...]}``) is rewritten after every row, so a run stopped at its time
limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOKENIZERS = ("encodec", "mel-rvq")
SUMMARY_LINE = re.compile(
    r"rank 0 of 1: (?P<clips>\d+) clips in (?P<elapsed>[\d.]+) s \((?P<rate>[\d.]+) clips/s"
    r"(?:, (?P<steady>[\d.]+) clips/s after the first)?\); decode (?P<decode>[\d.]+) s, "
    r"tokenize (?P<tokenize>[\d.]+) s, write (?P<write>[\d.]+) s")
REALTIME = re.compile(r"(?P<x>[\d.]+)x realtime this run with")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark_prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="cuda",
                   help="'cuda' (one row pair per visible GPU), 'cpu', or a comma list such as cuda:0,cuda:1")
    p.add_argument("--clips", type=int, default=256, help="clips in the data set (default 256)")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="clip length (default 10, as AudioSet)")
    p.add_argument("--batch-size", type=int, default=64, help="af-prepare --batch-size (default 64)")
    p.add_argument("--workers", type=int, help="af-prepare --workers (default: af-prepare's own default)")
    p.add_argument("--tokenizers", nargs="+", choices=TOKENIZERS, default=list(TOKENIZERS))
    p.add_argument("--work-dir", help="where the data and the outputs go (default: a temporary folder, removed)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    return p


def _devices(spec: str) -> list[str]:
    import torch

    if spec == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("benchmark_prepare: error: --devices cuda but no GPU is visible; use --devices cpu")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [d.strip() for d in spec.split(",") if d.strip()]


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return platform.processor() or platform.machine()


def _encodec_weights() -> tuple[list[str], str]:
    """af-prepare's EnCodec arguments and how to label them: official weights when present."""
    from af_train.tokenizers.encodec import CodecWeightsError, resolve_checkpoint

    try:
        return ["--codec-checkpoint", str(resolve_checkpoint(None))], "official"
    except CodecWeightsError:
        return ["--codec-random-init", "0"], "random-init (official weights not found: throughput only)"


def _random_mel_rvq(path: Path) -> str:
    """A mel-rvq file with random codebooks of the default shape (encoding costs the same as a fitted one)."""
    import torch

    from af_train.tokenizers.mel_rvq import MelConfig, MelRVQTokenizer

    config = MelConfig()
    generator = torch.Generator().manual_seed(0)
    books = torch.randn(config.rows, config.codes, config.n_mels, generator=generator)
    tokenizer = MelRVQTokenizer(config, torch.zeros(config.n_mels, dtype=torch.float64),
                                torch.ones(config.n_mels, dtype=torch.float64), books,
                                {"random": "random codebooks for a throughput benchmark (not fitted)"})
    tokenizer.save(path)
    return "random codebooks (throughput only)"


def measure(device: str, tokenizer: str, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One af-prepare run; its row (``status`` "ok" or what went wrong, with the log's tail)."""
    if tokenizer == "encodec":
        token_args, weights = _encodec_weights()
        token_args = ["--tokenizer", "encodec", *token_args]
    else:
        file = work / "mel_rvq_random.safetensors"
        weights = _random_mel_rvq(file)
        token_args = ["--tokenizer", str(file)]
    out = work / f"out-{device.replace(':', '')}-{tokenizer}"
    command = [sys.executable, "-m", "af_train.prepare", "--format", "csv", "--input", str(data / "labels.csv"),
               "--labels", str(data / "vocabulary.txt"), "--out", str(out), "--overwrite", *token_args,
               "--device", device, "--clip-seconds", f"{args.clip_seconds:g}", "--batch-size", str(args.batch_size),
               "--chunk-size", str(max(args.clips, 1)), "--quiet"]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    row: dict[str, Any] = {"device": device, "device_name": _device_name(device), "tokenizer": tokenizer,
                           "weights": weights, "clips": args.clips, "clip_seconds": args.clip_seconds,
                           "batch_size": args.batch_size, "workers": args.workers}
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True)
    row["wall_s"] = round(time.monotonic() - started, 2)
    log = proc.stdout + proc.stderr
    summary, realtime = SUMMARY_LINE.search(log), REALTIME.search(log)
    if proc.returncode != 0 or summary is None or realtime is None:
        row.update(status=f"failed (exit {proc.returncode})", log_tail=log[-2000:])
        return row
    steady = summary["steady"]
    row.update(
        status="ok",
        clips_per_s=float(steady) if steady else None,  # after the first clip
        realtime_factor=float(realtime["x"]),  # seconds of audio per second, after the first clip
        clips_per_s_with_startup=round(int(summary["clips"]) / row["wall_s"], 3),
        decode_s=float(summary["decode"]), tokenize_s=float(summary["tokenize"]), write_s=float(summary["write"]),
    )
    return row


def _make_data(data: Path, clips: int, clip_seconds: float) -> None:
    from af_train_tools import make_synthetic_audio

    code = make_synthetic_audio.main(["--out", str(data), "--num-clips", str(clips), "--clip-seconds",
                                      f"{clip_seconds:g}", "--val-fraction", "0", "--test-fraction", "0", "--quiet"])
    if code:
        raise SystemExit(f"benchmark_prepare: error: af-synth-audio failed (exit {code})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.clips < 1 or args.clip_seconds <= 0 or args.batch_size < 1:
        raise SystemExit("benchmark_prepare: error: --clips, --clip-seconds and --batch-size must be positive")
    devices = _devices(args.devices)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"meta": {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                       "argv": sys.argv[1:] if argv is None else list(argv),
                                       "cpu_count": os.cpu_count(), "audio": "af-synth-audio"}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="af_bench_prepare_") as scratch:
        work = Path(args.work_dir) if args.work_dir else Path(scratch)
        data = work / "data"
        started = time.monotonic()
        if not (data / "labels.csv").is_file():
            _make_data(data, args.clips, args.clip_seconds)
        result["meta"]["data_seconds"] = round(time.monotonic() - started, 2)
        for device in devices:
            for tokenizer in args.tokenizers:
                row = measure(device, tokenizer, data, work, args)
                result["rows"].append(row)
                out.write_text(json.dumps(result, indent=2) + "\n")
                shown = (f"{row['clips_per_s']} clips/s, {row['realtime_factor']}x real time after the first clip; "
                         f"decode {row['decode_s']} s, tokenize {row['tokenize_s']} s, write {row['write_s']} s"
                         if row["status"] == "ok" else row["status"] + "\n" + row["log_tail"])
                print(f"af-prepare {tokenizer} on {device} ({row['device_name']}; {row['weights']}): {shown}",
                      flush=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
