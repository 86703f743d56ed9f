#!/usr/bin/env python3
"""Does the pipeline learn from real information? Spoken words, held-out speakers, two tokenizers.

    python3 tools/realistic_check.py [--out runs/realistic_check] [--plan] [--num-gpus 0]

One run, everything measured side by side on the same audio:

1. ``synth``: af-synth-speech, 10 spoken words; 60 training speakers, 10 validation and 20 test
   speakers, all disjoint (chance accuracy 0.10).
2. Two tokenizations of it: ``mel-rvq`` (af-fit-tokenizer on the training split only, then
   af-prepare ``--tokenizer FILE``) and the random-initialised EnCodec (af-prepare
   ``--codec-random-init 0``: what af_train used before mel-rvq whenever the official weights were absent).
3. Per tokenizer, the unchanged tiny recipes: MLM pretraining on code row 0, then FT1 from it
   (checkpoint selected on val/mAP), then af-evaluate on the test speakers.
4. Per tokenizer, two baselines on the same test clips: the label prior (chance) and a bag of codes
   (logistic regression on each clip's code histograms, tools/demo_eval.py).

Results: ``OUT/results.md`` and ``OUT/results.json``. Rerunning reuses finished stages (the demo's
stage machinery). The README's "Does it learn from real information?" section quotes one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make af_train and the sibling modules importable
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import demo  # noqa: I001
    import demo_eval
    import demo_stages as st
else:
    from . import demo, demo_eval
    from . import demo_stages as st

RECIPES = REPO / "recipes"
TOKENIZERS = ("mel-rvq", "encodec-random")


def build_plan(out: Path, args: argparse.Namespace, ranks: list[str]) -> list[st.Stage]:
    audio = out / "audio"
    labels, vocabulary = audio / "labels.csv", audio / "vocabulary.txt"
    stages = [st.Stage(
        "synth", f"spoken words: {args.train_speakers}/{args.val_speakers}/{args.test_speakers} disjoint speakers",
        ["af-synth-speech", "--out", str(audio), "--train-speakers", str(args.train_speakers),
         "--val-speakers", str(args.val_speakers), "--test-speakers", str(args.test_speakers),
         "--repeats", str(args.repeats), "--clip-seconds", f"{args.clip_seconds:g}", "--seed", str(args.seed),
         "--workers", str(args.workers)],
        outputs=[labels, vocabulary], owned=[audio])]
    prepare_common = ["af-prepare", "--format", "csv", "--input", str(labels), "--labels", str(vocabulary),
                      "--clip-seconds", f"{args.clip_seconds:g}", "--single-label"]
    fitted = out / "mel_rvq.safetensors"
    stages.append(st.Stage(
        "fit_mel_rvq", "fit the mel-rvq tokenizer on the training split",
        ["af-fit-tokenizer", "--kind", "mel-rvq", "--format", "csv", "--input", str(labels), "--out", str(fitted),
         "--rows", "4", "--codes", str(args.codes), "--seed", str(args.seed)],
        outputs=[fitted], owned=[fitted], depends=["synth"]))
    for tokenizer in TOKENIZERS:
        shards = out / tokenizer / "shards"
        how = ["--tokenizer", str(fitted)] if tokenizer == "mel-rvq" else ["--codec-random-init", "0"]
        stages.append(st.Stage(
            f"prepare_{tokenizer}", f"tokenize with {tokenizer} into MDS shards",
            [*prepare_common, "--out", str(shards), *how],
            outputs=[shards / split / "manifest.json" for split in ("train", "val", "test")], owned=[shards],
            depends=["synth"] + (["fit_mel_rvq"] if tokenizer == "mel-rvq" else [])))
        data = [f"data.{split}={shards / split}" for split in ("train", "val", "test")]
        data.append(f"data.max_length={int(round(args.clip_seconds * 75)) + 2}")  # frames + BOA + EOA
        pretrain = out / tokenizer / "pretrain"
        every = max(1, args.pretrain_steps // 4)
        stages.append(st.Stage(
            f"pretrain_{tokenizer}", f"MLM pretraining on {tokenizer} code row 0 ({args.pretrain_steps} steps)",
            ["af-train", *ranks, "--recipe", demo._rel(RECIPES / "tiny_pretrain.yaml"),
             *[d for d in data if not d.startswith("data.test=")], f"train.run_dir={pretrain}",
             f"train.max_steps={args.pretrain_steps}", f"train.eval_every={every}", f"train.save_every={every}",
             f"optim.warmup_steps={max(1, args.pretrain_steps // 20)}"],
            outputs=[pretrain / "final" / "model.pt"], owned=[pretrain], depends=[f"prepare_{tokenizer}"],
            files=[RECIPES / "tiny_pretrain.yaml"]))
        ft1 = out / tokenizer / "ft1"
        stages.append(st.Stage(
            f"ft1_{tokenizer}", f"FT1 on {tokenizer} ({args.ft_steps} steps)",
            ["af-train", *ranks, "--recipe", demo._rel(RECIPES / "tiny_ft1.yaml"), *data,
             f"objective.init_checkpoint={pretrain / 'final' / 'model.pt'}", f"train.run_dir={ft1}",
             f"train.max_steps={args.ft_steps}", f"train.eval_every={args.eval_every}",
             f"train.save_every={args.eval_every}", f"optim.warmup_steps={max(1, args.ft_steps // 20)}"],
            outputs=[ft1 / "final" / "model.pt"], owned=[ft1], depends=[f"pretrain_{tokenizer}"],
            files=[RECIPES / "tiny_ft1.yaml"]))
        stages.append(st.Stage(
            f"evaluate_{tokenizer}", f"FT1 on {tokenizer}: the held-out test speakers",
            ["af-evaluate", str(ft1), "--split", "test", "--out", str(ft1 / "eval_test.json")],
            outputs=[ft1 / "eval_test.json"], owned=[ft1 / "eval_test.json"], depends=[f"ft1_{tokenizer}"],
            params={"checkpoint": "best by val/mAP"},
            late_args=lambda ft1=ft1: ["--checkpoint", str(demo.best_checkpoint(ft1))],
            late_note="--checkpoint <the checkpoint selected on val/mAP>"))
        baselines = out / tokenizer / "baselines.json"
        stages.append(st.Stage(
            f"baselines_{tokenizer}", f"label prior and bag of codes on the {tokenizer} test codes",
            ["python3", demo._rel(REPO / "tools" / "demo_eval.py"), str(shards), "--out", str(baselines)],
            outputs=[baselines], owned=[baselines], depends=[f"prepare_{tokenizer}"],
            files=[REPO / "tools" / "demo_eval.py"]))
    return stages


def collect(out: Path) -> list[dict[str, Any]]:
    rows = []
    for tokenizer in TOKENIZERS:
        official = demo._read_json(out / tokenizer / "ft1" / "eval_test.json")
        baselines = demo._read_json(out / tokenizer / "baselines.json")
        best = demo._read_json(out / tokenizer / "ft1" / "final" / "metrics.json").get("best", {})
        pretrain = demo._read_json(out / tokenizer / "pretrain" / "final" / "metrics.json")
        rows.append({
            "tokenizer": tokenizer, "ft1_test_accuracy": official.get("test/accuracy"),
            "ft1_test_mAP": official.get("test/mAP"), "ft1_best_step": best.get("step"),
            "val_mAP": best.get("value"), "pretrain_val_mlm_accuracy": pretrain.get("val/mlm_accuracy"),
            "bag_of_codes_accuracy": baselines.get("bag_of_codes", {}).get("accuracy"),
            "bag_of_codes_mAP": baselines.get("bag_of_codes", {}).get("mAP"),
            "label_prior_mAP": baselines.get("label_prior", {}).get("mAP"),
            "chance_accuracy": baselines.get("chance_accuracy"), "num_test": baselines.get("num_test"),
        })
    return rows


def report(out: Path, args: argparse.Namespace, timings: list[dict[str, Any]], wall: float) -> str:
    rows = collect(out)
    table = st.markdown_table(
        ["tokenizer", "FT1 test accuracy", "FT1 test mAP", "bag-of-codes accuracy", "bag-of-codes mAP",
         "chance accuracy", "label-prior mAP", "MLM val accuracy"],
        [[r["tokenizer"], r["ft1_test_accuracy"], r["ft1_test_mAP"], r["bag_of_codes_accuracy"],
          r["bag_of_codes_mAP"], r["chance_accuracy"], r["label_prior_mAP"], r["pretrain_val_mlm_accuracy"]]
         for r in rows])
    setup = (f"{rows[0]['num_test']} test clips from {args.test_speakers} speakers never heard in training "
             f"({args.train_speakers} training speakers, {args.repeats} takes of each word); tiny recipes, "
             f"{args.pretrain_steps} MLM + {args.ft_steps} FT1 steps")
    timing = st.results_tables([], [], timings)
    body = f"realistic check ({st.now()}): {setup}\n\n{table}\n\n{timing}\nwall time: {st.format_seconds(wall)}\n"
    (out / "results.md").write_text(body, encoding="utf-8")
    demo_eval.write_json(out / "results.json", {"rows": rows, "setup": setup, "timings": timings,
                                                "wall_seconds": wall, "args": vars(args)})
    return body


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="realistic_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/realistic_check")
    p.add_argument("--plan", action="store_true", help="print the stages and their commands; run nothing")
    p.add_argument("--redo", nargs="+", default=[], metavar="STAGE")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--num-cpu-ranks", type=int, default=2)
    p.add_argument("--num-gpus", type=int, help="default: all visible GPUs")
    p.add_argument("--train-speakers", type=int, default=60)
    p.add_argument("--val-speakers", type=int, default=10)
    p.add_argument("--test-speakers", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--clip-seconds", type=float, default=1.0)
    p.add_argument("--codes", type=int, default=1024, help="mel-rvq codebook size (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="af-synth-speech processes")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--ft-steps", type=int, default=800)
    p.add_argument("--eval-every", type=int, default=100)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(demo._rel(Path(args.out).resolve()))
    previous = os.getcwd()
    os.chdir(REPO)
    try:
        ranks = demo.ranks_args(args.num_gpus, args.num_cpu_ranks)
        stages = build_plan(out, args, ranks)
        if args.plan:
            for stage in stages:
                print(f"# {stage.name}\n{stage.shell()}")
            return 0
        started = time.time()
        timings = demo.run_stages(stages, out, redo=set(args.redo), verbose=args.verbose)
        print("\n" + report(out, args, timings, time.time() - started), flush=True)
        print(f"(also in {out / 'results.md'} and {out / 'results.json'})")
        return 0
    finally:
        os.chdir(previous)


if __name__ == "__main__":
    sys.exit(main())
