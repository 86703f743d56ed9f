"""``af-fit-tokenizer``: fit a mel-rvq tokenizer on the training split of a data set.

    af-fit-tokenizer --kind mel-rvq --format esc50 --input ESC-50/ --out esc50_mel_rvq.safetensors \
        [--rows 4 --codes 1024 --seed 0 --max-hours H --segment [--segment-hop S]]

(``python3 -m af_train.prepare.fit_tokenizer`` is the same command.) It reads the same sources with the
same options as ``af-prepare`` and only ever looks at their ``train`` split: a tokenizer fitted on
validation or test audio would have seen the data it is evaluated on, so asking for another split is
refused. Clips are decoded exactly as ``af-prepare`` decodes them (same clip length, silence and
``--min-seconds`` rules); their real samples feed :class:`~af_train.tokenizers.mel_rvq.MelRVQFitter`.
As in af-prepare, a file gives its first clip; with ``--segment`` it gives every clip ``af-prepare
--segment`` cuts from it, so a tokenizer for long recordings is fitted on all of them, not on their
starts. With ``--max-hours`` a seeded random subset of the training clips is used. The result is one
``.safetensors`` file; pass it to ``af-prepare --tokenizer FILE``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from af_train.files import output_problem, sha256_files
from af_train.prepare.cli import DEFAULT_MIN_SECONDS
from af_train.prepare.decoding import DecodeSettings, decode, ordered_map, start_pool
from af_train.prepare.planning import add_segment_arguments, plan_splits, segment_hop_problem, segment_tasks
from af_train.prepare.sources import DEFAULT_CLIP_SECONDS, LabelFileError, add_source_arguments, load_source
from af_train.tokenizers import SAMPLE_RATE, TokenizerError, audio_io

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"


class FitRefused(ValueError):
    """The request would fit a tokenizer on something other than the training split."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="af-fit-tokenizer",
        description="Fit a tokenizer (mel-rvq: residual k-means over log-mel frames) on the training split of "
        "a data set, for af-prepare --tokenizer FILE.",
    )
    p.add_argument("--kind", default="mel-rvq", choices=["mel-rvq"], help="tokenizer kind to fit")
    add_source_arguments(p)
    p.add_argument("--out", required=True, help="the fitted tokenizer file to write (.safetensors)")
    p.add_argument("--rows", type=int, default=4, help="residual code rows (default 4)")
    p.add_argument("--codes", type=int, default=1024, help="codes per row (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip subset and of k-means (default 0)")
    p.add_argument("--max-hours", type=float, help="use at most this much training audio (a seeded random subset)")
    add_segment_arguments(p)
    p.add_argument("--min-seconds", type=float, default=DEFAULT_MIN_SECONDS,
                   help=f"skip files with less audio than this (reason too_short; default {DEFAULT_MIN_SECONDS})")
    p.add_argument("--silence-threshold-db", type=float, default=audio_io.DEFAULT_SILENCE_DBFS,
                   help="skip clips whose peak is below this level in dBFS (default -80)")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)),
                   help="decoding processes; 0 decodes in the main process")
    p.add_argument("--threads", type=int, help="torch/faiss threads (default: CPU cores minus --workers, at least 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def training_tasks(args: argparse.Namespace):
    """The planned tasks of the source's training split; refuses any other split."""
    source = load_source(args)
    plans = plan_splits(source)
    if not source.split_folders and args.split != TRAIN_SPLIT:
        raise FitRefused(
            f"--split {args.split}: a tokenizer is fitted on the training split only (fitting it on validation "
            "or test audio would leak them into the codes); point --input at the training clips with --split train"
        )
    if TRAIN_SPLIT not in plans:
        raise FitRefused(
            f"{source.description} has no '{TRAIN_SPLIT}' split (splits: {', '.join(plans) or 'none'}); a tokenizer "
            "is fitted on the training split only"
        )
    tasks, rejects = plans[TRAIN_SPLIT]
    return source, tasks, rejects


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.workers < 0 or (args.threads is not None and args.threads < 1):
        raise SystemExit("af-fit-tokenizer: error: --workers must be >= 0 and --threads >= 1")
    if args.max_hours is not None and args.max_hours <= 0:
        raise SystemExit("af-fit-tokenizer: error: --max-hours must be > 0")
    clip_seconds = args.clip_seconds or DEFAULT_CLIP_SECONDS[args.format]
    if problem := segment_hop_problem(args.segment, args.segment_hop, clip_seconds):
        raise SystemExit(f"af-fit-tokenizer: error: {problem}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"af-fit-tokenizer: error: {out} exists; shards prepared with it would no longer match "
                         "its identity if it changed. Choose another --out, or pass --overwrite")
    if not Path(args.input).exists():
        raise SystemExit(f"af-fit-tokenizer: error: --input {args.input} does not exist")
    if problem := output_problem(out, overwrite=args.overwrite, inputs=[args.input]):  # before the whole fit
        raise SystemExit(f"af-fit-tokenizer: error: {problem}")
    import faiss
    import torch

    threads = args.threads or max(1, (os.cpu_count() or 1) - args.workers)
    threads_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    try:
        return _run(args)
    except (LabelFileError, FitRefused, TokenizerError) as exc:
        print(f"af-fit-tokenizer: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before[0])
        faiss.omp_set_num_threads(threads_before[1])


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from af_train.tokenizers.mel_rvq import MelConfig, MelRVQFitter

    source, tasks, planned_rejects = training_tasks(args)
    clip_seconds = args.clip_seconds or DEFAULT_CLIP_SECONDS[args.format]
    hop_seconds = (args.segment_hop or clip_seconds) if args.segment else None
    if hop_seconds is not None:  # the clips af-prepare --segment makes: every part of a long recording, not its start
        log.info("--segment: reading the headers of %d files", len(tasks))
        tasks, dropped = segment_tasks(tasks, clip_seconds=clip_seconds, hop_seconds=hop_seconds,
                                       min_seconds=args.min_seconds)
        planned_rejects = planned_rejects + dropped
    order = np.random.default_rng([args.seed, 0xF17]).permutation(len(tasks))
    tasks = [tasks[i] for i in order]  # a --max-hours budget then samples the whole split, not its first rows
    budget = args.max_hours * 3600 if args.max_hours else None
    fitter = MelRVQFitter(MelConfig(rows=args.rows, codes=args.codes, seed=args.seed))
    settings = DecodeSettings(sample_rate=SAMPLE_RATE, clip_seconds=clip_seconds,
                              silence_dbfs=args.silence_threshold_db, min_seconds=args.min_seconds)
    log.info("fitting mel-rvq (%d rows x %d codes, seed %d) on the %s split of %s: %d clips%s", args.rows,
             args.codes, args.seed, TRAIN_SPLIT, source.description, len(tasks),
             f", at most {args.max_hours:g} h" if budget else "")
    rejected: dict[str, int] = {}
    for r in planned_rejects:
        rejected[r.reason] = rejected.get(r.reason, 0) + 1
    pool = start_pool(args.workers)
    bar = tqdm(total=len(tasks), unit="clip", desc="reading train", disable=args.quiet, smoothing=0.1)
    started = time.monotonic()
    try:
        for task, (status, payload) in ordered_map(functools.partial(decode, settings), iter(tasks), pool,
                                                   max_in_flight=max(4, 4 * max(args.workers, 1))):
            if status == "reject":
                reason, detail = payload
                rejected[reason] = rejected.get(reason, 0) + 1
                if sum(rejected.values()) <= 10:
                    bar.write(f"skipped {task.id}: {reason} ({detail})")
            else:
                samples, valid, _ = payload
                fitter.add(samples[:valid])
            elapsed = max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"{fitter.seconds / 3600:.2f} h, {fitter.seconds / elapsed:.0f}x realtime",
                                refresh=False)
            bar.update(1)
            if budget is not None and fitter.seconds >= budget:
                break
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    read_seconds = time.monotonic() - started
    description = {
        "source_format": args.format,
        "source": source.description,
        "label_files_sha256": sha256_files([f for f in source.label_files if f.is_file()])[:16],
        "clip_seconds": clip_seconds,
        "min_seconds": args.min_seconds,
        "max_hours": args.max_hours,
        **({"segment_hop_seconds": hop_seconds} if hop_seconds is not None else {}),
        "rejected": dict(sorted(rejected.items())),
    }
    tokenizer = fitter.fit(description, device="cpu", progress=not args.quiet)
    sha = tokenizer.save(args.out)
    total = time.monotonic() - started
    print(f"\nfitted mel-rvq on {fitter.clips} training clips ({fitter.seconds / 3600:.3f} h, {fitter.frames_seen} "
          f"frames; skipped {sum(rejected.values())}: {rejected or 'none'})")
    print(f"fit time: {total:.1f} s (reading + log-mel {read_seconds:.1f} s, k-means {fitter.kmeans_seconds:.1f} s "
          f"on {fitter.capacity if fitter.frames_seen > fitter.capacity else fitter.frames_seen} frames)")
    print(f"wrote {args.out} (sha256 {sha}); use it with: af-prepare ... --tokenizer {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
