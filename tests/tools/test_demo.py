"""The demo's own logic, cheaply: stage hashes and reuse, the results table, its evaluation maths.

The stages' real work (data preparation, training, evaluation) is covered by tests/data and
tests/engine; tests/test_readme.py runs the whole demo in miniature once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from af_train_tools import demo, demo_eval
from af_train_tools import demo_stages as st
from sklearn.metrics import average_precision_score

# --------------------------------------------------------------------------------------------------
# Stages: hashes, markers, reuse / resume / fresh
# --------------------------------------------------------------------------------------------------


def make_stage(tmp_path: Path, name: str, **kwargs) -> st.Stage:
    return st.Stage(name, f"stage {name}", **kwargs)


def test_stage_hash_follows_command_files_and_upstream(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("a: 1\n")
    stage = make_stage(tmp_path, "b", command=["tool", "--x", "1"], depends=["a"], files=[recipe])
    base = st.stage_hash(stage, {"a": "h1"})
    assert st.stage_hash(stage, {"a": "h1"}) == base  # stable
    assert st.stage_hash(stage, {"a": "h2"}) != base  # upstream changed
    recipe.write_text("a: 2\n")
    assert st.stage_hash(stage, {"a": "h1"}) != base  # a file it reads changed
    recipe.write_text("a: 1\n")
    stage.command = ["tool", "--x", "2"]
    assert st.stage_hash(stage, {"a": "h1"}) != base  # what it runs changed
    stage.command = ["tool", "--x", "1"]
    stage.params = {"k": 1}
    assert st.stage_hash(stage, {"a": "h1"}) != base
    with pytest.raises(KeyError, match="depends on"):
        st.stage_hash(stage, {})


def test_decide_reuse_resume_fresh(tmp_path):
    output = tmp_path / "out.txt"
    stage = make_stage(tmp_path, "s", outputs=[output])
    assert st.decide(stage, "h", None)[0] == st.FRESH
    assert st.decide(stage, "h", {"hash": "other", "status": "done"})[0] == st.FRESH
    assert st.decide(stage, "h", {"hash": "h", "status": "running"})[0] == st.RESUME
    state, reason = st.decide(stage, "h", {"hash": "h", "status": "done", "seconds": 3.0})
    assert state == st.FRESH and "missing" in reason  # done, but its output is gone
    output.write_text("x")
    assert st.decide(stage, "h", {"hash": "h", "status": "done", "seconds": 3.0})[0] == st.REUSE


def test_markers_roundtrip_and_tolerate_a_cut_file(tmp_path):
    st.write_marker(tmp_path, "s", {"hash": "h", "status": "done"})
    assert st.read_marker(tmp_path, "s") == {"hash": "h", "status": "done"}
    st.marker_path(tmp_path, "s").write_text('{"hash": "h", "sta')
    assert st.read_marker(tmp_path, "s") is None
    assert st.read_marker(tmp_path, "never") is None


def _counting_plan(tmp_path: Path, calls: list[str], param: int = 1) -> list[st.Stage]:
    def work(name: str, path: Path):
        def run():
            calls.append(name)
            path.write_text(name)
        return run

    a, b, c = (tmp_path / f"{n}.txt" for n in "abc")
    return [
        st.Stage("a", "first", function=work("a", a), outputs=[a], owned=[a], params={"p": param}),
        st.Stage("b", "after a", function=work("b", b), outputs=[b], owned=[b], depends=["a"]),
        st.Stage("c", "independent", function=work("c", c), outputs=[c], owned=[c]),
    ]


def test_run_stages_reuses_finished_work_and_reruns_what_changed(tmp_path, capsys):
    out = tmp_path / "demo"
    calls: list[str] = []
    timings = demo.run_stages(_counting_plan(tmp_path, calls), out, redo=set(), verbose=False)
    assert calls == ["a", "b", "c"] and [t["state"] for t in timings] == ["ran"] * 3

    calls.clear()
    timings = demo.run_stages(_counting_plan(tmp_path, calls), out, redo=set(), verbose=False)
    assert calls == [] and [t["state"] for t in timings] == ["reused"] * 3
    assert "reused" in capsys.readouterr().out

    calls.clear()  # a's configuration changes: a and its dependent b run again, c is reused
    demo.run_stages(_counting_plan(tmp_path, calls, param=2), out, redo=set(), verbose=False)
    assert calls == ["a", "b"]

    calls.clear()
    demo.run_stages(_counting_plan(tmp_path, calls, param=2), out, redo={"c"}, verbose=False)
    assert calls == ["c"]

    calls.clear()  # an output deleted by hand is made again
    (tmp_path / "b.txt").unlink()
    demo.run_stages(_counting_plan(tmp_path, calls, param=2), out, redo=set(), verbose=False)
    assert calls == ["b"]


def test_run_stages_interrupted_stage_is_resumed_not_wiped(tmp_path):
    out = tmp_path / "demo"
    partial = tmp_path / "run"
    partial.mkdir()
    (partial / "checkpoint").write_text("step 10")
    seen = []
    stage = st.Stage("train", "training", function=lambda: seen.append((partial / "checkpoint").exists()),
                     outputs=[partial], owned=[partial])
    digest = st.stage_hash(stage, {})
    st.write_marker(out, "train", {"hash": digest, "status": "running"})
    timings = demo.run_stages([stage], out, redo=set(), verbose=False)
    assert seen == [True] and timings[0]["state"] == "resumed"  # the partial run was kept for --resume auto
    assert st.read_marker(out, "train")["status"] == "done"

    st.write_marker(out, "train", {"hash": "stale", "status": "running"})  # another configuration: wiped
    seen.clear()
    demo.run_stages([stage], out, redo=set(), verbose=False)
    assert seen == [False]


def test_command_stage_logs_output_and_failure_names_the_log(tmp_path, capsys):
    out = tmp_path / "demo"
    ok = st.Stage("hello", "prints", command=["python3", "-c", "print('wrote 3 clips'); print('noise')"])
    demo.run_stages([ok], out, redo=set(), verbose=False)
    log = (out / "logs" / "hello.log").read_text()
    assert "wrote 3 clips" in log and "noise" in log
    shown = capsys.readouterr().out
    assert "\n    wrote 3 clips\n" in shown and "\n    noise\n" not in shown  # the terminal: informative lines

    bad = st.Stage("bad", "fails", command=["python3", "-c", "import sys; print('boom'); sys.exit(3)"])
    with pytest.raises(SystemExit, match=r"(?s)stage 'bad' failed \(exit 3\).*boom"):
        demo.run_stages([bad], out, redo=set(), verbose=False)
    assert st.read_marker(out, "bad")["status"] == "running"  # not marked done

    missing = st.Stage("missing", "no such tool", command=["af-no-such-tool-xyz"])
    with pytest.raises(SystemExit, match="not on PATH"):
        demo.run_stages([missing], out, redo=set(), verbose=False)


# --------------------------------------------------------------------------------------------------
# The plan and the settings
# --------------------------------------------------------------------------------------------------


def test_plan_wires_pretraining_rows_into_fine_tuning(tmp_path):
    s = demo.Settings(frozen_rows=(1, 3), pretrain_steps=40, ft_steps=20, eval_every=10)
    stages = demo.build_plan(Path("runs/x"), Path("data/elsewhere"), s, ["--num_cpu_ranks", "2"],
                             demo.TokenizerChoice("random", seed=7))
    by_name = {stage.name: stage for stage in stages}
    assert list(by_name) == ["synth", "prepare", "baselines", "pretrain_row0", "pretrain_row1", "pretrain_row3", "ft1",
                             "ft2", "evaluate_ft1", "evaluate_ft2", "plots"]
    assert by_name["synth"].command[0] == "af-synth-speech"
    assert "--codec-random-init" in by_name["prepare"].command and "7" in by_name["prepare"].command
    assert "--single-label" in by_name["prepare"].command
    ft2 = by_name["ft2"].command
    assert "data.code_rows=[0,1,3]" in ft2
    assert ("objective.frozen_row_checkpoints=[runs/x/pretrain_row1/final/model.pt,"
            "runs/x/pretrain_row3/final/model.pt]") in ft2
    assert set(by_name["ft2"].depends) == {"pretrain_row0", "pretrain_row1", "pretrain_row3"}
    assert "data.train=data/elsewhere/shards/train" in by_name["pretrain_row0"].command
    assert "data.max_length=77" in by_name["ft1"].command  # 1 s clips: 75 frames + BOA + EOA
    assert not any(a.startswith("data.test=") for a in by_name["pretrain_row0"].command)  # never sees test
    # every training stage's recipe overrides are valid for its recipe
    from af_train.config import Recipe

    for name in ("pretrain_row0", "pretrain_row3", "ft1", "ft2"):
        command = by_name[name].command
        recipe = command[command.index("--recipe") + 1]
        Recipe.load(demo.REPO / recipe, [a for a in command if "=" in a and not a.startswith("-")])


def test_plan_without_official_weights_fits_mel_rvq_on_the_training_split():
    stages = demo.build_plan(Path("runs/x"), Path("data/d"), demo.Settings(), ["--num_cpu_ranks", "2"],
                             demo.TokenizerChoice("mel-rvq"))
    by_name = {stage.name: stage for stage in stages}
    assert list(by_name)[:4] == ["synth", "fit_tokenizer", "prepare", "baselines"]
    fit = by_name["fit_tokenizer"].command
    assert fit[:3] == ["af-fit-tokenizer", "--kind", "mel-rvq"] and "data/d/audio/labels.csv" in fit
    assert fit[fit.index("--codes") + 1] == "1024" and fit[fit.index("--out") + 1] == "data/d/mel_rvq.safetensors"
    prepare = by_name["prepare"].command
    assert prepare[prepare.index("--tokenizer") + 1] == "data/d/mel_rvq.safetensors"
    assert "--codec-random-init" not in prepare and by_name["prepare"].depends == ["synth", "fit_tokenizer"]
    # a different codebook size is a different tokenizer: the shards and everything after are redone
    other = demo.build_plan(Path("runs/x"), Path("data/d"), demo.Settings(codes=512), ["--num_cpu_ranks", "2"],
                            demo.TokenizerChoice("mel-rvq"))
    hashes_a: dict[str, str] = {}
    hashes_b: dict[str, str] = {}
    for a, b in zip(stages, other):
        hashes_a[a.name], hashes_b[b.name] = st.stage_hash(a, hashes_a), st.stage_hash(b, hashes_b)
    assert hashes_a["synth"] == hashes_b["synth"] and hashes_a["ft1"] != hashes_b["ft1"]


def test_tokenizer_choice_official_weights_else_mel_rvq(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    choice, why = demo.choose_tokenizer(demo.parse_args([]))
    assert choice.kind == "mel-rvq" and "not in the torch hub cache" in why
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / demo.ENCODEC_WEIGHTS).write_bytes(b"weights")
    choice, why = demo.choose_tokenizer(demo.parse_args([]))
    assert choice == demo.TokenizerChoice("encodec", checkpoint=hub / demo.ENCODEC_WEIGHTS) and why is None
    assert demo.choose_tokenizer(demo.parse_args(["--mel-rvq"]))[0].kind == "mel-rvq"
    random_choice, why = demo.choose_tokenizer(demo.parse_args(["--codec-random-init", "3"]))
    assert random_choice == demo.TokenizerChoice("random", seed=3) and "--codec-random-init" in why
    with pytest.raises(SystemExit):  # one tokenizer at a time
        demo.parse_args(["--mel-rvq", "--codec-random-init", "3"])


def test_plan_uses_official_codec_weights_when_cached(tmp_path, monkeypatch):
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert demo.find_codec_weights(None) is None
    (hub / demo.ENCODEC_WEIGHTS).write_bytes(b"weights")
    assert demo.find_codec_weights(None) == hub / demo.ENCODEC_WEIGHTS
    with pytest.raises(SystemExit, match="no such file"):
        demo.find_codec_weights(str(tmp_path / "nope.th"))
    stages = demo.build_plan(Path("runs/x"), Path("data/d"), demo.Settings(), ["--num_cpu_ranks", "2"],
                             demo.TokenizerChoice("encodec", checkpoint=hub / demo.ENCODEC_WEIGHTS))
    assert "fit_tokenizer" not in [stage.name for stage in stages]
    prepare = next(stage for stage in stages if stage.name == "prepare")
    assert str(hub / demo.ENCODEC_WEIGHTS) in prepare.command and hub / demo.ENCODEC_WEIGHTS in prepare.files


@pytest.mark.parametrize("rows", ["0,1", "1,1", "4", "a"])
def test_bad_frozen_rows_are_refused(rows):
    with pytest.raises(SystemExit, match="--frozen-rows"):
        demo.settings_from(demo.parse_args(["--frozen-rows", rows]))


def test_unknown_redo_stage_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such stage"):
        demo.main(["--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"), "--num-gpus", "0",
                   "--redo", "trian", "--plan"])


def test_best_checkpoint_prefers_validation_choice(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "COMPLETE").write_text("")
        (root / f"step_{step:08d}" / "af_meta.json").write_text("{}")
    (root / "step_00000040").mkdir()  # incomplete: never chosen
    assert demo.best_checkpoint(tmp_path) == root / "step_00000030"
    (root / "best").write_text(json.dumps({"tag": "step_00000020", "metric": "val/mAP", "value": 0.5}))
    assert demo.best_checkpoint(tmp_path) == root / "step_00000020"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        demo.best_checkpoint(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# Evaluation maths and the results table
# --------------------------------------------------------------------------------------------------


def random_problem(rng: np.random.Generator, n: int = 60, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    targets = rng.random((n, c)) < 0.3
    targets[0] = True  # every class has a positive
    scores = targets * rng.normal(1.0, 1.0, (n, c)) + rng.normal(0.0, 1.0, (n, c))
    return scores, targets


def test_per_class_ap_matches_scikit_learn():
    rng = np.random.default_rng()
    scores, targets = random_problem(rng)
    ours = demo_eval.per_class_ap(scores, targets)
    reference = [average_precision_score(targets[:, c], scores[:, c]) for c in range(scores.shape[1])]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)
    assert demo_eval.multi_hot(np.array([2, 0]), 3).tolist() == [[False, False, True], [True, False, False]]
    with pytest.raises(ValueError, match="classes"):
        demo_eval.multi_hot(np.zeros((2, 4)), 3)


def test_paired_bootstrap_sees_a_real_difference_and_no_difference():
    rng = np.random.default_rng()
    scores, targets = random_problem(rng, n=80)
    same = demo_eval.paired_bootstrap(scores, scores.copy(), targets, rounds=200, seed=1)
    assert same["mean"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0
    perfect = targets.astype(float) + 0.01 * rng.random(targets.shape)
    better = demo_eval.paired_bootstrap(scores, perfect, targets, rounds=200, seed=1)
    full = np.mean(demo_eval.per_class_ap(perfect, targets)) - np.mean(demo_eval.per_class_ap(scores, targets))
    assert better["mean"] == pytest.approx(full) and better["low"] > 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        demo_eval.paired_bootstrap(scores, scores[:10], targets)


def _fake_run(out: Path, mode: str, scores: np.ndarray, targets: np.ndarray, prior_map: float, best_step: int):
    run = out / mode
    (run / "final").mkdir(parents=True)
    test_map = float(np.mean(demo_eval.per_class_ap(scores, targets)))
    accuracy = float(np.mean(scores.argmax(1) == targets.argmax(1)))
    (run / "final" / "metrics.json").write_text(json.dumps(
        {"step": 100, "best": {"metric": "val/mAP", "value": 0.61, "step": best_step}}))
    (run / "eval_test.json").write_text(json.dumps({"test/mAP": test_map, "test/auc": 0.9, "test/d_prime": 1.8,
                                                    "test/accuracy": accuracy}))
    (run / "per_class_ap.json").write_text(json.dumps({"prior_mAP": prior_map, "num_clips": len(targets)}))
    demo_eval.save_scores(run / "test_scores.npz", {"ids": [f"c{i:03d}" for i in range(len(targets))],
                                                    "scores": scores, "targets": targets})
    return test_map, accuracy


def test_report_tables_and_checks_from_fake_runs(tmp_path, capsys):
    rng = np.random.default_rng()
    targets = np.eye(5, dtype=bool)[rng.integers(0, 5, 50)]  # single-label, 5 classes
    scores = targets * rng.normal(1.0, 1.0, targets.shape) + rng.normal(0.0, 1.0, targets.shape)
    out = tmp_path / "demo"
    s = demo.Settings(frozen_rows=(1,))
    ft1, acc1 = _fake_run(out, "ft1", scores, targets, prior_map=0.2, best_step=40)
    ft2, acc2 = _fake_run(out, "ft2", scores + 0.05 * rng.normal(size=scores.shape), targets, prior_map=0.2,
                          best_step=60)
    demo_eval.write_json(out / "baselines.json", {
        "bag_of_codes": {"accuracy": 0.375, "mAP": 0.4375, "auc": 0.75, "d_prime": 0.9},
        "label_prior": {"accuracy": 0.25, "mAP": 0.2, "auc": 0.5, "d_prime": 0.0},
        "chance_accuracy": 0.2, "num_test": 50})
    for row in (0, 1):
        (out / f"pretrain_row{row}" / "final").mkdir(parents=True)
        (out / f"pretrain_row{row}" / "final" / "metrics.json").write_text(json.dumps(
            {"step": 400, "val/mlm_loss": 5.25 + row, "val/mlm_accuracy": 0.125}))
    timings = [{"stage": "synth", "title": "speak", "state": "reused", "seconds": 3.0},
               {"stage": "ft1", "title": "fine-tune", "state": "ran", "seconds": 75.0}]
    rc = demo.report(out, s, timings, "mel-rvq fitted on the demo's training split", 80.0)
    text = (out / "results.md").read_text()
    assert "(50 clips; chance accuracy 0.200)" in text
    assert f"| FT1          | 40        | 0.610   | {acc1:.3f}         | {ft1:.3f}" in text
    assert f"| FT2          | 60        | 0.610   | {acc2:.3f}         | {ft2:.3f}" in text
    assert "| bag of codes | n/a       | n/a     | 0.375         | 0.438    | 0.750" in text
    assert "| label prior  | n/a       | n/a     | 0.250         | 0.200    | 0.500" in text
    assert "| pretrain_row1 | 1        | 400   | 6.250" in text
    assert "1 min 15 s" in text and "| total" in text and "1 min 15 s |" in text.split("| total")[1]
    assert "tokenizer: mel-rvq fitted" in text
    results = json.loads((out / "results.json").read_text())
    assert results["models"][0]["test_mAP"] == pytest.approx(ft1)
    assert results["baselines"]["bag_of_codes"]["accuracy"] == 0.375
    expected = ft2 - ft1
    assert results["ft2_minus_ft1"]["mean"] == pytest.approx(expected, abs=1e-9)
    learned = all(m - 0.2 >= 0.15 for m in (ft1, ft2)) and all(a - 0.2 >= 0.25 for a in (acc1, acc2))
    assert rc == (0 if learned and results["ft2_minus_ft1"]["high"] >= 0 else 1)
    assert text.count("PASS  ") + text.count("CHECK ") == 5
    assert f"FT1 recognises words of unseen speakers: test accuracy {acc1:.3f} vs chance 0.200" in text


def test_verdicts_fail_when_there_is_no_learning():
    models = {"FT1": {"test_mAP": 0.35, "prior_mAP": 0.3}}
    (ok, sentence), = st.verdicts(models, None)
    assert not ok and "0.350" in sentence
    checks = st.verdicts({"FT1": {"test_mAP": 0.8, "prior_mAP": 0.2}}, {"mean": -0.2, "low": -0.3, "high": -0.1})
    assert checks[0][0] and not checks[1][0] and "worse than FT1 beyond noise" in checks[1][1]
    # single-label: accuracy against chance is checked too
    near_chance = {"FT1": {"test_mAP": 0.5, "prior_mAP": 0.1, "test_accuracy": 0.3}}
    mAP_check, accuracy_check = st.verdicts(near_chance, None, {"chance_accuracy": 0.1})
    assert mAP_check[0] and not accuracy_check[0] and "+0.200; demo asks for >= +0.25" in accuracy_check[1]


def test_markdown_table_and_durations():
    table = st.markdown_table(["a", "long header"], [[1.23456, None], ["x", float("nan")]])
    lines = table.splitlines()
    assert lines[0] == "| a     | long header |" and lines[2] == "| 1.235 | n/a         |"
    assert len({len(line) for line in lines}) == 1
    assert st.format_seconds(5.04) == "5.0 s" and st.format_seconds(61) == "1 min 01 s"
    assert st.format_seconds(None) == "n/a"


def test_demo_runs_as_a_plain_script_from_anywhere(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, str(demo.REPO / "tools" / "demo.py"), "--plan", "--num-gpus", "0",
                             "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "# synth [fresh: not run before]" in result.stdout
    assert f"af-synth-speech --out {tmp_path / 'd' / 'audio'}" in result.stdout


def test_ctrl_c_is_passed_to_the_running_command_and_logged(tmp_path):
    import os
    import signal
    import threading
    import time

    child = ("import signal, sys, time\n"
             "def stop(signum, frame):\n    print('saving a checkpoint, then exiting', flush=True); sys.exit(5)\n"
             "signal.signal(signal.SIGINT, stop)\nprint('wrote ready', flush=True)\ntime.sleep(60)\n")
    stage = st.Stage("slow", "a long training run", command=["python3", "-c", child])
    # `make demo` starts with Python's own Ctrl-C handler; this pytest process may not have it any more after
    # the in-process tests before this one (in the whole suite the SIGINT below was swallowed), so set it here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    started = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            demo.run_stages([stage], tmp_path, redo=set(), verbose=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.time() - started < 30  # the child stopped on the forwarded SIGINT, not after its sleep
    assert "saving a checkpoint, then exiting" in (tmp_path / "logs" / "slow.log").read_text()
    assert st.read_marker(tmp_path, "slow")["status"] == "running"  # the next run resumes it


