"""Inference throughput: files/s and x real time of AudioTagger (tokenizer + model) for a model preset.

    python3 tools/benchmark_inference.py --preset tiny --files 4 --seconds 10 [--device cpu] [--batch-size 16]
        [--encode-batch-size 4]

The model is untrained (throughput does not depend on the weights) and the tokenizer is the
random-initialised EnCodec (the same network as the official one, so the same cost); clips are the
training clip length (10 s, ``data.max_length`` 752), each file ``--seconds`` long, so a file longer
than a clip is cut into windows with the default hop (half a clip). Prints one JSON line: wall-clock
files/s and x real time, and x real time per CPU second of this process (meaningful on a shared
machine where wall-clock time includes waiting for the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def build_model(folder: Path, preset: str, clip_seconds: float, max_length: int, batch: int) -> Path:
    """An untrained FT1 model.pt of ``preset`` and the manifest of (imaginary) shards beside it."""
    from af_train.config import Recipe
    from af_train.model.checkpoint import save_module_weights
    from af_train.objectives import build_training_module
    from af_train.shards import CodecInfo, Manifest
    from af_train.tokenizers.encodec import encodec_identity

    labels = [f"class_{i}" for i in range(527)]
    manifest = Manifest(codec=CodecInfo(weights="random-init seed 0"), clip_seconds=clip_seconds,
                        frames=round(clip_seconds * 75), labels=labels, multi_label=True, source_format="csv",
                        tokenizer=encodec_identity(3.0, "random-init seed 0"),
                        extra={"prepare": {"batch_size": batch}})
    shards = folder / "shards"
    shards.mkdir(parents=True)
    manifest.save(shards)
    recipe = Recipe.from_dict({"model": {"preset": preset}, "objective": {"mode": "ft1"},
                               "data": {"train": str(shards), "max_length": max_length}})
    module = build_training_module(recipe, len(labels), True)
    return save_module_weights(module, folder / "model.pt", recipe.to_dict(), len(labels), True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base", "large"])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each file")
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="training clip length")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per model batch")
    parser.add_argument("--encode-batch-size", type=int, default=4,
                        help="af-prepare's --batch-size recorded in the manifest: clips per tokenizer batch")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from af_train.inference import AudioTagger

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        weights = build_model(Path(tmp), args.preset, args.clip_seconds, round(args.clip_seconds * 75) + 2,
                              args.encode_batch_size)
        tagger = AudioTagger.load(weights, device=device, batch_size=args.batch_size)
        rng = np.random.default_rng(0)
        waves = [(rng.standard_normal(int(args.seconds * 24000)).astype(np.float32) * 0.1, 24000)
                 for _ in range(args.files)]
        list(tagger.results(waves[:1]))  # warm-up (kernels, caches)
        encode = tagger._encode
        spent = {"tokenizer": 0.0}

        def timed(clips):
            started = time.perf_counter()
            out = encode(clips)
            spent["tokenizer"] += time.perf_counter() - started
            return out

        tagger._encode = timed
        started, cpu_started = time.perf_counter(), time.process_time()
        results = list(tagger.results(waves))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    report = {
        "preset": args.preset, "device": str(tagger.device), "threads": torch.get_num_threads(),
        "files": args.files, "file_seconds": args.seconds, "encode_batch": tagger.encode_batch_size,
        "windows": int(sum(len(r.windows) for r in results)),
        "files_per_s": args.files / elapsed, "x_realtime": args.files * args.seconds / elapsed,
        "tokenizer_share": spent["tokenizer"] / elapsed,
        # CPU seconds of this process per second of audio: what the hardware costs on a shared machine
        "x_realtime_per_cpu_second": args.files * args.seconds / cpu,
        "parameters": sum(p.numel() for p in tagger.encoder.parameters()),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
