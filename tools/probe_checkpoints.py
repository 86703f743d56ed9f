"""Probe every saved checkpoint of a pretraining run: the probe curve with test intervals, per kind and layer.

    python3 tools/probe_checkpoints.py RUN DATA --out FILE.json [--kind knn|linear|both] [--max-clips N]
                                       [--random-init-seed S] [--bootstrap-rounds R] [--steps 100,200]

RUN must have been trained with ``train.save_weights_every_checkpoint=true`` (each
``checkpoints/step_*/model.pt``) and a ``train.keep_last`` large enough to keep them; ``final/model.pt``
is probed too. For each checkpoint, each probe kind and each layer (0 = embeddings .. L), the probe is
fitted on DATA/train, its setting chosen on DATA/val and DATA/test scored (af_train.probe, the protocol
of af-probe), with the paired bootstrap difference against a random-init encoder of the same
configuration (the "step 0" of the curve). Nothing here chooses anything on test: the table reports it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, model.pt) of every checkpoint that holds consolidated weights, and final/model.pt, by step."""
    found = []
    for directory in sorted((run / "checkpoints").glob("step_*")):
        match = re.fullmatch(r"step_(\d+)", directory.name)
        if match and (directory / "model.pt").is_file():
            found.append((int(match.group(1)), directory / "model.pt"))
    final = run / "final" / "model.pt"
    if final.is_file():
        steps = json.loads((run / "final" / "metrics.json").read_text()).get("step") if (
            run / "final" / "metrics.json").is_file() else None
        if steps is None or all(step != steps for step, _ in found):
            found.append((int(steps) if steps is not None else 10**9, final))
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--kind", choices=["knn", "linear", "both"], default="both")
    parser.add_argument("--max-clips", type=int)
    parser.add_argument("--random-init-seed", type=int, default=0)
    parser.add_argument("--bootstrap-rounds", type=int, default=1000)
    parser.add_argument("--steps", help="comma-separated steps to probe (default: every checkpoint found)")
    args = parser.parse_args(argv)

    import torch

    from af_train.inference.model import load_model
    from af_train.inference.probe import random_like
    from af_train.probe import KINDS, Framing, embed_clips, fit_probe, load_probe_data, paired_difference

    torch.set_num_threads(1)
    run = Path(args.run)
    data = load_probe_data(args.data, max_clips=args.max_clips)
    single = not data.multi_label
    kinds = list(KINDS) if args.kind == "both" else [args.kind]
    targets = {split: data.targets(split) for split in data.splits}
    found = checkpoints(run)
    if args.steps:
        wanted = {int(v) for v in args.steps.split(",")}
        found = [(step, path) for step, path in found if step in wanted]
    if not found:
        print(f"{run} has no checkpoints/step_*/model.pt nor final/model.pt", file=sys.stderr)
        return 2

    def probe(encoder: torch.nn.Module, framing: Framing) -> dict[tuple[str, int], object]:
        layers = list(range(int(encoder.config.num_hidden_layers) + 1))
        features = {split: embed_clips(encoder, clips, framing, layers) for split, clips in data.splits.items()}
        return {(kind, layer): fit_probe(kind, *((features[s][layer], targets[s]) for s in ("train", "val", "test")),
                                         single_label=single, layer=layer, rounds=args.bootstrap_rounds)
                for kind in kinds for layer in layers}

    rows = []
    control = None
    for step, weights in found:
        loaded = load_model(run, weights=weights)
        card = loaded.card
        framing = Framing(card.code_row, card.max_length, card.add_boa, card.add_eoa, card.dynamic_padding,
                          card.codebook_size)
        if control is None:
            control = probe(random_like(loaded.encoder, args.random_init_seed), framing)
            for (kind, layer), result in control.items():
                rows.append({"step": "random-init", "kind": kind, "layer": layer, **result.to_json()})
        for (kind, layer), result in probe(loaded.encoder.eval(), framing).items():
            difference = paired_difference(result.test_scores, control[kind, layer].test_scores, targets["test"],
                                           single, args.bootstrap_rounds)
            rows.append({"step": step, **result.to_json(), "difference_vs_random_init": difference})
            metric = "accuracy" if single else "mAP"
            t, d = result.test[metric], difference[metric]
            print(f"step {step:>6} {kind:6} layer {layer}: val {result.val[metric]:.3f}  test {t['value']:.3f} "
                  f"[{t['low']:.3f}, {t['high']:.3f}]  - random init {d['value']:+.3f} [{d['low']:+.3f}, "
                  f"{d['high']:+.3f}]", flush=True)
    out = {"run": str(run), "data": str(args.data), "clips": {s: len(c) for s, c in data.splits.items()},
           "random_init_seed": args.random_init_seed, "bootstrap_rounds": args.bootstrap_rounds, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
