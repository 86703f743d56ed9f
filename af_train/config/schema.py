"""The recipe schema: one dataclass per section, checked by the strict loader (``af_train.config.loader``).

A recipe is the single source of truth for a run. Sections are owned by the layer that consumes
them (``data`` by ``af_train.data``, ``model`` and ``objective`` by ``af_train.model`` /
``af_train.objectives``, ``optim`` / ``train`` / ``deepspeed`` by the engine). The resolved recipe
can be dumped back to YAML (``Recipe.to_yaml``) and is written into every run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from af_train.config.loader import RecipeError, apply_overrides, build_dataclass, numbers_from_yaml, to_plain


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RecipeError(message)


@dataclass
class StreamConfig:
    """One data set of a training mixture (``data.train`` given as a list): a streaming ``Stream``.

    ``proportion`` (relative: given for every entry or none), ``repeat`` (times per epoch, may be
    fractional) or ``choose`` (samples per epoch); none of them: each clip once per epoch.
    """

    path: str | None = None  # local shard directory
    remote: str | None = None  # or a remote one (s3://...), cached under data.local_cache / the run
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None

    def validate(self) -> None:
        _require((self.path is None) != (self.remote is None),
                 f"a data.train entry needs exactly one of path or remote, got path={self.path!r} "
                 f"remote={self.remote!r}")
        weights = [k for k in ("proportion", "repeat", "choose") if getattr(self, k) is not None]
        _require(len(weights) <= 1, f"a data.train entry takes at most one of proportion, repeat, choose; got "
                 f"{', '.join(weights)} for {self.path or self.remote!r}")
        for key in weights:
            _require(getattr(self, key) > 0, f"data.train entry {self.path or self.remote!r}: {key} must be > 0")

    @property
    def source(self) -> str:
        return self.path or self.remote or ""


@dataclass
class DataConfig:
    """Where the shards are and how samples become token sequences (consumed by ``af_train.data``)."""

    # shard directory (local path) of the training split, or a mixture: a list of StreamConfig entries
    train: str | list[StreamConfig] | None = None
    val: str | None = None
    test: str | None = None
    code_rows: list[int] = field(default_factory=lambda: [0])  # which codebook rows to read
    max_length: int = 752  # tokens per sequence including BOA/EOA (750 frames + 2)
    add_boa: bool = True
    add_eoa: bool = True
    mask_rate: float = 0.25
    mask_token_fraction: float = 0.8  # of masked positions: replaced by MASK
    random_token_fraction: float = 0.1  # of masked positions: replaced by a random code; rest unchanged
    shuffle: bool = True
    shuffle_seed: int = 1234
    num_canonical_nodes: int = 1
    num_workers: int = 0
    local_cache: str | None = None  # root for streaming's local cache; default: a dir inside the run
    remote: str | None = None  # remote (e.g. s3://) root mirroring train/val/test, if streaming remotely
    cache_limit: str | None = None  # e.g. "10gb"; streaming evicts shards beyond it
    download_retry: int = 2
    download_timeout: float = 60.0
    predownload: int | None = None
    shuffle_block_size: int | None = None  # samples shuffled together; with cache_limit keep a block's shards cached
    validate_hash: Literal["sha1", "xxh64"] | None = None  # check each downloaded shard against index.json
    dynamic_padding: bool = False  # pad each batch to its longest sequence (multiple of 8), not max_length
    finetune_mask_rate: float = 0.0  # ft1/ft2: fraction of code tokens corrupted as augmentation (train only)
    balanced_sampling: bool = False  # class-balanced sampling of data.train (AudioMAE weights; data.balance)
    balance_buckets: int = 16  # rarity buckets (streams) that approximate the per-clip weights
    balance_power: float = 1.0  # class weight 1 / count ** power: 1 = AudioMAE (every class alike), 0.5 = square root

    def validate(self) -> None:
        _require(0.0 <= self.finetune_mask_rate < 1.0,
                 f"data.finetune_mask_rate must be in [0, 1), got {self.finetune_mask_rate}")
        _require(self.balance_buckets >= 1, f"data.balance_buckets must be >= 1, got {self.balance_buckets}")
        _require(0.0 < self.balance_power <= 1.0,
                 f"data.balance_power must be in (0, 1] (1: AudioMAE's full balancing), got {self.balance_power}")
        if isinstance(self.train, list):
            _require(len(self.train) >= 1, "data.train as a list needs at least one entry")
            relative = [entry.proportion is not None for entry in self.train]
            _require(all(relative) or not any(relative),
                     "data.train: give proportion for every entry or for none (mix it with repeat/choose is not "
                     "possible: proportions are relative, repeat and choose absolute)")
            _require(not self.balanced_sampling, "data.balanced_sampling works on one training data set; "
                     "data.train is a mixture (a list)")
        _require(0.0 <= self.mask_rate < 1.0, f"data.mask_rate must be in [0, 1), got {self.mask_rate}")
        _require(
            0.0 <= self.mask_token_fraction <= 1.0
            and 0.0 <= self.random_token_fraction <= 1.0
            and self.mask_token_fraction + self.random_token_fraction <= 1.0,
            "data.mask_token_fraction and data.random_token_fraction must be in [0, 1] and sum to <= 1, "
            f"got {self.mask_token_fraction} and {self.random_token_fraction}",
        )
        _require(len(self.code_rows) >= 1, "data.code_rows must name at least one codebook row, e.g. [0]")
        _require(all(r >= 0 for r in self.code_rows), f"data.code_rows must be >= 0, got {self.code_rows}")
        _require(self.max_length >= 4, f"data.max_length must be >= 4, got {self.max_length}")
        _require(self.num_canonical_nodes >= 1, "data.num_canonical_nodes must be >= 1")
        _require(self.num_workers >= 0, "data.num_workers must be >= 0")
        _require(self.shuffle_block_size is None or self.shuffle_block_size >= 1,
                 "data.shuffle_block_size must be >= 1")
        _require(self.download_retry >= 1 and self.download_timeout > 0,
                 "data.download_retry must be >= 1 and data.download_timeout > 0 (seconds)")
        _require(self.cache_limit is None or bool(re.fullmatch(r"\d+(\.\d+)?([kmgtp]?b)?", self.cache_limit.lower())),
                 f"data.cache_limit must be a size like '512mb' or '20gb', got {self.cache_limit!r}")


@dataclass
class ModelConfig:
    """Encoder size: a preset of ``af_train.model.AudioFormerConfig`` plus optional overrides."""

    preset: Literal["tiny", "small", "base", "large"] = "tiny"
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    hidden_dropout_prob: float | None = None
    attention_probs_dropout_prob: float | None = None
    activation_checkpointing: bool = False
    tie_word_embeddings: bool = True  # MLM decoder shares the word embeddings (false: untied decoder)
    kernels: Literal["auto", "triton", "reference"] = "auto"

    def overrides(self) -> dict[str, Any]:
        """The non-null size overrides, keyed by AudioFormerConfig field name."""
        skip = {"preset", "activation_checkpointing", "kernels"}
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) is not None
        }


@dataclass
class MixupConfig:
    """Mixup in fine-tuning: with probability ``prob`` a batch is mixed with itself reversed, input
    embeddings and targets alike, by lambda ~ Beta(alpha, alpha) (``af_train.augment``)."""

    prob: float = 0.0  # 0: off
    alpha: float = 0.5

    def validate(self) -> None:
        _require(0.0 <= self.prob <= 1.0, f"objective.mixup.prob must be in [0, 1], got {self.prob}")
        _require(self.alpha > 0.0, f"objective.mixup.alpha must be > 0, got {self.alpha}")


@dataclass
class ObjectiveConfig:
    """What is trained: MLM pretraining, FT1 classification or FT2 classification + MPC."""

    mode: Literal["pretrain", "ft1", "ft2"] = "pretrain"
    joint_rows: bool = False  # pretrain: one shared encoder over all data.code_rows (+ row embedding)
    init_checkpoint: str | None = None  # ft1/ft2: pretrained row-0 encoder (consolidated weights)
    frozen_row_checkpoints: list[str] = field(default_factory=list)  # ft2: one per extra code row
    alpha: float = 0.8  # ft2: weight of classification; (1 - alpha) weights MPC
    temperature: float = 0.05  # ft2 / joint pretraining: MPC temperature
    use_classifier: bool = True  # ft2 stage 2 option: train MPC alone, no classification head
    mpc_weight: float = 0.1  # joint pretraining: weight of the MPC term next to MLM
    mixup: MixupConfig = field(default_factory=lambda: MixupConfig())  # ft1/ft2, training only
    # MPC negatives: each rank's own micro batch (local) or the micro batches of every rank, gathered with
    # their gradients (global); null: global when the world size is > 1
    mpc_negatives: Literal["local", "global"] | None = None
    # ft2, not in the paper (off by default): leave the rows of other clips that share a class with the
    # anchor's clip out of its MPC denominator, instead of pushing them away as negatives
    mpc_drop_shared_label_negatives: bool = False

    def validate(self) -> None:
        _require(0.0 <= self.alpha <= 1.0, f"objective.alpha must be in [0, 1], got {self.alpha}")
        _require(self.temperature > 0.0, f"objective.temperature must be > 0, got {self.temperature}")
        _require(self.mpc_weight >= 0.0, f"objective.mpc_weight must be >= 0, got {self.mpc_weight}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    layer_decay: float | None = None  # per-layer lr scale decay**(depth - layer): embeddings lowest, head 1.0

    def validate(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        _require(self.layer_decay is None or 0.0 < self.layer_decay <= 1.0,
                 f"optim.layer_decay must be in (0, 1] (e.g. 0.75), got {self.layer_decay}")


@dataclass
class ProbeConfig:
    """``train.probe``: a frozen-embedding probe of the encoder during training (``af_train.probe.Prober``):
    fitted on ``dataset``/train, its setting chosen on ``dataset``/val (never test), every ``every`` steps,
    before the first step of a fresh run and at the last. Off while ``dataset`` is null."""

    dataset: str | None = None  # prepared data set with train/ and val/ (local shard directories)
    every: int | None = None  # steps between probes; null: train.eval_every; 0: only the first and last step
    max_clips: int | None = 256  # per split: a seeded subset (af-probe --max-clips picks the same); null: all
    # linear: on held-out speakers the kNN probe stayed flat where the linear one rose (README, "Probes")
    kind: Literal["knn", "linear"] = "linear"
    # hidden state: 0 = embeddings, negative counts from the end; null: the last layer; 'best': every layer probed
    # and the one with the best accuracy (mAP) on the probe's val split reported, with probe/layer
    layer: int | Literal["best"] | None = None
    batch_size: int = 64  # clips per encoder batch
    # the periodic probes are left out while they would take more than this share of the wall time (the first
    # and last probes always run; rank 0's clock decides); null: every probe of train.probe.every runs
    max_time_share: float | None = 0.05

    def validate(self) -> None:
        _require(self.every is None or self.every >= 0, f"train.probe.every must be >= 0, got {self.every}")
        _require(self.max_time_share is None or 0.0 < self.max_time_share <= 1.0,
                 f"train.probe.max_time_share must be in (0, 1] (or null: no budget), got {self.max_time_share}")
        _require(self.max_clips is None or self.max_clips >= 2,
                 f"train.probe.max_clips must be >= 2 (or null: every clip), got {self.max_clips}")
        _require(self.batch_size >= 1, f"train.probe.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    global_batch_size: int | None = None  # if set, must equal micro × accumulation × world size
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: int = 2
    offload_optimizer: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 500
    keep_last: int = 2
    best_metric: str | None = None  # e.g. "val/mAP"; keeps the best checkpoint too
    best_mode: Literal["max", "min"] = "max"
    max_nonfinite_steps: int = 10  # this many skipped steps in a row stops the run
    allow_test_selection: bool = False  # select checkpoints on the test split (refused unless set)
    eval_batch_size: int | None = None  # per rank; default: micro_batch_size
    test_at_end: bool = True  # evaluate data.test after the last step (when data.test is set)
    save_weights_every_checkpoint: bool = False  # also write consolidated model.pt into each checkpoint
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; default: from the device table
    record_sample_ids: bool = False  # write the clip ids of every batch to run_dir/sample_ids/ (debugging)
    ema_decay: float | None = None  # EMA of the trainable weights (e.g. 0.999): evaluated and in final/model.pt
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig())  # frozen-embedding probe (off by default)

    def validate(self) -> None:
        _require(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _require(self.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _require(self.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _require(self.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _require(self.save_every >= 0 and self.eval_every >= 0, "train.save_every and train.eval_every must be >= 0")
        _require(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1")
        _require(self.eval_batch_size is None or self.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
        _require(self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
                 f"train.ema_decay must be in (0, 1) (e.g. 0.999), got {self.ema_decay}")
        _require(self.peak_flops is None or self.peak_flops > 0, "train.peak_flops must be > 0 (FLOP/s per device)")
        _require(not (self.offload_optimizer and self.zero_stage == 0),
                 "train.offload_optimizer needs train.zero_stage >= 1 (DeepSpeed offloads ZeRO optimizer state)")
        if self.global_batch_size is not None:
            per_rank = self.micro_batch_size * self.grad_accum_steps
            _require(self.global_batch_size >= 1 and self.global_batch_size % per_rank == 0,
                     f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                     f"train.micro_batch_size={self.micro_batch_size} x train.grad_accum_steps="
                     f"{self.grad_accum_steps} = {per_rank} (global = micro x accumulation x world size)")
        if self.best_metric is not None:
            split = self.best_metric.split("/", 1)[0]
            _require("/" in self.best_metric and split in ("val", "test", "probe"),
                     f"train.best_metric must name a split and a metric, e.g. 'val/mAP' or 'val/loss' (or "
                     f"'probe/accuracy' with train.probe), got {self.best_metric!r}")
            _require(split != "probe" or self.probe.dataset is not None,
                     f"train.best_metric={self.best_metric!r} needs train.probe.dataset (the probe's data set)")
            _require(split != "probe" or self.best_mode == "max",
                     f"train.best_metric={self.best_metric!r} is a score (higher is better): set train.best_mode=max")
            _require(split != "test" or self.allow_test_selection,
                     f"train.best_metric={self.best_metric!r} selects checkpoints on the test split, which "
                     "leaks test data into model selection; use a val/ metric, or set "
                     "train.allow_test_selection=true to do it anyway (it is recorded in the run)")


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra ds_config keys (conflicts are errors)
    source: str = field(default="<defaults>", compare=False, repr=False, init=False)

    def validate(self) -> None:
        if self.objective.mode == "ft2":
            extra_rows = len(self.data.code_rows) - 1
            _require(
                extra_rows >= 1,
                "objective.mode=ft2 needs data.code_rows with the trainable row first and at least one "
                f"frozen row, e.g. [0, 1, 2, 3]; got {self.data.code_rows}",
            )
        if self.objective.mpc_drop_shared_label_negatives:
            _require(self.objective.mode == "ft2" and self.objective.use_classifier,
                     "objective.mpc_drop_shared_label_negatives applies to mode=ft2 with its classifier (it reads the "
                     f"clips' class labels); got mode={self.objective.mode}, use_classifier="
                     f"{self.objective.use_classifier}")
        if self.objective.joint_rows:
            _require(self.objective.mode == "pretrain", "objective.joint_rows applies to mode=pretrain only")
        if self.objective.mode == "pretrain":
            _require(self.data.finetune_mask_rate == 0.0, "data.finetune_mask_rate applies to ft1/ft2; pretraining "
                     "masks with data.mask_rate")
            _require(self.objective.mixup.prob == 0.0, "objective.mixup applies to ft1/ft2 (it mixes class targets)")
        best = self.train.best_metric
        if best is not None and not best.startswith("probe/"):  # probe/: the probe's own val split
            split = best.split("/", 1)[0]
            _require(getattr(self.data, split, None) is not None or self.data.remote is not None,
                     f"train.best_metric={best!r} needs data.{split} (the shards it is measured on)")

    # -- I/O -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
        recipe = build_dataclass(cls, numbers_from_yaml(data), source)
        recipe.source = source
        return recipe

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        """Load a YAML recipe and apply ``key.sub=value`` overrides."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file '{path}' does not exist; recipes live in recipes/*.yaml")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {exc}") from None
        if overrides:
            if not isinstance(data, dict):
                raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections")
            source = f"{path} (with overrides {' '.join(overrides)})"
            data = apply_overrides(data, overrides)
        else:
            source = str(path)
        return cls.from_dict(data, source)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in to_plain(self).items() if k != "source"}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Stable short hash of the resolved recipe (recorded in checkpoints)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
