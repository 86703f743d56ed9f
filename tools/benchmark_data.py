"""Measure the data pipeline: codec tokenization speed and DataLoader throughput.

Two measurements, printed as tables and optionally written as JSON (``--out``):

1. Tokenization real-time factor (RTF): seconds of audio encoded per second of wall time by each
   tokenizer of ``--tokenizers``: ``encodec`` (``af_train.tokenizers.encodec.AcousticCodec``,
   random-init weights: same network, same cost as the pretrained ones) and ``mel-rvq`` (the file of
   ``--mel-rvq``, or one fitted here on synthetic audio: the cost depends on the sizes, not on the
   data), with torch limited to ``--threads`` CPU threads (default 1: the figure per CPU core), and on
   the GPU when one is present. Paths: ``encode_batch`` (24 kHz mono, batched, the tokenizer alone)
   and, for EnCodec, ``encode`` (one 44.1 kHz stereo clip: downmix + resampling + model).
2. DataLoader samples/s per worker count (default 0, 1, 2) over synthetic shards shaped like AudioSet
   (4 codebooks x 750 frames, 10 s clips), with MLM masking on (the heaviest path), per-rank batch
   ``--batch-size``. Reported: time to the first batch and the steady rate after it.

Example: ``python tools/benchmark_data.py --out benchmarks/results/cpu/data.json``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from af_train.files import git_commit

SAMPLE_RATE = 24000


def _git_commit() -> str | None:
    commit = git_commit(Path(__file__).resolve().parent)["commit"]
    return commit[:7] if commit else None


def _timed_both(fn, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds of this process) of ``repeats`` calls after one warm-up call.

    On a shared machine the wall time also counts the time other processes held the core; the CPU
    time (with torch limited to one thread) is the cost per core itself.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return float(np.median(walls)), float(np.median(cpus))


def _build_tokenizer(kind: str, args: argparse.Namespace, device: str, work: Path):
    """The tokenizer measured for ``kind`` on ``device``."""
    if kind == "encodec":
        from af_train.tokenizers.encodec import AcousticCodec

        return AcousticCodec(bandwidth=args.bandwidth, random_init_seed=0, device=device)
    from af_train.tokenizers.mel_rvq import MelConfig, MelRVQFitter, MelRVQTokenizer

    path = Path(args.mel_rvq) if args.mel_rvq else work / "mel_rvq_benchmark.safetensors"
    if not path.is_file():  # sizes decide the cost; synthetic audio is enough to fit one
        from af_train_tools.make_synthetic_audio import make_clip

        fitter = MelRVQFitter(MelConfig(rows=args.mel_rows, codes=args.mel_codes, seed=0))
        for i in range(max(8, args.mel_codes // 40)):  # >= 75 frames per clip, > 1.8 frames per code
            fitter.add(make_clip(i, seed=0, sample_rate=SAMPLE_RATE, clip_seconds=1.0, multi_label_prob=0.0)[0][:, 0])
        fitter.fit({"source": "benchmark synthetic audio"}).save(path)
    return MelRVQTokenizer.load(path, device=device)


def benchmark_codec(args: argparse.Namespace) -> list[dict]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    rows = []
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="af_bench_tok_"))
    try:
        for kind in args.tokenizers:
            for device in devices:
                start = time.perf_counter()
                tokenizer = _build_tokenizer(kind, args, device, work)
                setup_s = time.perf_counter() - start
                seconds = args.clip_seconds
                common = {"tokenizer": kind, "device": device, "threads": torch.get_num_threads(), "clip_s": seconds,
                          "rows": tokenizer.num_rows, "codes": tokenizer.codebook_size, "setup_s": setup_s}
                for batch in args.codec_batches:
                    clips = rng.standard_normal((batch, int(seconds * SAMPLE_RATE))).astype(np.float32) * 0.1
                    wall, cpu = _timed_both(functools.partial(tokenizer.encode_batch, torch.from_numpy(clips)),
                                            args.repeats)
                    rows.append({"path": "encode_batch 24k mono", "batch": batch, "wall_s": wall,
                                 "rtf": batch * seconds / wall, "cpu_s": cpu, "rtf_cpu": batch * seconds / cpu,
                                 **common})
                if kind == "encodec":
                    stereo = torch.from_numpy(rng.standard_normal((2, int(seconds * 44100))).astype(np.float32) * 0.1)
                    wall, cpu = _timed_both(functools.partial(tokenizer.encode, stereo, 44100), args.repeats)
                    rows.append({"path": "encode 44.1k stereo", "batch": 1, "wall_s": wall, "rtf": seconds / wall,
                                 "cpu_s": cpu, "rtf_cpu": seconds / cpu, **common})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def write_synthetic_shards(out: Path, num_clips: int, frames: int, num_classes: int) -> None:
    """``num_clips`` full-length clips of random codes (4 rows x ``frames``), 1-3 of ``num_classes`` labels each."""
    from streaming import MDSWriter

    from af_train.shards import CodecInfo, Manifest, shard_columns

    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns=shard_columns(4, frames), size_limit=1 << 24) as writer:
        for i in range(num_clips):
            labels = np.sort(rng.choice(num_classes, size=int(rng.integers(1, 4)), replace=False)).astype(np.int32)
            writer.write({"id": f"clip{i:06d}", "codes": rng.integers(0, 1024, (4, frames), dtype=np.int16),
                          "length": np.int32(frames), "labels": labels})
    Manifest(codec=CodecInfo(weights="benchmark random codes"), clip_seconds=frames / 75.0, frames=frames,
             labels=[f"class{c}" for c in range(num_classes)], multi_label=True, source_format="csv",
             written=num_clips).save(out)


def benchmark_loader(args: argparse.Namespace) -> list[dict]:
    from af_train.config import DataConfig
    from af_train.data.loader import build_dataloader

    work = Path(tempfile.mkdtemp(prefix="af_bench_data_"))
    rows = []
    try:
        frames = int(round(args.clip_seconds * 75))
        write_synthetic_shards(work / "train", args.clips, frames, num_classes=527)
        cfg = DataConfig(train=str(work / "train"), max_length=frames + 2, code_rows=list(args.code_rows))
        for workers in args.workers:
            loader = build_dataloader(cfg, "train", args.batch_size, mask=True, seed=0, num_workers=workers)
            start = time.perf_counter()
            iterator = iter(loader)
            next(iterator)
            first_s = time.perf_counter() - start
            count, steady_start = 0, time.perf_counter()
            for batch in iterator:
                count += len(batch["ids"])
            steady_s = time.perf_counter() - steady_start
            del iterator
            loader.dataset.close()
            rows.append({"workers": workers, "batch": args.batch_size, "code_rows": len(args.code_rows),
                         "seq_len": frames + 2, "samples": count, "first_batch_s": first_s,
                         "samples_per_s": count / steady_s if steady_s > 0 else float("nan")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    cells = [[format(row[name], fmt) for name, fmt in columns] for row in rows]
    widths = [max([len(name)] + [len(r[i]) for r in cells]) for i, (name, _) in enumerate(columns)]
    print(f"\n{title}")
    header = "  ".join(f"{name:>{w}}" for (name, _), w in zip(columns, widths))
    print(header)
    print("-" * len(header))
    for r in cells:
        print("  ".join(f"{cell:>{w}}" for cell, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the tokenizers (default 1)")
    parser.add_argument("--tokenizers", nargs="+", default=["encodec", "mel-rvq"], choices=["encodec", "mel-rvq"],
                        help="tokenizers to measure (default both)")
    parser.add_argument("--bandwidth", type=float, default=3.0, help="encodec bandwidth (kbps)")
    parser.add_argument("--mel-rvq", help="a fitted mel-rvq file to measure (default: fit one of --mel-rows x "
                        "--mel-codes on synthetic audio)")
    parser.add_argument("--mel-rows", type=int, default=4)
    parser.add_argument("--mel-codes", type=int, default=1024)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--codec-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per codec measurement")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU codec measurement")
    parser.add_argument("--clips", type=int, default=2048, help="synthetic clips in the loader benchmark")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--code-rows", type=int, nargs="+", default=[0])
    parser.add_argument("--skip-codec", action="store_true")
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.batch_size < 1 or args.clips < args.batch_size:
        parser.error("--threads and --batch-size must be >= 1 and --clips >= --batch-size")
    torch.set_num_threads(args.threads)

    result: dict = {
        "commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": sys.version.split()[0],
                 "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "args": vars(args),
    }
    if not args.skip_codec:
        result["codec"] = benchmark_codec(args)
        _print_table(
            f"Tokenization (EnCodec {args.bandwidth:g} kbps random init, mel-rvq; rtf = audio s per wall s, "
            f"rtf_cpu = per CPU s of this process; "
            f"CPU threads = {args.threads})",
            result["codec"],
            [("tokenizer", "s"), ("path", "s"), ("device", "s"), ("threads", "d"), ("rows", "d"), ("codes", "d"),
             ("batch", "d"), ("clip_s", ".1f"), ("wall_s", ".3f"), ("rtf", ".1f"), ("cpu_s", ".3f"),
             ("rtf_cpu", ".1f"), ("setup_s", ".1f")],
        )
    if not args.skip_loader:
        result["loader"] = benchmark_loader(args)
        _print_table(
            f"DataLoader (MLM masking, {args.clips} clips of {args.clip_seconds:g} s, rows {args.code_rows})",
            result["loader"],
            [("workers", "d"), ("batch", "d"), ("seq_len", "d"), ("samples", "d"), ("first_batch_s", ".2f"),
             ("samples_per_s", ".0f")],
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
