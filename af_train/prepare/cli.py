"""``af-prepare``: turn an audio data set into code MDS shards + ``manifest.json`` (one directory per split).

    af-prepare --format csv --input data/labels.csv --out shards/ --tokenizer mel_rvq.safetensors \
        --clip-seconds 2 --workers 4

(``python3 -m af_train.prepare`` is the same command.) The sources (``--format``) are described in
:mod:`af_train.prepare.sources`. The tokenizer is ``--tokenizer encodec`` (the default: EnCodec's
official weights; ``--codec-random-init SEED`` only for plumbing tests) or a file fitted with
``af-fit-tokenizer``; its identity goes into every manifest.

How it works: the clip list is planned deterministically from the label file
(:mod:`~af_train.prepare.planning`), cut into chunks of ``--chunk-size`` clips; worker processes
decode/resample (:mod:`~af_train.prepare.decoding`) up to ``--prefetch-batches`` batches ahead while the
main process encodes equal-length batches with the tokenizer (GPU when present,
:mod:`~af_train.prepare.encoding`) and writes each chunk atomically (:mod:`~af_train.prepare.writing`);
last, every split is merged and summarized (:mod:`~af_train.prepare.merging`).
An interrupted run (Ctrl-C, kill -9) rerun with the same arguments skips the committed chunks and
redoes the partial one, so every accepted clip ends up in the shards exactly once. Every refused clip
(missing, unreadable, silent, shorter than ``--min-seconds``, unknown label, ...) is logged with its
reason and counted.

Long recordings: by default a file gives one clip, its first ``--clip-seconds``. ``--segment`` cuts
every file into consecutive clips ``FILE#k`` starting every ``--segment-hop`` seconds (default: the clip
length), each with the file's labels; a last clip with less than ``--min-seconds`` of audio is refused
as ``short_remainder``. Only the headers are read while planning and each clip is decoded on its own
(seek + read), so memory does not grow with the file's length.

Object storage: ``--out s3://bucket/prefix`` (endpoint and credentials from the AWS environment,
``S3_ENDPOINT_URL`` for MinIO/Ceph) works the same way in a local staging folder and uploads each
committed chunk, then the merged index and the manifest last; the bucket is the resume state
(:mod:`~af_train.prepare.remote_output`). Each shard's sha1 and xxh64 go into ``index.json``.

Several ranks (:mod:`~af_train.prepare.parts`, :mod:`~af_train.prepare.ranks`): ``--num_cpu_ranks N``,
``--num_gpus N`` or ``--hostfile`` start the DeepSpeed launcher as ``af-train`` does (``torchrun`` and ``srun``
environments work too). Chunk ``k`` of a split belongs to rank ``k mod world_size``; each rank encodes its
own chunks on its own device into the shared output, and rank 0 merges them once every rank is done. A rerun
with another number of ranks re-plans only the chunks not yet committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from af_train import distributed
from af_train.files import output_problem, sha256_files
from af_train.launcher import (
    add_launcher_arguments,
    check_launcher_arguments,
    nested_launch_problem,
    start_launcher,
    wants_launcher,
)
from af_train.prepare.decoding import DEFAULT_PREFETCH_BATCHES
from af_train.prepare.encoding import encode_part
from af_train.prepare.merging import merge_and_report
from af_train.prepare.parts import PART_RULE, PrepareRefused
from af_train.prepare.planning import add_segment_arguments, plan_splits, segment_hop_problem, segment_tasks
from af_train.prepare.ranks import establish_outputs, wait_for_all_ranks
from af_train.prepare.remote_output import RemoteOutput
from af_train.prepare.sources import (
    DEFAULT_CLIP_SECONDS,
    LabelFileError,
    add_source_arguments,
    check_split_name,
    load_source,
)
from af_train.prepare.writing import codec_info, split_dirs
from af_train.tokenizers import SAMPLE_RATE, Tokenizer, TokenizerError, audio_io, frames_for_samples

log = logging.getLogger(__name__)

PREPARE_VERSION = 3  # 2: tokenizer identity and --min-seconds in the resume fingerprint; 3: last batch zero-padded
DEFAULT_MIN_SECONDS = 0.25


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="af-prepare",
        description="Encode an audio data set into code MDS shards with a tokenizer (resumable; rerun the same "
        "command after an interruption).",
    )
    add_source_arguments(p)
    p.add_argument("--out", required=True, help="output directory or object-store URL (s3://bucket/prefix; "
                   "endpoint and credentials from the AWS environment); one subfolder per split when there are several")
    p.add_argument("--tokenizer", default="encodec",
                   help="'encodec' (official EnCodec weights, default) or a mel-rvq file fitted with af-fit-tokenizer")
    codec = p.add_mutually_exclusive_group()
    codec.add_argument("--codec-checkpoint", help="--tokenizer encodec: checkpoint file (default: torch hub cache)")
    codec.add_argument(
        "--codec-random-init", type=int, metavar="SEED",
        help="--tokenizer encodec: random codec from SEED (plumbing tests only: its codes carry little information)",
    )
    p.add_argument("--bandwidth", type=float, default=3.0,
                   help="--tokenizer encodec: kbps 1.5/3/6/12/24 → 2/4/8/16/32 codebooks")
    p.add_argument("--device", help="tokenizer device (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int,
                   help="decoding processes per rank; 0 decodes in the main process (default: the rank's share "
                   "of the CPU cores minus one, at most 8, at least 1 with one rank per machine)")
    p.add_argument("--threads", type=int,
                   help="torch threads for encoding on the CPU (default: the rank's share of the CPU cores minus "
                   "--workers, at least 1)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per tokenizer batch")
    p.add_argument("--prefetch-batches", type=int, default=DEFAULT_PREFETCH_BATCHES, metavar="N",
                   help="batches the decoding workers prepare ahead while a batch is encoded (default "
                   f"{DEFAULT_PREFETCH_BATCHES}): decoded audio in memory is bounded by (N + 1) x --batch-size clips; "
                   "0 decodes a clip only when the encoder asks for it (no overlap)")
    p.add_argument("--decode-timeout", type=float, default=600.0,
                   help="seconds a worker may spend on one file before it is rejected (default 600)")
    p.add_argument("--chunk-size", type=int, default=1024, help="clips per committed chunk (the resume unit)")
    p.add_argument("--min-seconds", type=float, default=DEFAULT_MIN_SECONDS,
                   help=f"reject files with less audio than this (reason too_short; default {DEFAULT_MIN_SECONDS})")
    add_segment_arguments(p)
    p.add_argument("--silence-threshold-db", type=float, default=audio_io.DEFAULT_SILENCE_DBFS,
                   help="reject clips whose peak is below this level in dBFS (default -80)")
    p.add_argument("--keep-silent", action="store_true", help="keep all-silent clips")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier output in --out and start over")
    p.add_argument("--staging-dir", help="with --out s3://...: local working folder (default: under "
                   "~/.cache/af_train); it holds about one chunk of shards at a time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    ranks = p.add_argument_group("several ranks (as af-train: the DeepSpeed launcher; torchrun and srun work too)")
    add_launcher_arguments(ranks)
    ranks.add_argument("--wait-hours", type=float, default=72.0,
                       help="how long a rank that has finished its part waits for the others (default 72)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's
    return p


def _validate_args(args: argparse.Namespace) -> None:
    if args.workers is not None and args.workers < 0:
        raise SystemExit("af-prepare: error: --workers must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("af-prepare: error: --threads must be >= 1")
    if args.batch_size < 1 or args.chunk_size < 1:
        raise SystemExit("af-prepare: error: --batch-size and --chunk-size must be >= 1")
    if args.prefetch_batches < 0:
        raise SystemExit("af-prepare: error: --prefetch-batches must be >= 0")
    if args.clip_seconds is not None and args.clip_seconds <= 0:
        raise SystemExit("af-prepare: error: --clip-seconds must be > 0")
    if args.min_seconds < 0:
        raise SystemExit("af-prepare: error: --min-seconds must be >= 0")
    clip_seconds = args.clip_seconds or DEFAULT_CLIP_SECONDS[args.format]
    if args.min_seconds > clip_seconds:
        raise SystemExit(f"af-prepare: error: --min-seconds {args.min_seconds:g} is longer than the clip "
                         f"({clip_seconds:g} s, --clip-seconds)")
    if problem := segment_hop_problem(args.segment, args.segment_hop, clip_seconds):
        raise SystemExit(f"af-prepare: error: {problem}")
    if not Path(args.input).exists():
        raise SystemExit(f"af-prepare: error: --input {args.input} does not exist")
    from af_train.remote import is_remote

    if not is_remote(args.out) and (problem := output_problem(args.out, folder=True)):  # a bucket: checked later
        raise SystemExit(f"af-prepare: error: {problem}")
    if args.tokenizer != "encodec" and (args.codec_checkpoint is not None or args.codec_random_init is not None):
        raise SystemExit("af-prepare: error: --codec-checkpoint and --codec-random-init choose EnCodec weights; "
                         f"they do not apply to --tokenizer {args.tokenizer}")
    check_split_name(args.split, "--split")


def build_tokenizer(args: argparse.Namespace) -> Tokenizer:
    """The tokenizer the arguments name; raises TokenizerError / ValueError with the fix."""
    if args.tokenizer == "encodec":
        from af_train.tokenizers.encodec import AcousticCodec

        return AcousticCodec(bandwidth=args.bandwidth, checkpoint=args.codec_checkpoint,
                             random_init_seed=args.codec_random_init, device=args.device)
    from af_train.tokenizers import load_tokenizer

    return load_tokenizer(args.tokenizer, device=args.device)


def _segment_plans(plans: dict, clip_seconds: float, hop_seconds: float,
                   min_seconds: float) -> tuple[dict, dict[str, Any]]:
    """--segment: every split's files → their clips, and the record for the fingerprint and manifest.

    ``plan_sha256`` hashes every clip (id, file, start): a rerun over files whose lengths changed plans
    other clips and chunk boundaries, so it is refused instead of resumed into duplicates.
    """
    count = sum(len(tasks) for tasks, _ in plans.values())
    log.info("--segment: reading the headers of %d files", count)
    segmented, digest = {}, hashlib.sha256()
    for split, (tasks, rejects) in plans.items():
        clips, dropped = segment_tasks(tasks, clip_seconds=clip_seconds, hop_seconds=hop_seconds,
                                       min_seconds=min_seconds)
        segmented[split] = (clips, rejects + dropped)
        for t in clips:
            digest.update(json.dumps([split, t.id, t.path, t.start_frame]).encode() + b"\n")
    return segmented, {"hop_seconds": hop_seconds, "plan_sha256": digest.hexdigest()[:16]}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        placement = distributed.launch_placement()
    except ValueError as exc:
        parser.error(str(exc))
    if wants_launcher(args):
        if problem := nested_launch_problem(placement):
            parser.error(problem)
        _validate_args(args)
        check_launcher_arguments(parser, args)
        return start_launcher("af-prepare", "af_train.prepare", argv)
    _validate_args(args)
    import torch

    cores = distributed.cores_per_rank(placement.local_world_size)
    if args.workers is None:
        args.workers = min(8, max(1 if placement.local_world_size == 1 else 0, cores - 1))
    if args.device is None and placement.world_size > 1 and torch.cuda.is_available():
        args.device = f"cuda:{placement.local_rank % torch.cuda.device_count()}"  # each rank its own GPU
    # Oversubscribed CPUs (encoder threads + decoding workers + anything else) make torch's
    # intra-op threads spin against each other: 10x slower encoding was seen on a busy 2-core box.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or max(1, cores - args.workers))
    try:
        distributed.init_from_environment(placement, args.wait_hours * 3600)
    except ValueError as exc:
        print(f"af-prepare: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, placement)
    finally:
        torch.set_num_threads(threads_before)
        distributed.shutdown()


def _run(args: argparse.Namespace, placement: distributed.LaunchPlacement | None = None) -> int:
    placement = placement or distributed.LaunchPlacement(0, 1, 0, 1, "none")
    rank, world = placement.rank, placement.world_size
    try:
        source = load_source(args)
    except LabelFileError as exc:
        print(f"af-prepare: error: {exc}", file=sys.stderr)
        return 2
    clip_seconds = args.clip_seconds or DEFAULT_CLIP_SECONDS[args.format]
    plans = plan_splits(source)
    segment = None
    if args.segment:
        plans, segment = _segment_plans(plans, clip_seconds, args.segment_hop or clip_seconds, args.min_seconds)

    try:
        tokenizer = build_tokenizer(args)
    except (TokenizerError, ValueError) as exc:
        print(f"af-prepare: error: {exc}", file=sys.stderr)
        return 2
    identity = tokenizer.identity()
    frames = frames_for_samples(audio_io.clip_length(clip_seconds, SAMPLE_RATE))
    silence = None if args.keep_silent else args.silence_threshold_db
    fingerprint = {
        "version": PREPARE_VERSION,
        "format": args.format,
        "input": str(Path(args.input).resolve()),
        "audio_dir": str(Path(args.audio_dir).resolve()) if args.audio_dir else None,
        "label_files_sha256": sha256_files([f for f in source.label_files if f.is_file()])[:16],
        "clip_seconds": clip_seconds,
        "codec": asdict(codec_info(tokenizer)),
        "tokenizer": identity,
        "silence_threshold_db": silence,
        "min_seconds": args.min_seconds,
        "multi_label": source.multi_label,
        "chunk_size": args.chunk_size,
        "batch_size": args.batch_size,
        "val_fold": args.val_fold if args.format == "esc50" else None,
        "test_fold": args.test_fold if args.format == "esc50" else None,
    }
    if segment is not None:  # only then: without --segment the state and manifest stay as they were
        fingerprint["segment"] = segment
    from af_train.remote import is_remote

    remote_out = None
    if is_remote(args.out):
        staging = Path(args.staging_dir) if args.staging_dir else RemoteOutput.default_staging(args.out)
        if world > 1:  # each rank stages its own chunks (nodes may share a home folder)
            staging = staging / f"rank-{rank:05d}"
        remote_out = RemoteOutput(args.out, staging)
        logging.getLogger("botocore").setLevel(logging.WARNING)  # not one line per credential lookup
        log.info("writing to %s through the staging folder %s", args.out, staging)
    out = remote_out.staging if remote_out else Path(args.out)
    dirs = split_dirs(out, list(plans), source.split_folders)
    shown = {split: remote_out.remote_for(d).url if remote_out else str(d) for split, d in dirs.items()}
    log.info("%s: %s → %s (%s)%s", args.format, source.description, args.out, tokenizer,
             f" [rank {rank} of {world}]" if world > 1 else "")
    try:
        states = establish_outputs(rank, world, args.overwrite, remote_out, dirs, fingerprint, shown)
    except PrepareRefused as exc:
        print(exc, file=sys.stderr)
        return 2

    manifest_base = {
        "codec": codec_info(tokenizer),
        "tokenizer": identity,
        "clip_seconds": clip_seconds,
        "frames": frames,
        "labels": source.vocabulary,
        "multi_label": source.multi_label,
        "source_format": args.format,
        "extra": {"source": source.description, "part_rule": PART_RULE,
                  "prepare": {k: v for k, v in fingerprint.items() if k not in ("codec", "tokenizer")}},
    }

    part = encode_part(args, plans, states, dirs, tokenizer, clip_seconds, silence, frames, remote_out, rank, world)

    def merge() -> int:
        if remote_out and world > 1:  # the other ranks' chunks: their bookkeeping from the bucket
            for split, d in dirs.items():
                if states[split] != "complete":
                    remote_out.pull(d, overwrite=False)
        return merge_and_report(part, plans, states, dirs, shown, manifest_base, tokenizer, args.workers,
                                args.chunk_size, remote_out)

    others_failed = 0
    if world > 1:  # every rank waits here for the slowest part; then rank 0 alone merges
        own = part.exit_code
        others_failed = wait_for_all_ranks(rank, world, own, part.timings)
        if not (own or others_failed):
            with distributed.ranks_leave_together(world):  # the others wait for rank 0's merge
                return merge() if rank == 0 else 0
    if part.interrupted:
        print("\ninterrupted: committed chunks are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    if part.upload_error is not None:
        print(f"af-prepare: error: {part.upload_error}\ncommitted chunks are kept; rerun the same command to continue",
              file=sys.stderr)
        return 1
    if others_failed:
        return others_failed
    return merge()


if __name__ == "__main__":
    sys.exit(main())
