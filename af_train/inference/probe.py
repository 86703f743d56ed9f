"""af-probe: what a (pretrained) encoder's frozen embeddings know about a labelled data set.

    af-probe MODEL DATA --out DIR [--kind knn|linear|both] [--layer N|best | --layers all|0,2,..]
             [--random-init [SEED] | --with-random-init [SEED]] [--max-clips N] [--shuffle-labels]
             [--checkpoint C | --weights W]

MODEL: a run directory (pretraining or fine-tuning; the checkpoint selected on validation unless
--checkpoint/--weights say otherwise), a model.pt (with --manifest when its recipe's shards are not
here) or an af-export-hf directory. DATA: a prepared data set with train/, val/ and test/ shard
directories written with the tokenizer the model was trained on.

Each probe (kNN, logistic regression) is fitted on DATA/train's embeddings, its setting (k, C) chosen
on DATA/val and DATA/test scored once (``af_train.probe`` has the protocol). DIR receives
``probe.json`` (one entry per kind and layer: the chosen setting, val numbers, test accuracy and mAP
with bootstrap 95 % intervals over test clips; with ``--layer best`` also the layer each kind chose
on val, ``chosen_layer``) and ``probe.md`` (the table, printed too), next to the
baselines on the same clips: the label prior, a bag of codes (logistic regression on code histograms,
all rows and the model's row alone) and chance.

Controls: ``--random-init [SEED]`` probes an encoder of the same configuration with random weights
(what the architecture gives without training) instead of MODEL; ``--with-random-init [SEED]`` probes
both on the same clips and adds the paired bootstrap interval of (MODEL − random init) per probe and
layer; ``--shuffle-labels`` permutes the train and val labels (a probe that reads labels, not audio,
lands at chance).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from af_train.files import atomic_write

if TYPE_CHECKING:
    import torch

    from af_train.probe import Framing, ProbeData, ProbeResult

# af_train.probe (and torch) are imported on first use, so that --help and argument errors stay instant

log = logging.getLogger(__name__)

FORMAT = "af_train.probe/1"
JSON_NAME, TABLE_NAME = "probe.json", "probe.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="af-probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run directory, a model.pt or an af-export-hf directory")
    parser.add_argument("data", help="prepared data set with train/, val/ and test/ shard directories")
    parser.add_argument("--out", required=True, help="folder for probe.json and probe.md")
    parser.add_argument("--kind", choices=["knn", "linear", "both"], default="both",  # af_train.probe.KINDS
                        help="which probes (default both)")
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--layer", type=_layer_choice,
                        help="hidden state to probe: 0 = embeddings, negative counts from the end (default: the last "
                             "layer); 'best': every layer, and the one with the best val accuracy (mAP) is chosen "
                             "(never on test)")
    layers.add_argument("--layers", help="'all' (embeddings and every layer) or a comma-separated list")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="a checkpoint directory of the run (default: the one selected on val)")
    weights.add_argument("--weights", help="a module weights file of the run (e.g. RUN/final/model.pt)")
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--random-init", type=int, nargs="?", const=0, metavar="SEED",
                         help="control: probe an encoder of MODEL's configuration with random weights instead "
                              "(seed, default 0)")
    control.add_argument("--with-random-init", type=int, nargs="?", const=0, metavar="SEED",
                         help="probe MODEL and a random-init encoder of its configuration (seed, default 0) and "
                              "report the paired difference")
    parser.add_argument("--manifest", help="shard directory (or manifest.json) MODEL was trained on, when its recipe "
                                           "names shards that are not here")
    parser.add_argument("--max-clips", type=int, help="at most this many clips per split (a seeded subset; "
                                                      "train.probe.max_clips picks the same one)")
    parser.add_argument("--shuffle-labels", action="store_true",
                        help="control: permute the train and val labels (seeded); the probe should land at chance")
    parser.add_argument("--seed", type=int, default=0, help="subset, shuffle and bootstrap seed (default 0)")
    parser.add_argument("--bootstrap-rounds", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="clips per encoder batch (default 64)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    if args.max_clips is not None and args.max_clips < 2:
        parser.error("--max-clips must be >= 2")
    if args.batch_size < 1 or args.bootstrap_rounds < 1:
        parser.error("--batch-size and --bootstrap-rounds must be >= 1")
    return args


def _layer_choice(value: str) -> int | str:
    if value.strip().lower() == "best":
        return "best"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a layer number or 'best', not {value!r}") from None


def requested_layers(args: argparse.Namespace, num_layers: int) -> list[int]:
    from af_train.probe import ProbeError, check_layers

    if args.layer == "best":
        return list(range(num_layers + 1))
    if args.layers is None:
        return check_layers([num_layers if args.layer is None else args.layer], num_layers)
    if args.layers.strip().lower() == "all":
        return list(range(num_layers + 1))
    try:
        return check_layers([int(v) for v in args.layers.split(",") if v.strip()], num_layers)
    except ValueError as exc:
        if isinstance(exc, ProbeError):
            raise
        raise ProbeError(f"--layers {args.layers!r}: give 'all' or layer numbers like 0,1,2") from None


def random_like(encoder: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A freshly initialised encoder of ``encoder``'s configuration (global RNG state left as it was)."""
    import torch

    from af_train.model import RoFormerEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RoFormerEncoder(copy.deepcopy(encoder.config), kernels=encoder.kernels).eval()


def _check_outputs(out: Path) -> None:
    """Refuse to replace files af-probe did not write (an earlier probe.json of ours may be replaced)."""
    from af_train.probe import ProbeError

    existing = out / JSON_NAME
    if existing.exists():
        try:
            ours = json.loads(existing.read_text(encoding="utf-8")).get("format") == FORMAT
        except (json.JSONDecodeError, OSError, AttributeError):
            ours = False
        if not ours:
            raise ProbeError(f"{existing} exists and was not written by af-probe; give another --out")
    elif (out / TABLE_NAME).exists():
        raise ProbeError(f"{out / TABLE_NAME} exists and was not written by af-probe; give another --out")


def baselines(data: ProbeData, code_row: int, rounds: int, seed: int) -> dict[str, Any]:
    """Label prior, bag of codes (all rows; ``code_row`` alone) on the test clips, fitted on train; chance."""
    from af_train.baselines import fit_bag_of_codes, label_prior_scores
    from af_train.probe import metrics_with_intervals

    single = not data.multi_label
    train, test = data.splits["train"], data.splits["test"]
    targets = data.targets("test")
    out: dict[str, Any] = {}
    prior = label_prior_scores(data.targets("train"), len(test))
    out["label_prior"] = metrics_with_intervals(prior, targets, single, rounds, seed)
    for name, rows in (("bag_of_codes", None), (f"bag_of_codes_row{code_row}", [code_row])):
        pick = (lambda codes: codes) if rows is None else (lambda codes, r=rows: [c[r] for c in codes])
        scores, _ = fit_bag_of_codes(pick(train.codes), train.labels, pick(test.codes), data.codebook_size,
                                     data.num_classes)
        out[name] = metrics_with_intervals(scores, targets, single, rounds, seed)
    out["chance_accuracy"] = 1.0 / data.num_classes if single else None
    return out


def _interval(cell: dict[str, float] | None) -> str:
    if not cell:
        return "n/a"
    return f"{cell['value']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def table(results: list[ProbeResult], base: dict[str, Any], single: bool) -> str:
    """Markdown: one row per probe and layer, then the baselines and chance."""
    head = ["probe", "layer", "chosen on val", "val accuracy" if single else "val mAP"]
    head += (["test accuracy [95% CI]"] if single else []) + ["test mAP [95% CI]"]
    rows = []
    for r in results:
        setting = ", ".join(f"{k}={v:g}" for k, v in r.setting.items())
        row = [r.kind, str(r.layer), setting, f"{r.val['accuracy' if single else 'mAP']:.3f}"]
        row += ([_interval(r.test.get("accuracy"))] if single else []) + [_interval(r.test.get("mAP"))]
        rows.append(row)
    for name in [k for k in base if k != "chance_accuracy"]:
        cells = base[name]
        rows.append([name.replace("_", " "), "", "", ""] + ([_interval(cells.get("accuracy"))] if single else [])
                    + [_interval(cells.get("mAP"))])
    if base.get("chance_accuracy") is not None:
        rows.append(["chance", "", "", "", f"{base['chance_accuracy']:.3f}", ""])
    widths = [max(len(str(x)) for x in column) for column in zip(head, *rows)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_table(results: list[ProbeResult], controls: list[ProbeResult], differences: list[dict[str, Any]],
                     single: bool) -> str:
    """Markdown: per probe and layer, the random-init control and the paired difference trained − random init."""
    metric = "accuracy" if single else "mAP"
    head = ["probe", "layer", f"test {metric}", f"random init test {metric}", "difference [95% CI, paired]"]
    rows = [[r.kind, str(r.layer), f"{r.test[metric]['value']:.3f}", _interval(c.test[metric]),
             f"{d[metric]['value']:+.3f} [{d[metric]['low']:+.3f}, {d[metric]['high']:+.3f}]"]
            for r, c, d in zip(results, controls, differences)]
    widths = [max(len(str(x)) for x in column) for column in zip(head, *rows)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def probe_all(encoder: torch.nn.Module, data: ProbeData, framing: Framing, layers: list[int], kinds: list[str],
              args: argparse.Namespace) -> list[ProbeResult]:
    """Every kind on every layer of ``encoder``'s embeddings of ``data``."""
    import torch

    from af_train.probe import embed_clips, fit_probe

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(device)
    features = {split: embed_clips(encoder, clips, framing, layers, batch_size=args.batch_size, device=device)
                for split, clips in data.splits.items()}
    return [fit_probe(kind, *((features[s][layer], data.targets(s)) for s in ("train", "val", "test")),
                      single_label=not data.multi_label, layer=layer, rounds=args.bootstrap_rounds, seed=args.seed)
            for kind in kinds for layer in layers]


def shuffle_labels(data: ProbeData, seed: int) -> None:
    """Control: permute the label lists of the train and val clips (test keeps its true labels)."""
    rng = np.random.default_rng([seed, 1])
    for split in ("train", "val"):
        clips = data.splits[split]
        clips.labels = [clips.labels[i] for i in rng.permutation(len(clips))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from af_train.inference.cli_common import stdout_to_stderr
    from af_train.inference.model import InferenceError, load_model
    from af_train.probe import KINDS, Framing, best_layer, load_probe_data, paired_difference
    from af_train.tokenizers.base import TokenizerError, check_same_tokenizer

    started = time.perf_counter()
    out = Path(args.out)
    _check_outputs(out)
    data = load_probe_data(args.data, max_clips=args.max_clips, seed=args.seed)
    with stdout_to_stderr():  # loading weights prints DeepSpeed's messages; the table goes to stdout
        loaded = load_model(args.model, checkpoint=args.checkpoint, weights=args.weights, manifest=args.manifest)
    encoder, card = loaded.encoder, loaded.card
    weights = "trained"
    if args.random_init is not None:
        encoder, weights = random_like(encoder, args.random_init), f"random init (seed {args.random_init})"
    layers = requested_layers(args, int(encoder.config.num_hidden_layers))
    try:
        check_same_tokenizer(card.tokenizer, data.tokenizer, f"the model '{loaded.source}'", f"the data '{args.data}'")
    except TokenizerError as exc:
        raise InferenceError(f"{exc}. Probe with data prepared by the model's tokenizer") from None
    if args.shuffle_labels:
        shuffle_labels(data, args.seed)
    framing = Framing(card.code_row, card.max_length, card.add_boa, card.add_eoa, card.dynamic_padding,
                      card.codebook_size)
    single = not data.multi_label
    kinds = list(KINDS) if args.kind == "both" else [args.kind]
    results = probe_all(encoder, data, framing, layers, kinds, args)
    controls, differences = [], []
    if args.with_random_init is not None:
        controls = probe_all(random_like(encoder, args.with_random_init), data, framing, layers, kinds, args)
        targets = data.targets("test")
        differences = [paired_difference(r.test_scores, c.test_scores, targets, single, args.bootstrap_rounds,
                                         args.seed) for r, c in zip(results, controls)]
    probed = time.perf_counter()
    base = baselines(data, card.code_row, args.bootstrap_rounds, args.seed)
    payload = {
        "format": FORMAT,
        "model": loaded.source, "weights": weights, "data": str(args.data),
        "clips": {split: len(clips) for split, clips in data.splits.items()}, "max_clips": args.max_clips,
        "classes": data.labels, "multi_label": data.multi_label, "code_row": card.code_row, "layers": layers,
        "shuffled_labels": bool(args.shuffle_labels),
        "protocol": "fit on train, setting chosen on val (accuracy, or mAP for multi-label data), test scored once; "
                    "features: mean-pooled hidden state of the layer (0 = embeddings)",
        "bootstrap": {"rounds": args.bootstrap_rounds, "seed": args.seed, "confidence": 0.95, "over": "test clips"},
        "probes": [r.to_json() for r in results],
        "baselines": base,
        "seconds": {"probes": probed - started, "total": time.perf_counter() - started},
    }
    text = table(results, base, single)
    if args.layer == "best":  # chosen on val (best_layer reads no test number); test is the chosen layer's row
        chosen = {kind: best_layer([r for r in results if r.kind == kind], single).layer for kind in kinds}
        payload["chosen_layer"] = chosen
        text += "\nLayer chosen on val (--layer best): " + ", ".join(f"{k} {v}" for k, v in chosen.items()) + "\n"
    if controls:
        payload["random_init_control"] = {
            "seed": args.with_random_init,
            "probes": [dict(c.to_json(), difference=d) for c, d in zip(controls, differences)],
        }
        text += ("\nThe same probes on a random-init encoder of the same configuration (seed "
                 f"{args.with_random_init}), same clips; difference = trained − random init:\n\n"
                 + comparison_table(results, controls, differences, single))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / JSON_NAME, json.dumps(payload, indent=2) + "\n")
    heading = (f"af-probe: {loaded.source} ({weights}) on {args.data}: {payload['clips']} clips"
               + ("; LABELS SHUFFLED (control)" if args.shuffle_labels else ""))
    atomic_write(out / TABLE_NAME, f"{heading}\n\n{text}")
    print(f"{heading}\n\n{text}", flush=True)
    return payload


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from af_train.data.dataset import DataError
    from af_train.inference.model import InferenceError
    from af_train.probe import ProbeError
    from af_train.shards import ManifestError

    try:
        run(args)
    except (InferenceError, ProbeError, DataError, ManifestError) as exc:
        print(f"af-probe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
