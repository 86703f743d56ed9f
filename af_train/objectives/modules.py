"""The loss maths of each objective: ``PretrainModule`` (MLM, joint-row MLM + MPC) and ``FineTuneModule``
(FT1 classification, FT2 classification + MPC against frozen row encoders).

``forward(batch) -> {"loss": scalar, "logs": {name: float tensor}, "terms": {name: LossTerm}, ...}``
(normalisation: ``af_train.objectives.terms``); ft1/ft2 also return ``scores`` [B, C] (logits) for
evaluation and ``embeddings`` [B, H] (pooled trainable row).

Batches (from ``af_train.data``): ``input_ids`` [B, R, T] with R = len(data.code_rows) in recipe
order, ``attention_mask`` [B, T], ``mlm_labels`` [B, R, T] (-100 where not masked; present when the
loader masks), ``labels`` [B, C] multi-hot float or [B] class index.

MPC negatives (``objective.mpc_negatives``): ``local`` contrasts each anchor with its own rank's
micro batch; ``global`` (the default when the world size is > 1) gathers the embeddings of every
rank's micro batch with ``af_train.distributed.gather_rows`` (differentiable: the gradient of each
gathered copy is summed over ranks and returned to its owner once), so every clip of the global
micro batch is a negative. Each rank's anchors are its own clips. Negatives come from the same micro
batch index of the same accumulation step on every rank, never from other micro batches: with
accumulation A, N = global micro batch x rows, not global batch x rows. Evaluation
(``module.eval()``) uses local negatives. ``logs["mpc_n"]`` reports N, the embeddings each anchor is
contrasted with (itself included).

``objective.mpc_drop_shared_label_negatives`` (FT2, off by default, not in the paper): an anchor's MPC
denominator leaves out the rows of other clips that share a class with the anchor's clip (on multi-label
data many negatives do). Off, the loss is the paper's and every number is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from af_train.augment import draw_mixup
from af_train.distributed import gather_rows, world_size
from af_train.model import AudioFormerConfig, ClassificationHead, MLMHead, RoFormerEncoder, masked_mean_pool
from af_train.objectives.terms import LossTerm
from af_train.tokens import IGNORE_INDEX
from kernels import dispatch


class BatchError(ValueError):
    """A batch that does not fit the objective (missing key, wrong shape)."""


def _require_key(batch: dict[str, Any], key: str, why: str) -> torch.Tensor:
    if key not in batch:
        raise BatchError(f"batch has no '{key}' ({why}); keys present: {', '.join(sorted(batch))}")
    return batch[key]


def _check_rows(input_ids: torch.Tensor, rows: int, what: str) -> None:
    if input_ids.dim() != 3:
        raise BatchError(f"input_ids must be [batch, rows, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] < rows:
        raise BatchError(
            f"{what} needs {rows} code row(s) per clip but input_ids has {input_ids.shape[1]} "
            "(data.code_rows must list the rows in the order the objective uses them)"
        )


def row_type_ids(encoder: RoFormerEncoder, code_row: int | None, like: torch.Tensor) -> torch.Tensor | None:
    """Token-type ids carrying the codebook row, for encoders pretrained with row embeddings."""
    if not encoder.config.row_embedding:
        return None
    if code_row is None or code_row >= encoder.config.type_vocab_size:
        raise ValueError(
            f"this encoder has row embeddings for rows 0..{encoder.config.type_vocab_size - 1}; "
            f"it cannot read code row {code_row}"
        )
    return torch.full_like(like, code_row)


def _mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over masked positions and masked-token accuracy (0-loss when none are masked)."""
    if targets.numel() == 0:
        zero = logits.float().sum() * 0.0  # keeps the graph, so every rank still runs backward
        return zero, zero.detach()
    loss = F.cross_entropy(logits.float(), targets)
    accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return loss, accuracy.detach()


def _mlm_terms(loss: torch.Tensor, accuracy: torch.Tensor, targets: torch.Tensor) -> dict[str, LossTerm]:
    """MLM loss and accuracy as sums over this micro batch's masked tokens (see ``terms``)."""
    n = targets.numel()
    return {"mlm_loss": LossTerm(loss * n, "masked_tokens", 1.0),
            "mlm_accuracy": LossTerm(accuracy * n, "masked_tokens", 0.0)}


def _count(targets: torch.Tensor) -> torch.Tensor:
    # on the loss's device, so that the engine can all-reduce the logs as they are
    return torch.tensor(float(targets.numel()), device=targets.device)


def _detached(logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in logs.items()}


def _contrast(module: nn.Module, embeddings: torch.Tensor, groups: torch.Tensor, anchors: torch.Tensor,
              rows: int, row_classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(MPC loss over this rank's ``anchors``, N). ``embeddings`` [B * rows, D] clip-major, ``groups``
    the local clip of each row; with global negatives every rank's rows join, clips renumbered.
    ``row_classes`` [B * rows, C] (bool, the classes of each row's clip): given, the rows of other clips
    that share a class with the anchor's clip are left out of its denominator
    (``mpc_loss_dropping_shared_label_negatives``)."""
    if module.mpc_negatives == "global" and module.training and world_size() > 1:
        embeddings, start = gather_rows(embeddings)
        if row_classes is not None:
            row_classes, _ = gather_rows(row_classes.to(embeddings.dtype))
        n = embeddings.shape[0]
        groups = torch.arange(n // rows, device=embeddings.device).repeat_interleave(rows)
        mine = anchors.new_zeros(n)
        mine[start: start + anchors.shape[0]] = anchors  # anchors: this rank's rows only
        anchors = mine
    n_rows = torch.tensor(float(embeddings.shape[0]), device=embeddings.device)
    if row_classes is not None:
        return mpc_loss_dropping_shared_label_negatives(embeddings, groups, row_classes, module.temperature,
                                                        anchors), n_rows
    return dispatch.mpc_loss(embeddings, groups, module.temperature, anchors, backend=module.encoder.kernels), n_rows


def mpc_loss_dropping_shared_label_negatives(embeddings: torch.Tensor, groups: torch.Tensor, row_classes: torch.Tensor,
                                             temperature: float, anchor_mask: torch.Tensor) -> torch.Tensor:
    """The MPC loss of ``kernels.reference.mpc_loss`` (docs/ARCHITECTURE.md, "Kernel formulas") with one change,
    ``objective.mpc_drop_shared_label_negatives``: anchor i's denominator leaves out the rows of every other
    clip that shares a class with i's clip (``row_classes`` [N, C], the classes of each row's clip). The paper
    contrasts every other clip as a negative; on multi-label data many of them share a class with the anchor.
    In PyTorch, on every device (the N x N similarities are materialised; N = micro batch x ranks x rows)."""
    n = embeddings.shape[0]
    compute = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    z = F.normalize(embeddings.to(compute), dim=-1)
    logits = (z @ z.t()) / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    same_clip = groups[:, None] == groups[None, :]
    classes = row_classes.to(compute)
    shares_a_class = (classes @ classes.t()) > 0
    log_denominator = torch.logsumexp(logits.masked_fill(eye | (shares_a_class & ~same_clip), float("-inf")), dim=1)
    positives = same_clip & ~eye
    num_pos = positives.sum(dim=1)
    per_anchor = log_denominator - (logits * positives).sum(dim=1) / num_pos.clamp(min=1)
    valid = (num_pos > 0) & anchor_mask.to(torch.bool)
    if not bool(valid.any()):
        return (logits.sum() * 0.0).to(compute)
    return per_anchor[valid].mean()


# --------------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------------


class PretrainModule(nn.Module):
    """MLM on one code row, or joint multi-row MLM + MPC with a shared encoder."""

    def __init__(
        self,
        config: AudioFormerConfig,
        code_rows: list[int],
        joint_rows: bool = False,
        mpc_weight: float = 0.1,
        temperature: float = 0.05,
        kernels: str = "auto",
        mpc_negatives: str = "local",
    ) -> None:
        super().__init__()
        if joint_rows:
            needed = max(code_rows) + 1
            config = dataclasses.replace(
                config, row_embedding=True, type_vocab_size=max(config.type_vocab_size, needed)
            )
        self.code_rows = list(code_rows)
        self.joint_rows = joint_rows
        self.mpc_weight = mpc_weight
        self.temperature = temperature
        self.mpc_negatives = mpc_negatives
        # what save_module_weights records: the row this encoder reads (None: several rows)
        self.code_row = None if joint_rows else code_rows[0]
        self.encoder = RoFormerEncoder(config, kernels)
        self.mlm_head = MLMHead(config, self.encoder.embeddings.word_embeddings)

    def loss_counts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What the loss terms are divided by, from the batch alone (see the module docstring)."""
        mlm_labels = _require_key(batch, "mlm_labels", "pretraining needs a loader built with mask=True")
        rows = len(self.code_rows) if self.joint_rows else 1
        counts = {"masked_tokens": (mlm_labels[:, :rows] != IGNORE_INDEX).sum()}
        if self.joint_rows and self.mpc_weight > 0:
            counts["mpc_anchors"] = torch.tensor(mlm_labels.shape[0] * rows, device=mlm_labels.device)
        return counts

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        input_ids = _require_key(batch, "input_ids", "token ids [B, R, T]")
        attention_mask = _require_key(batch, "attention_mask", "[B, T]")
        mlm_labels = _require_key(batch, "mlm_labels", "pretraining needs a loader built with mask=True")
        rows = len(self.code_rows) if self.joint_rows else 1
        _check_rows(input_ids, rows, "pretraining" + (" with joint_rows" if self.joint_rows else ""))
        if mlm_labels.shape != input_ids.shape:
            raise BatchError(f"mlm_labels {list(mlm_labels.shape)} must match input_ids {list(input_ids.shape)}")
        batch_size, _, seq = input_ids.shape
        if not self.joint_rows:
            row_ids = input_ids[:, 0]
            hidden = self.encoder(row_ids, attention_mask, row_type_ids(self.encoder, self.code_row, row_ids))
            logits, targets = self.mlm_head(hidden, mlm_labels[:, 0])
            loss, accuracy = _mlm_loss(logits, targets)
            logs = {"mlm_loss": loss, "mlm_accuracy": accuracy, "masked_tokens": _count(targets)}
            return {"loss": loss, "logs": _detached(logs), "terms": _mlm_terms(loss, accuracy, targets)}

        # Joint rows: clip b, row r -> sequence b * R + r of one flat batch.
        flat_ids = input_ids[:, :rows].reshape(batch_size * rows, seq)
        flat_mask = attention_mask.repeat_interleave(rows, dim=0)
        row_index = torch.tensor(self.code_rows, device=input_ids.device).repeat(batch_size)
        type_ids = row_index[:, None].expand(-1, seq)
        hidden = self.encoder(flat_ids, flat_mask, type_ids)
        logits, targets = self.mlm_head(hidden, mlm_labels[:, :rows].reshape(batch_size * rows, seq))
        mlm, accuracy = _mlm_loss(logits, targets)
        logs = {"mlm_loss": mlm, "mlm_accuracy": accuracy, "masked_tokens": _count(targets)}
        terms = _mlm_terms(mlm, accuracy, targets)
        loss = mlm
        if self.mpc_weight > 0:
            pooled = masked_mean_pool(hidden, flat_mask)
            groups = torch.arange(batch_size, device=input_ids.device).repeat_interleave(rows)
            anchors = torch.ones(batch_size * rows, dtype=torch.bool, device=input_ids.device)
            mpc, logs["mpc_n"] = _contrast(self, pooled, groups, anchors, rows)
            loss = mlm + self.mpc_weight * mpc
            logs["mpc_loss"] = mpc
            terms["mpc_loss"] = LossTerm(mpc * (batch_size * rows), "mpc_anchors", self.mpc_weight)
        return {"loss": loss, "logs": _detached(logs), "terms": terms}


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------


class FineTuneModule(nn.Module):
    """FT1 (classification) and FT2 (classification + MPC against frozen row encoders)."""

    def __init__(
        self,
        encoder: RoFormerEncoder,
        num_classes: int,
        multi_label: bool,
        code_rows: list[int],
        frozen_encoders: list[RoFormerEncoder] | None = None,
        use_classifier: bool = True,
        alpha: float = 0.8,
        temperature: float = 0.05,
        mixup_prob: float = 0.0,
        mixup_alpha: float = 0.5,
        mpc_negatives: str = "local",
        drop_shared_label_negatives: bool = False,
    ) -> None:
        super().__init__()
        frozen_encoders = list(frozen_encoders or [])
        self.mixup_prob, self.mixup_alpha = mixup_prob, mixup_alpha  # objective.mixup (training only)
        if not use_classifier and not frozen_encoders:
            raise ValueError("a fine-tuning module without classifier needs frozen row encoders (MPC only)")
        if frozen_encoders and len(frozen_encoders) != len(code_rows) - 1:
            raise ValueError(
                f"{len(frozen_encoders)} frozen encoder(s) for {len(code_rows) - 1} extra code row(s) {code_rows[1:]}"
            )
        self.encoder = encoder
        self.code_rows = list(code_rows)
        self.code_row = code_rows[0]
        self.num_classes = num_classes
        self.multi_label = multi_label
        self.alpha = alpha if use_classifier else 0.0
        self.temperature = temperature
        self.mpc_negatives = mpc_negatives
        self.drop_shared_label_negatives = drop_shared_label_negatives  # objective.mpc_drop_shared_label_negatives
        self.classifier = ClassificationHead(encoder.config, num_classes) if use_classifier else None
        for frozen in frozen_encoders:
            if frozen.config.hidden_size != encoder.config.hidden_size:
                raise ValueError(
                    f"MPC compares pooled embeddings across rows: a frozen encoder has hidden_size "
                    f"{frozen.config.hidden_size}, the trainable one {encoder.config.hidden_size}"
                )
            frozen.requires_grad_(False)
            frozen.eval()
        self.frozen_encoders = nn.ModuleList(frozen_encoders)

    def train(self, mode: bool = True) -> FineTuneModule:
        super().train(mode)
        for frozen in self.frozen_encoders:
            frozen.eval()  # frozen rows never see dropout, whatever the parent's mode
        return self

    def _check_labels(self, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self.multi_label:
            if labels.shape != (batch_size, self.num_classes):
                raise BatchError(
                    f"multi-label targets must be multi-hot [batch, classes] = {[batch_size, self.num_classes]}, "
                    f"got {list(labels.shape)}"
                )
            return labels.float()
        if labels.shape != (batch_size,) or labels.is_floating_point():
            raise BatchError(
                f"single-label targets must be class indices [batch] = [{batch_size}] (integer), "
                f"got {list(labels.shape)} {labels.dtype}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise BatchError(f"class index out of range [0, {self.num_classes}): {labels.tolist()}")
        return labels.long()

    def loss_counts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What the loss terms are divided by: the clips (classification and the MPC anchors)."""
        input_ids = _require_key(batch, "input_ids", "token ids [B, R, T]")
        return {"clips": torch.tensor(input_ids.shape[0], device=input_ids.device)}

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        input_ids = _require_key(batch, "input_ids", "token ids [B, R, T]")
        attention_mask = _require_key(batch, "attention_mask", "[B, T]")
        rows = 1 + len(self.frozen_encoders)
        _check_rows(input_ids, rows, "ft2" if self.frozen_encoders else "ft1")
        batch_size = input_ids.shape[0]
        row_ids = input_ids[:, 0]
        mix = draw_mixup(self.mixup_prob, self.mixup_alpha) if self.training and self.mixup_prob > 0 else None
        mix_inputs = mix.inputs if mix is not None else None
        if mix is not None:
            attention_mask = mix.attention_mask(attention_mask)
        hidden = self.encoder(row_ids, attention_mask, row_type_ids(self.encoder, self.code_row, row_ids),
                              embedding_mix=mix_inputs)
        pooled = masked_mean_pool(hidden, attention_mask)
        out: dict[str, Any] = {"embeddings": pooled}
        logs: dict[str, torch.Tensor] = {}
        terms: dict[str, LossTerm] = {}
        loss = pooled.new_zeros((), dtype=torch.float32)
        clip_classes = None  # [B, C] bool: the classes each clip is trained on (MPC's shared-label option)

        if self.classifier is not None:
            scores = self.classifier(pooled)
            out["scores"] = scores
            if "labels" in batch:
                labels = self._check_labels(batch["labels"], batch_size)
                targets = labels if mix is None else mix.targets(labels, self.num_classes, self.multi_label)
                if self.drop_shared_label_negatives:
                    clip_classes = (targets > 0) if targets.dim() == 2 else F.one_hot(targets, self.num_classes) > 0
                if self.multi_label:
                    cls_loss = F.binary_cross_entropy_with_logits(scores.float(), targets)
                else:
                    cls_loss = F.cross_entropy(scores.float(), targets)  # class indices, or mixup's soft targets
                    logs["accuracy"] = (scores.argmax(dim=-1) == labels).float().mean()
                    terms["accuracy"] = LossTerm(logs["accuracy"].detach() * batch_size, "clips", 0.0)
                logs["cls_loss"] = cls_loss
                weight = self.alpha if self.frozen_encoders else 1.0
                terms["cls_loss"] = LossTerm(cls_loss * batch_size, "clips", weight)
                loss = loss + self.alpha * cls_loss if self.frozen_encoders else cls_loss
            elif self.training:
                raise BatchError("fine-tuning needs 'labels' in training batches")

        if self.frozen_encoders:
            pooled_rows = [pooled]
            with torch.no_grad():
                for index, frozen in enumerate(self.frozen_encoders):
                    ids = input_ids[:, index + 1]
                    types = row_type_ids(frozen, self.code_rows[index + 1], ids)
                    hidden_row = frozen(ids, attention_mask, types, embedding_mix=mix_inputs)
                    pooled_rows.append(masked_mean_pool(hidden_row, attention_mask))
            # clip b, row r -> b * R + r; anchors: the trainable row (r = 0)
            embeddings = torch.stack([p.to(pooled.dtype) for p in pooled_rows], dim=1).reshape(batch_size * rows, -1)
            groups = torch.arange(batch_size, device=pooled.device).repeat_interleave(rows)
            anchors = (torch.arange(batch_size * rows, device=pooled.device) % rows) == 0
            row_classes = clip_classes.repeat_interleave(rows, dim=0) if clip_classes is not None else None
            mpc, logs["mpc_n"] = _contrast(self, embeddings, groups, anchors, rows, row_classes)
            logs["mpc_loss"] = mpc
            terms["mpc_loss"] = LossTerm(mpc * batch_size, "clips", 1.0 - self.alpha)
            loss = loss + (1.0 - self.alpha) * mpc

        out["loss"] = loss
        out["logs"] = _detached(logs)
        out["terms"] = terms
        return out
