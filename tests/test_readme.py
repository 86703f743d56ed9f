"""The README cannot rot: its commands are checked against the real tools, and its quick start runs.

- Every command in a ```bash block is parsed by the real parser of the tool it names (flags, required
  arguments), recipe overrides are applied to the named recipe (unknown keys fail), and referenced
  files (recipes, hostfile, Makefile targets) must exist. A command of an unknown program fails the
  test, so new README commands need a check here.
- The "What make demo runs" block must equal what ``tools/demo.py --plan`` prints.
- The quick start (``make demo``) runs scaled down (``tools/demo.py --smoke``), is rerun to check it
  reuses its stages, and the README's Hugging Face export commands run on its output.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PLAN_START, PLAN_END = "<!-- demo-plan:start -->", "<!-- demo-plan:end -->"
RESULTS_START, RESULTS_END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
SMOKE_LINE = re.compile(r"^python3 tools/demo\.py --smoke .*$", re.MULTILINE)
# Programs that only make sense on a cluster or cloud, or plain shell utilities: not run, not parsed.
SHELL_ONLY = {"ls", "rm", "scontrol", "export", "aws", "gsutil", "gcloud", "mc"}
PLACEHOLDERS = {"$SLURM_NODEID": "0", "$MASTER_ADDR": "node-a"}


def readme() -> str:
    return README.read_text(encoding="utf-8")


def bash_commands(text: str, skip_plan: bool = True) -> list[str]:
    """Commands of every ```bash block (continuations joined, comments dropped)."""
    if skip_plan:
        text = text.split(PLAN_START)[0] + text.split(PLAN_END)[1]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line.split(" # ")[0].strip())
    return commands


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme(), re.DOTALL)


def console_scripts() -> dict[str, tuple[str, str]]:
    text = (REPO / "setup.py").read_text(encoding="utf-8")
    return {name: (module, fn) for name, module, fn in re.findall(r'"([\w-]+)\s*=\s*([\w.]+):(\w+)"', text)}


# --------------------------------------------------------------------------------------------------
# Parsing a command with the tool's own argparse parser, without running the tool
# --------------------------------------------------------------------------------------------------


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace, extras: list[str]):
        super().__init__("parsed")
        self.namespace, self.extras = namespace, extras


@contextlib.contextmanager
def parse_only():
    """argparse stops right after parsing (raising Parsed); a bad flag still exits with status 2."""
    original = argparse.ArgumentParser.parse_known_args
    original_parse_args = argparse.ArgumentParser.parse_args

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = original(self, args, namespace)
        raise Parsed(namespace, extras)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = original(self, args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise Parsed(namespace, [])

    argparse.ArgumentParser.parse_known_args = parse_known_args
    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original
        argparse.ArgumentParser.parse_args = original_parse_args


def parse_with(function, argv: list[str], what: str) -> Parsed:
    err = io.StringIO()
    try:
        with parse_only(), contextlib.redirect_stderr(err):
            function(argv)
    except Parsed as parsed:
        return parsed
    except SystemExit:
        raise AssertionError(f"README command `{what}` does not parse: {err.getvalue().strip()}") from None
    raise AssertionError(f"`{what}`: the tool returned without parsing its arguments")


def check_training_args(argv: list[str], what: str) -> None:
    """af_train.train's arguments: --recipe must exist and the overrides must fit the recipe."""
    from af_train import train
    from af_train.config import Recipe

    parsed = parse_with(train.parse_args, argv, what).namespace
    recipe = REPO / parsed.recipe
    assert recipe.is_file(), f"`{what}`: recipe {parsed.recipe} does not exist"
    Recipe.load(recipe, parsed.overrides)  # raises RecipeError naming a bad key
    if parsed.resume not in ("auto", "none"):
        assert parsed.resume.startswith("runs/"), f"`{what}`: --resume {parsed.resume} should be a run's checkpoint"


def check_command(command: str) -> str:
    """Validate one README command; returns the kind of check made."""
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    argv = shlex.split(command)
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    program, args = argv[0], argv[1:]
    scripts = console_scripts()
    if program in SHELL_ONLY:
        return "shell"
    if program == "make":
        makefile = (REPO / "Makefile").read_text(encoding="utf-8")
        targets = [a for a in args if "=" not in a]
        for target in targets:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), f"no make target '{target}'"
        return "make"
    if program == "tensorboard":
        importlib.import_module("tensorboard")
        assert args[0] == "--logdir"
        return "tensorboard"
    if program == "srun":
        inner = args[args.index("-c") + 1]
        return check_command(inner)
    if program == "deepspeed":
        from deepspeed.launcher import runner

        parsed = parse_with(runner.parse_args, args, command).namespace
        assert parsed.hostfile in ("hostfile", "hostfile.example"), parsed.hostfile
        assert parsed.hostfile == "hostfile" or (REPO / parsed.hostfile).is_file()
        assert parsed.module and parsed.user_script == "af_train.train", command
        check_training_args(parsed.user_args, command)
        return "deepspeed"
    if program == "python3" and args[:2] == ["-m", "pip"]:
        assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt"
        assert "'dev'" not in command and "dev" in (REPO / "setup.py").read_text()
        return "pip"
    if program == "python3" and args[:2] == ["-m", "af_train.train"]:
        check_training_args(args[2:], command)
        return "train"
    if program == "python3" and args[:1] == ["-m"] and args[1] not in ("pytest",):
        assert importlib.util.find_spec(args[1]) is not None, f"`{command}`: no module {args[1]}"
        return "module"
    if program == "python3" and args and args[0].startswith("tools/"):
        module = importlib.import_module(f"af_train_tools.{Path(args[0]).stem}")
        parse_with(module.main, args[1:], command)
        return "tool"
    if program in scripts:
        module, function = scripts[program]
        parsed = parse_with(getattr(importlib.import_module(module), function), args, command)
        if program == "af-train":
            hostfile = parsed.namespace.hostfile
            assert hostfile is None or (REPO / hostfile).is_file(), f"`{command}`: no {hostfile}"
            check_training_args(parsed.extras, command)
        return "console script"
    raise AssertionError(f"README command `{command}` uses '{program}', which tests/test_readme.py does not check; "
                         "add a check for it (or run it in a test)")


def test_every_readme_command_parses_with_the_real_tools():
    commands = bash_commands(readme())
    assert len(commands) >= 30
    kinds = {}
    for command in commands:
        kinds[command] = check_command(command)
    assert {"make", "console script", "tool", "deepspeed", "train"} <= set(kinds.values())


def test_checker_catches_rotten_commands():
    with pytest.raises(AssertionError, match="does not parse"):
        check_command("af-prepare --format csv --input x.csv --out y --no-such-flag")
    with pytest.raises(AssertionError, match="does not exist"):
        check_command("af-train --num_gpus 1 --recipe recipes/no_such_recipe.yaml")
    from af_train.config import RecipeError

    with pytest.raises(RecipeError, match="train.max_stepz"):
        check_command("af-train --num_gpus 1 --recipe recipes/tiny_ft1.yaml train.max_stepz=3")
    with pytest.raises(AssertionError, match="does not check"):
        check_command("curl http://example.com")


def test_readme_keeps_its_sections():
    text = readme()
    for heading in ("## Quick start", "## Preparing data", "### EnCodec weights (offline)", "### AudioSet",
                    "### FSD50K", "### ESC-50", "## Recipes", "## Multi-node training", "## Resuming",
                    "## Evaluation protocol", "## Kernels and benchmarks", "## Using a trained model",
                    "## Exporting to Hugging Face",
                    "## Streaming from object storage (S3, MinIO, GCS)", "## Troubleshooting"):
        assert heading in text, heading
    results = text.split(RESULTS_START)[1].split(RESULTS_END)[0]
    assert "| FT1" in results and "| FT2" in results and "| label prior" in results and "| bag of codes" in results, \
        "demo results table missing"


def test_demo_block_is_what_the_demo_runs(capsys):
    from af_train_tools import demo

    assert demo.main(["--plan", "--num-gpus", "0", "--mel-rvq", "--out", "runs/demo", "--data", "data/demo"]) == 0
    planned = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("# ")]
    block = readme().split(PLAN_START)[1].split(PLAN_END)[0]
    documented = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert documented == planned


# --------------------------------------------------------------------------------------------------
# The quick start, scaled down
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_demo(tmp_path_factory):
    """The README's miniature demo command, with its folders moved into a temporary directory."""
    line = SMOKE_LINE.search(readme())
    assert line, "the README lost its `python3 tools/demo.py --smoke ...` line"
    root = tmp_path_factory.mktemp("readme_demo")
    argv = shlex.split(line.group(0).replace("/tmp/demo_smoke_data", str(root / "data"))
                       .replace("/tmp/demo_smoke", str(root / "demo")))
    # as on a machine without the official EnCodec weights (CI): the demo fits mel-rvq
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_HOME=str(root / "torch_home"))
    first = subprocess.run([sys.executable, *argv[1:], "--num-gpus", "0"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    again = subprocess.run([sys.executable, *argv[1:], "--num-gpus", "0"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    return root, first.stdout, again.stdout


def test_quick_start_runs_every_stage(smoke_demo):
    root, output, _ = smoke_demo
    demo_dir = root / "demo"
    stages = ["synth", "fit_tokenizer", "prepare", "baselines", "pretrain_row0", "pretrain_row1", "ft1", "ft2",
              "evaluate_ft1", "evaluate_ft2", "plots"]
    for stage in stages:
        marker = json.loads((demo_dir / ".stages" / f"{stage}.json").read_text())
        assert marker["status"] == "done", stage
    assert "Tokenizing with mel-rvq instead" in output  # announced, and why
    results = json.loads((demo_dir / "results.json").read_text())
    assert results["tokenizer"] == "mel-rvq fitted on the demo's training split"
    manifest = json.loads((root / "data" / "shards" / "test" / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "mel-rvq" and not manifest["multi_label"]
    for model in results["models"]:
        assert 0.0 <= model["test_mAP"] <= 1.0 and 0.0 < model["prior_mAP"] <= 1.0
        assert 0.0 <= model["test_accuracy"] <= 1.0
    assert results["baselines"]["chance_accuracy"] == 0.1
    assert 0.0 <= results["baselines"]["bag_of_codes"]["accuracy"] <= 1.0
    for run in ("ft1", "ft2"):
        per_class = json.loads((demo_dir / run / "per_class_ap.json").read_text())
        official = json.loads((demo_dir / run / "eval_test.json").read_text())
        assert abs(per_class["mAP"] - official["test/mAP"]) < 1e-6
        assert (demo_dir / run / "plots" / "per_class_ap.png").stat().st_size > 10_000
        assert list((demo_dir / run / "tensorboard").glob("events.out.tfevents.*"))
    assert (demo_dir / "plots" / "compare_val.png").is_file()
    text = (demo_dir / "results.md").read_text()
    assert "Held-out test split" in text and "Time per stage" in text and "MLM pretraining" in text


def test_quick_start_rerun_reuses_every_stage(smoke_demo):
    _, _, again = smoke_demo
    assert again.count("reused: done in an earlier run") == 11
    assert "running:" not in again


def test_readme_export_commands_on_the_demo_output(smoke_demo, tmp_path):
    root, _, _ = smoke_demo
    from af_train.inference import export_hf

    commands = [c for c in bash_commands(readme()) if c.startswith("af-export-hf")]
    assert len(commands) == 2
    for command in commands:
        command = (command.replace("runs/demo", str(root / "demo")).replace("data/demo", str(root / "data"))
                   .replace("hf/", f"{tmp_path}/hf/"))
        assert export_hf.main(shlex.split(command)[1:]) == 0, command
    from transformers import RoFormerForMaskedLM, RoFormerModel

    classifier = json.loads((tmp_path / "hf" / "audioformer-demo-ft1" / "classifier.json").read_text())
    assert classifier["labels"][:2] == ["yes", "no"] and classifier["multi_label"] is False
    RoFormerModel.from_pretrained(tmp_path / "hf" / "audioformer-demo-ft1")
    RoFormerForMaskedLM.from_pretrained(tmp_path / "hf" / "audioformer-demo-mlm")

    # The README's inference snippet gives the probabilities af_train's own FT1 module gives.
    import torch

    from af_train.config import Recipe
    from af_train.model.checkpoint import check_and_load_state, read_checkpoint
    from af_train.objectives import build_training_module

    (snippet,) = [b for b in python_blocks() if "RoFormerModel.from_pretrained" in b]
    snippet = snippet.replace('"hf/', f'"{tmp_path}/hf/').replace("data/demo", str(root / "data"))
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(snippet, "README.md (python block)", "exec"), namespace)
    assert "'yes':" in printed.getvalue()
    assert namespace["input_ids"].shape[1] <= 75 + 2  # a real file of at most 1 s: its code frames, BOA, EOA
    run = root / "demo" / "ft1"
    recipe = Recipe.load(run / "config.yaml", ["objective.init_checkpoint=null"])
    module = build_training_module(recipe, len(classifier["labels"]), False).eval()
    check_and_load_state(module, read_checkpoint(run / "final" / "model.pt")["state_dict"], "ft1")
    with torch.no_grad():
        scores = module({"input_ids": namespace["input_ids"][:, None], "attention_mask": namespace["attention_mask"]})
    torch.testing.assert_close(namespace["probabilities"], scores["scores"].softmax(-1), atol=1e-5, rtol=1e-5)


def test_readme_inference_snippet_on_the_demo_output(smoke_demo):
    """The "Using a trained model" Python block (AudioTagger, HEAR) runs on the demo's FT1 run."""
    root, _, _ = smoke_demo
    (snippet,) = [b for b in python_blocks() if "AudioTagger.load" in b]
    snippet = snippet.replace("runs/demo", str(root / "demo")).replace("data/demo", str(root / "data"))
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(snippet, "README.md (inference block)", "exec"), namespace)
    assert "'yes':" in printed.getvalue()
    tagger = namespace["tagger"]
    assert namespace["scores"].shape == (1, len(tagger.labels)) and namespace["embeddings"].shape[0] == 1
    assert namespace["scores"].sum() == pytest.approx(1.0, abs=1e-5)  # single-label: a softmax
    assert namespace["scene"].shape == (2, namespace["model"].scene_embedding_size)
    assert namespace["frames"].shape[:2] == namespace["timestamps_ms"].shape == (2, 225)
