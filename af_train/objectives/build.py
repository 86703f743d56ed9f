"""Building a recipe's training module: ``build_training_module(recipe, num_classes, multi_label, tokenizer)``.

Modes and the checkpoints they need:

- ``pretrain``: MLM on row ``data.code_rows[0]`` (RoFormer MLM head, tied to the word embeddings
  unless ``model.tie_word_embeddings=false``), evaluated on masked positions only. With
  ``objective.joint_rows``: one shared encoder reads every row, a learned code-row embedding (the
  token-type table, indexed by codebook row) is added, MLM runs on all rows and
  ``objective.mpc_weight`` x MPC pulls together the rows of the same clip. Needs no checkpoint
  (``objective.init_checkpoint`` optionally continues from one).
- ``ft1``: mean-pooled row ``code_rows[0]`` -> linear classifier; BCE-with-logits when the manifest is
  multi-label, cross-entropy otherwise. The encoder starts from ``objective.init_checkpoint``
  (encoder checkpoint or module weights; a matching classifier in module weights is loaded too);
  without one it starts from random weights (logged).
- ``ft2``: ft1 plus MPC. Rows ``code_rows[1:]`` each go through their own encoder loaded from
  ``objective.frozen_row_checkpoints`` (one per row, required), frozen: eval mode even under
  ``.train()``, no grad, ``requires_grad=False`` so no optimizer state. Every clip's pooled
  embeddings over all rows form one group; anchors are the trainable row's embeddings.
  loss = alpha * classification + (1 - alpha) * MPC(temperature); ``use_classifier=false``: MPC only.

``tokenizer`` is the identity of the tokenizer that made the training shards (their manifest's
``tokenizer``): the vocabulary follows its codebook size, and a checkpoint recorded as trained on
another tokenizer's codes is refused with an error naming both.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn

from af_train.config import Recipe
from af_train.distributed import world_size
from af_train.model import (
    AudioFormerConfig,
    RoFormerEncoder,
    load_encoder,
    load_encoder_weights,
    read_checkpoint,
)
from af_train.model.checkpoint import (
    MODULE_FORMAT,
    CheckpointError,
    check_and_load_state,
    encoder_state_from_checkpoint,
)
from af_train.objectives.modules import FineTuneModule, PretrainModule
from af_train.shards import LabelsMismatch, check_same_labels
from af_train.tokenizers.base import TokenizerError, check_same_tokenizer
from af_train.tokens import SpecialTokens

log = logging.getLogger(__name__)


def _check_checkpoint_tokenizer(recorded: dict | None, tokenizer: dict | None, what: str) -> None:
    """A checkpoint trained on another tokenizer's codes cannot continue on these shards."""
    try:
        check_same_tokenizer(recorded, tokenizer, what, "the training data (data.train's manifest)")
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None


def _load_init_checkpoint(path: str, config: AudioFormerConfig, code_row: int,
                          kernels: str, tokenizer: dict | None = None) -> tuple[RoFormerEncoder, dict]:
    """Trainable encoder from ``objective.init_checkpoint`` (recipe sizes, checkpoint's row-embedding setup)."""
    try:
        payload = read_checkpoint(path)
        _check_checkpoint_tokenizer(payload.get("tokenizer"), tokenizer, f"objective.init_checkpoint '{path}'")
        ckpt_config, _, ckpt_row = encoder_state_from_checkpoint(payload, path)
        # How rows are embedded is decided at pretraining; sizes come from the recipe and must match.
        config = dataclasses.replace(
            config, row_embedding=ckpt_config.row_embedding, type_vocab_size=ckpt_config.type_vocab_size
        )
        encoder = RoFormerEncoder(config, kernels)
        load_encoder_weights(encoder, path, payload)
    except CheckpointError as exc:
        raise CheckpointError(f"objective.init_checkpoint: {exc}") from None
    if ckpt_row is not None and ckpt_row != code_row:
        log.warning("objective.init_checkpoint '%s' was pretrained on code row %s but fine-tunes row %s",
                    path, ckpt_row, code_row)
    log.info("encoder initialised from %s (row %s)", path, ckpt_row)
    return encoder, payload


def _load_frozen_rows(recipe: Recipe, trainable: RoFormerEncoder,
                      tokenizer: dict | None = None) -> list[RoFormerEncoder]:
    rows = recipe.data.code_rows[1:]
    paths = recipe.objective.frozen_row_checkpoints
    if len(paths) != len(rows):
        raise CheckpointError(
            f"objective.mode=ft2 needs one entry in objective.frozen_row_checkpoints per frozen code row "
            f"{rows} (data.code_rows[1:]); got {len(paths)}: {paths}"
        )
    frozen = []
    for row, path in zip(rows, paths):
        try:
            encoder = load_encoder(path, recipe.model.kernels, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, activation_checkpointing=False)
        except CheckpointError as exc:
            raise CheckpointError(f"objective.frozen_row_checkpoints (row {row}): {exc}") from None
        _check_checkpoint_tokenizer(encoder.tokenizer, tokenizer,
                                    f"objective.frozen_row_checkpoints '{path}' (row {row})")
        if encoder.code_row is not None and encoder.code_row != row:
            raise CheckpointError(
                f"objective.frozen_row_checkpoints: '{path}' was pretrained on code row {encoder.code_row} but is "
                f"listed for row {row}; order the checkpoints as data.code_rows[1:] = {rows}"
            )
        if encoder.config.hidden_size != trainable.config.hidden_size:
            raise CheckpointError(
                f"objective.frozen_row_checkpoints: '{path}' has hidden_size {encoder.config.hidden_size}, the "
                f"trainable encoder {trainable.config.hidden_size}; MPC compares embeddings of equal width"
            )
        frozen.append(encoder)
    return frozen


def build_training_module(recipe: Recipe, num_classes: int, multi_label: bool,
                          tokenizer: dict[str, Any] | None = None, labels: list[str] | None = None) -> nn.Module:
    """The module that ``recipe.objective.mode`` trains (see the module docstring); ``tokenizer``: the
    training shards' tokenizer identity (vocabulary size, checkpoint compatibility); ``labels``: their
    class list (a fine-tuned ``init_checkpoint`` recorded with another list is refused)."""
    codebook_size = int((tokenizer or {}).get("codes") or SpecialTokens().codebook_size)
    config = AudioFormerConfig.from_recipe(recipe.model, codebook_size)
    kernels = recipe.model.kernels
    negatives = recipe.objective.mpc_negatives or ("global" if world_size() > 1 else "local")
    objective = recipe.objective
    rows = recipe.data.code_rows

    if objective.mode == "pretrain":
        if len(rows) > 1 and not objective.joint_rows:
            log.warning("pretraining reads only code row %s; data.code_rows=%s loads %d unused row(s)",
                        rows[0], rows, len(rows) - 1)
        module = PretrainModule(config, rows, objective.joint_rows, objective.mpc_weight, objective.temperature,
                                kernels, negatives)
        if objective.init_checkpoint:
            try:
                payload = read_checkpoint(objective.init_checkpoint)
                _check_checkpoint_tokenizer(payload.get("tokenizer"), tokenizer,
                                            f"objective.init_checkpoint '{objective.init_checkpoint}'")
                load_encoder_weights(module.encoder, objective.init_checkpoint, payload)
            except CheckpointError as exc:
                raise CheckpointError(f"objective.init_checkpoint: {exc}") from None
            _maybe_load_head(module, payload, "mlm_head", objective.init_checkpoint)
        return module

    if objective.mode == "ft1" and (len(rows) > 1 or objective.frozen_row_checkpoints):
        log.warning("ft1 reads only code row %s; data.code_rows=%s and objective.frozen_row_checkpoints=%s are "
                    "not used (they are for mode=ft2)", rows[0], rows, objective.frozen_row_checkpoints)
    if objective.init_checkpoint:
        encoder, payload = _load_init_checkpoint(objective.init_checkpoint, config, rows[0], kernels, tokenizer)
    else:
        log.warning("objective.mode=%s without objective.init_checkpoint: the encoder starts from random "
                    "weights (no pretraining)", objective.mode)
        encoder, payload = RoFormerEncoder(config, kernels), None
    frozen = _load_frozen_rows(recipe, encoder, tokenizer) if objective.mode == "ft2" else []
    use_classifier = objective.use_classifier or objective.mode == "ft1"
    module = FineTuneModule(
        encoder, num_classes, multi_label, rows[: 1 + len(frozen)], frozen,
        use_classifier=use_classifier, alpha=objective.alpha, temperature=objective.temperature,
        mixup_prob=objective.mixup.prob, mixup_alpha=objective.mixup.alpha,
        mpc_negatives=negatives, drop_shared_label_negatives=objective.mpc_drop_shared_label_negatives,
    )
    if payload is not None and module.classifier is not None:
        _check_head_labels(payload.get("labels"), labels, objective.init_checkpoint)
        _maybe_load_head(module, payload, "classifier", objective.init_checkpoint)
    return module


def _check_head_labels(recorded: list[str] | None, labels: list[str] | None, path: str) -> None:
    """A classifier continued from ``init_checkpoint`` must mean the same classes in the same order;
    weights without a recorded list (written before lists were stored) are not compared."""
    if recorded is None or labels is None or len(recorded) != len(labels):
        return  # (another class count: the head starts from random weights, logged by _maybe_load_head)
    try:
        check_same_labels(recorded, labels, f"objective.init_checkpoint '{path}'", "the training data "
                          "(data.train's manifest)", "prepare the shards with the checkpoint's class list (its "
                          "--labels file, same order), or fine-tune from an encoder checkpoint without a classifier")
    except LabelsMismatch as exc:
        raise CheckpointError(str(exc)) from None


def _maybe_load_head(module: nn.Module, payload: dict, name: str, path: str) -> None:
    """Continue a head from module weights when the file has one of the same shape (logged either way)."""
    if payload.get("format") != MODULE_FORMAT:
        return
    prefix = f"{name}."
    state = {k[len(prefix):]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
    head = getattr(module, name)
    if not state:
        log.info("%s: no '%s' weights in %s; the head starts from random weights", name, name, path)
        return
    if name == "mlm_head" and "predictions.decoder.weight" not in state:
        state["predictions.decoder.weight"] = module.encoder.embeddings.word_embeddings.weight.detach()
    try:
        check_and_load_state(head, state, f"'{path}'")
    except CheckpointError as exc:
        log.warning("%s not loaded from %s (starts from random weights): %s", name, path, exc)
        return
    log.info("%s loaded from %s", name, path)
