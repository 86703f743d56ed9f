#!/usr/bin/env python3
"""Print what a prepared shard directory holds: the manifest, counts, and a few decoded samples.

    python tools/inspect_shards.py shards/            # every split below shards/
    python tools/inspect_shards.py shards/train -n 5  # one split, five samples

For each split: the codec and its weights identity, clip length, label vocabulary, the counts
written/rejected (by reason) and hours of audio, the shard files and samples actually found in
``index.json`` (checked against the manifest), the first rejects, and ``-n`` decoded samples
(id, labels by name, code shape, valid length and the first codes of each row).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from af_train.shards import MANIFEST_NAME, Manifest, ManifestError  # noqa: E402
from af_train.tokenizers import describe_identity  # noqa: E402


def find_split_dirs(root: Path) -> list[Path]:
    """``root`` itself when it holds a manifest, else its subfolders that do."""
    if (root / MANIFEST_NAME).is_file():
        return [root]
    return sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file()) if root.is_dir() else []


def inspect_split(directory: Path, num_samples: int, first_codes: int, out=None) -> dict:
    """Print one split (to ``out``, default stdout); returns the facts it printed (for tests and scripts)."""
    out = sys.stdout if out is None else out
    manifest = Manifest.load(directory)
    c = manifest.codec
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"== {directory}  (split '{manifest.split}', source format {manifest.source_format})")
    rate = f" {c.bandwidth:g} kbps" if c.bandwidth else ""  # (a fitted tokenizer has no bit rate)
    p(f"codec       {c.model}{rate}: {c.codebooks} codebooks × {c.codebook_size} at {c.frame_rate:g} Hz")
    p(f"weights     {c.weights}")
    p(f"tokenizer   {describe_identity(manifest.tokenizer)}")
    p(f"clips       {manifest.clip_seconds:g} s = {manifest.frames} frames; "
      f"{'multi-label' if manifest.multi_label else 'single-label'}, {manifest.num_classes} classes")
    shown = ", ".join(manifest.labels[:12]) + (", …" if manifest.num_classes > 12 else "")
    p(f"labels      {shown}")
    rejected = sum(manifest.rejected.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(manifest.rejected.items())) or "none"
    p(f"written     {manifest.written} clips, {manifest.seconds_of_audio / 3600:.3f} h of audio")
    p(f"rejected    {rejected} ({reasons})")

    index_path = directory / "index.json"
    shards = json.loads(index_path.read_text(encoding="utf-8"))["shards"] if index_path.is_file() else []
    in_index = sum(s["samples"] for s in shards)
    size = sum(s["raw_data"]["bytes"] for s in shards)
    p(f"shards      {len(shards)} files, {in_index} samples, {size / 2**20:.1f} MiB")
    if in_index != manifest.written:
        p(f"WARNING     index.json holds {in_index} samples but the manifest says {manifest.written} were written")

    log_path = directory / manifest.rejects_log if manifest.rejects_log else None
    if log_path is not None and log_path.is_file() and rejected:
        lines = [json.loads(x) for x in log_path.read_text(encoding="utf-8").splitlines() if x.strip()]
        p(f"rejects     {log_path} ({len(lines)} lines); first ones:")
        for r in lines[:5]:
            p(f"            {r['id']}: {r['reason']} ({r.get('detail', r['path'])})")

    samples = []
    if in_index and num_samples > 0:
        from streaming import LocalDataset

        dataset = LocalDataset(local=str(directory))
        for i in range(min(num_samples, len(dataset))):
            s = dataset[i]
            names = [manifest.labels[j] for j in s["labels"].tolist()]
            shape, length = tuple(s["codes"].shape), int(s["length"])
            samples.append({"id": s["id"], "labels": names, "shape": shape, "length": length})
            p(f"sample {i:<4} id={s['id']}  labels={names}  codes {shape} {s['codes'].dtype}, length {length}")
            for row, codes in enumerate(s["codes"]):
                p(f"            row {row}: {' '.join(str(int(v)) for v in codes[:first_codes])} …")
    p("")
    return {"manifest": manifest, "samples_in_index": in_index, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="af-inspect-shards", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a shard directory (or a folder of split directories)")
    parser.add_argument("-n", "--num-samples", type=int, default=3, help="samples to decode and print (default 3)")
    parser.add_argument("--first-codes", type=int, default=16, help="codes shown per row (default 16)")
    args = parser.parse_args(argv)
    root = Path(args.path)
    if not root.exists():
        print(f"af-inspect-shards: error: {root} does not exist", file=sys.stderr)
        return 2
    dirs = find_split_dirs(root)
    if not dirs:
        print(f"af-inspect-shards: error: no {MANIFEST_NAME} in {root} or its subfolders: not prepared shards "
              "(or the preparation has not finished; rerun af-prepare)", file=sys.stderr)
        return 2
    status = 0
    for d in dirs:
        try:
            facts = inspect_split(d, args.num_samples, args.first_codes)
        except ManifestError as exc:
            print(f"af-inspect-shards: error: {exc}", file=sys.stderr)
            status = 2
            continue
        if facts["samples_in_index"] != facts["manifest"].written:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
