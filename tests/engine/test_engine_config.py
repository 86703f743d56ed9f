"""The engine's pure parts: DeepSpeed config from the recipe, batch plans, lr schedule, parameter groups,
log truncation, the launcher command and recipe files. No processes started."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import REPO, TINY

from af_train.config import OptimConfig, Recipe, RecipeError
from af_train.ds_config import build_ds_config, plan_batch
from af_train.optim_groups import optimizer_groups
from af_train.run_logging import (
    PEAK_FLOPS,
    RunLogger,
    encoder_forward_flops_per_token,
    peak_flops_per_device,
    read_metrics,
    training_flops_per_token,
)
from af_train.schedule import LRSchedule, build_lr_scheduler


def recipe(*overrides: str) -> Recipe:
    return Recipe.load(TINY, list(overrides))


def test_ds_config_follows_the_recipe():
    r = recipe("train.micro_batch_size=6", "train.grad_accum_steps=3", "train.zero_stage=3", "train.precision=bf16",
               "optim.grad_clip=0.5", "optim.lr=2e-4", "optim.betas=[0.9,0.95]", "train.offload_optimizer=true")
    plan = plan_batch(r, world_size=4)
    config = build_ds_config(r, plan, on_cpu=False)
    assert plan.global_batch == 72 and config["train_batch_size"] == 72
    assert config["train_micro_batch_size_per_gpu"] == 6 and config["gradient_accumulation_steps"] == 3
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"]["lr"] == 2e-4 and config["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert "torch_adam" not in config["optimizer"]["params"]  # CUDA: DeepSpeed's fused / CPU Adam
    cpu = build_ds_config(recipe("train.precision=fp32"), plan_batch(recipe(), 1), on_cpu=True)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and "bf16" not in cpu


def test_user_deepspeed_section_merges_and_conflicts_name_both_values():
    r = recipe("deepspeed.zero_optimization.overlap_comm=false", "deepspeed.communication_data_type=fp32")
    config = build_ds_config(r, plan_batch(r, 2), on_cpu=True)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert config["communication_data_type"] == "fp32"
    same = recipe("deepspeed.zero_optimization.stage=2")  # equal values are not a conflict
    build_ds_config(same, plan_batch(same, 2), on_cpu=True)
    bad = recipe("deepspeed.zero_optimization.stage=3")
    with pytest.raises(RecipeError, match=r"deepspeed.zero_optimization.stage=3 conflicts with 2 set from "
                                          r"train.zero_stage"):
        build_ds_config(bad, plan_batch(bad, 2), on_cpu=True)
    bad_batch = recipe("deepspeed.train_micro_batch_size_per_gpu=16")
    with pytest.raises(RecipeError, match="train.micro_batch_size"):
        build_ds_config(bad_batch, plan_batch(bad_batch, 1), on_cpu=True)
    scheduler = recipe("deepspeed.scheduler.type=WarmupLR")
    with pytest.raises(RecipeError, match="optim.schedule"):
        build_ds_config(scheduler, plan_batch(scheduler, 1), on_cpu=True)
    with pytest.raises(RecipeError, match="fp16 is not supported"):
        fp16 = recipe("train.precision=fp16")
        build_ds_config(fp16, plan_batch(fp16, 1), on_cpu=True, fp16_supported=False)


def test_impossible_batch_settings_fail_with_all_numbers():
    r = recipe("train.micro_batch_size=4", "train.grad_accum_steps=2", "train.global_batch_size=24")
    with pytest.raises(RecipeError) as error:
        plan_batch(r, world_size=2)
    message = str(error.value)
    for number in ("global_batch_size=24", "micro_batch_size=4", "grad_accum_steps=2", "world size 2", "= 16"):
        assert number in message, message
    assert plan_batch(r, world_size=3).global_batch == 24
    with pytest.raises(RecipeError, match="must be a multiple of"):
        recipe("train.micro_batch_size=4", "train.grad_accum_steps=2", "train.global_batch_size=20")
    # resuming at another world size keeps the global batch through the accumulation steps
    assert plan_batch(recipe("train.micro_batch_size=4"), 1, keep_global_batch=16).grad_accum == 4
    with pytest.raises(RecipeError, match="not a multiple of 4 x 3"):
        plan_batch(recipe("train.micro_batch_size=4"), 3, keep_global_batch=16)


@pytest.mark.parametrize("override,match", [
    ("train.max_step=10", "unknown key 'train.max_step'"),
    ("train.zero_stage=4", "zero_stage must be 0, 1, 2 or 3"),
    ("train.precision=fp8", "'fp8' is not allowed"),
    ("train.best_metric=test/mAP", "allow_test_selection"),
    ("train.best_metric=mAP", "must name a split"),
    ("train.offload_optimizer=true", "zero_stage >= 1"),
])
def test_bad_recipes_fail_with_clear_messages(override, match):
    extra = ["train.zero_stage=0"] if override.startswith("train.offload") else []
    with pytest.raises(RecipeError, match=match):
        recipe(override, *extra)


def test_test_split_selection_is_allowed_only_explicitly():
    r = recipe("train.best_metric=test/mAP", "train.allow_test_selection=true", "data.test=/data/test")
    assert r.train.best_metric == "test/mAP"
    with pytest.raises(RecipeError, match="needs data.test"):
        recipe("train.best_metric=test/mAP", "train.allow_test_selection=true")


def test_train_cli_reports_bad_keys_without_traceback(capsys):
    from af_train.train import main

    assert main(["--recipe", str(TINY), "train.bogus=1"]) == 2
    assert "unknown key 'train.bogus'" in capsys.readouterr().err
    assert main(["--recipe", "/nonexistent.yaml"]) == 2


def test_lr_schedule_warmup_then_decay():
    cosine = LRSchedule(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), total_steps=104)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == pytest.approx(1.0)
    assert cosine(54) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(104) == pytest.approx(0.1) and cosine(500) == pytest.approx(0.1)
    linear = LRSchedule(OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0), total_steps=10)
    assert [round(linear(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert LRSchedule(OptimConfig(warmup_steps=2, schedule="constant"), 10)(7) == 1.0
    # the torch scheduler stores only its step count, so a longer max_steps on resume takes effect
    param = torch.nn.Parameter(torch.zeros(1))
    scheduler = build_lr_scheduler(torch.optim.SGD([param], lr=1.0), OptimConfig(warmup_steps=0), 10)
    assert "lr_lambdas" not in scheduler.state_dict() or scheduler.state_dict()["lr_lambdas"] == [None]


def test_no_weight_decay_for_norms_biases_and_frozen_parameters():
    module = torch.nn.Module()
    module.dense = torch.nn.Linear(4, 4)
    module.LayerNorm = torch.nn.LayerNorm(4)
    module.frozen = torch.nn.Linear(4, 4)
    module.frozen.requires_grad_(False)
    groups = optimizer_groups(module, weight_decay=0.1)
    with_decay, without_decay = groups
    assert with_decay["weight_decay"] == 0.1 and [p.shape for p in with_decay["params"]] == [(4, 4)]
    # dense.bias, LayerNorm weight + bias
    assert without_decay["weight_decay"] == 0.0 and len(without_decay["params"]) == 3
    frozen_ids = {id(p) for p in module.frozen.parameters()}
    assert not frozen_ids & {id(p) for g in groups for p in g["params"]}
    with pytest.raises(ValueError, match="no trainable parameters"):
        optimizer_groups(module.frozen, 0.1)


def test_metrics_log_truncates_steps_after_the_resume_point(tmp_path):
    logger = RunLogger(tmp_path, enabled=True, resume_step=None)
    for step in range(1, 6):
        logger.log({"step": step, "loss": 1.0 / step, "val/mAP": float("nan")})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # a line cut by kill -9
    RunLogger(tmp_path, enabled=True, resume_step=3).close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["val/mAP"] is None


def test_peak_table_gives_each_gpu_its_own_row(monkeypatch):
    """Every row is reached by the GPU it names (a shorter key listed first would catch L40S as L40,
    A10G as A10), and known GPUs, named as torch reports them, get NVIDIA's datasheet dense peaks
    (bf16 tensor core, fp32 without TF32) in FLOP/s."""
    gpu = torch.device("cuda", 0)

    def peak_of(name: str, precision: str) -> float | None:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
        return peak_flops_per_device(gpu, precision, None)[0]

    for key, half, fp32 in PEAK_FLOPS:
        assert (peak_of(f"NVIDIA {key}", "bf16"), peak_of(f"NVIDIA {key}", "fp32")) == (half, fp32), key
    datasheet = {"NVIDIA H100 80GB HBM3": (989.4e12, 66.9e12), "NVIDIA H100 PCIe": (756.5e12, 51.2e12),
                 "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12), "NVIDIA L40S": (362.1e12, 91.6e12),
                 "NVIDIA L40": (181.0e12, 90.5e12), "NVIDIA L4": (121.0e12, 30.3e12),
                 "NVIDIA A10": (125.0e12, 31.2e12), "Tesla V100-SXM2-16GB": (125e12, 15.7e12),
                 "Tesla T4": (65e12, 8.1e12)}
    for name, (half, fp32) in datasheet.items():
        assert peak_of(name, "bf16") == pytest.approx(half, rel=1e-3), name
        assert peak_of(name, "fp32") == pytest.approx(fp32, rel=1e-3), name
    assert peak_of("NVIDIA GeForce GTX 1080", "bf16") is None
    assert "'NVIDIA GeForce GTX 1080' is not in the peak FLOP/s table" in peak_flops_per_device(gpu, "bf16", None)[1]
    assert peak_flops_per_device(gpu, "bf16", 2e14) == (2e14, "peak 2e+14 FLOP/s per device from train.peak_flops")
    peak, note = peak_flops_per_device(torch.device("cpu"), "bf16", None)
    assert peak is None and "device is cpu" in note


def test_training_flops_count_real_tokens_masked_head_and_frozen_rows():
    from af_train.model import AudioFormerConfig

    base = AudioFormerConfig.preset("base")
    encoder = encoder_forward_flops_per_token(768, 12, 3072, seq_len=752)
    head = 2.0 * (768 * 768 + 768 * base.vocab_size)
    pretrain = Recipe.load(REPO / "recipes" / "pretrain_audioset2m_row0.yaml")
    assert pretrain.data.mask_rate == 0.25
    assert training_flops_per_token(pretrain, base, 752, base.vocab_size) == pytest.approx(3 * (encoder + 0.25 * head))
    ft1 = Recipe.load(REPO / "recipes" / "ft1_audioset20k.yaml")
    assert training_flops_per_token(ft1, base, 752, base.vocab_size) == pytest.approx(3 * encoder)
    # FT2 over 4 rows: per token of the batch, the trainable row costs 3 forwards, each frozen row 1
    ft2 = Recipe.load(REPO / "recipes" / "ft2_audioset20k_stage1.yaml")
    assert len(ft2.data.code_rows) == 4
    assert training_flops_per_token(ft2, base, 752, base.vocab_size) == pytest.approx((3 + 3) * encoder / 4)


def test_af_train_launcher_command(capsys):
    from af_train.train import launch_main

    assert launch_main(["--num_cpu_ranks", "2", "--master_port", "29999", "--dry-run", "--recipe", "r.yaml",
                        "train.max_steps=5"]) == 0
    line = capsys.readouterr().out
    for part in ("--no_ssh", "--num_gpus 2", "--master_port 29999", "--module af_train.train", "--recipe r.yaml",
                 "train.max_steps=5"):
        assert part in line, line
    assert launch_main(["--hostfile", "hosts", "--dry-run", "--recipe", "r.yaml"]) == 0
    line = capsys.readouterr().out
    assert "--hostfile hosts" in line and "--no_ssh" not in line
    assert launch_main(["--hostfile", "hosts", "--no_ssh", "--node_rank", "1", "--master_addr", "node-a",
                        "--dry-run", "--recipe", "r.yaml"]) == 0
    line = capsys.readouterr().out
    assert "--hostfile hosts --no_ssh --node_rank 1 --master_addr node-a" in line


@pytest.mark.parametrize("argv, message", [
    (["--no_ssh"], "--no_ssh is for multi-node runs with --hostfile"),
    (["--hostfile", "h", "--no_ssh", "--master_addr", "a"], "--no_ssh needs --node_rank N"),
    (["--hostfile", "h", "--no_ssh", "--node_rank", "0"], "--no_ssh needs --node_rank N"),
    (["--hostfile", "h", "--node_rank", "1"], "--node_rank only applies with --hostfile --no_ssh"),
])
def test_af_train_launcher_refuses_incomplete_multi_node_flags(argv, message, capsys):
    from af_train.train import launch_main

    with pytest.raises(SystemExit):
        launch_main([*argv, "--dry-run", "--recipe", "r.yaml"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_documents_itself(path):
    r = Recipe.load(path)
    header = path.read_text().splitlines()[:12]
    assert header[0].startswith("#"), f"{path.name} needs a header comment"
    text = "\n".join(header).lower()
    for topic in ("reproduces", "data", "cost"):
        assert topic in text, f"{path.name}: header should say what it {topic}"
    assert r.train.max_steps >= 1 and not math.isnan(r.optim.lr)
