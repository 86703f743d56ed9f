"""Loading a trained model for inference: weights, head, and everything needed to feed it audio.

Three sources, one result (``LoadedModel``):

- a run directory (holds ``config.yaml``): the checkpoint selected on validation (``checkpoints/best``)
  by default, else the final weights; ``checkpoint=`` / ``weights=`` pick another;
- consolidated module weights (``final/model.safetensors`` or ``final/model.pt``, ``af_train.module/1``)
  plus the shard directory (or its ``manifest.json``) the model was trained on;
- an ``af-export-hf`` directory, which carries the same information in ``af_train_inference.json``.

``ModelCard`` is that information: label vocabulary, the tokenizer identity the shards were written
with, the training clip length, the code row, how sequences were framed and padded, how af-prepare
batched and filtered clips, and the per-class thresholds chosen on validation (when stored).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from af_train.evaluate import THRESHOLDS_NAME
from af_train.model import RoFormerEncoder
from af_train.shards import Manifest, ManifestError

log = logging.getLogger(__name__)

CARD_NAME = "af_train_inference.json"  # in an af-export-hf directory
CARD_VERSION = 1


class InferenceError(ValueError):
    """A model, tokenizer or input that inference cannot use as given; the message says what to give."""


@dataclass
class ModelCard:
    labels: list[str] | None  # index -> class name (None: an encoder without a classifier)
    multi_label: bool
    tokenizer: dict[str, Any]  # identity of the tokenizer the training shards were written with
    clip_seconds: float
    code_row: int
    max_length: int = 752  # tokens per sequence, BOA/EOA included
    add_boa: bool = True
    add_eoa: bool = True
    dynamic_padding: bool = False
    codebook_size: int = 1024
    encode_batch_size: int = 16  # clips per tokenizer batch in af-prepare (see AudioTagger)
    silence_dbfs: float | None = -80.0  # af-prepare's silence threshold (None: silent clips kept)
    min_seconds: float = 0.0  # af-prepare's minimum clip length (shorter: rejected as too_short)
    thresholds: list[float] | None = None  # per class, F1-optimal on the validation split
    version: int = CARD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_codes(self) -> int:
        return self.max_length - int(self.add_boa) - int(self.add_eoa)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ModelCard:
        try:
            card = cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise InferenceError(f"{where}: not a readable af_train inference card ({exc})") from None
        if card.version != CARD_VERSION:
            raise InferenceError(f"{where}: card version {card.version}, this af_train reads {CARD_VERSION}")
        return card

    @classmethod
    def build(cls, manifest: Any, data: Any, code_row: int, thresholds: list[float] | None = None) -> ModelCard:
        """From the training shards' manifest and the recipe's ``data`` section."""
        prepare = (manifest.extra or {}).get("prepare", {})
        return cls(
            labels=list(manifest.labels),
            multi_label=bool(manifest.multi_label),
            tokenizer=recorded_identity(manifest),
            clip_seconds=float(manifest.clip_seconds),
            code_row=int(code_row),
            max_length=int(data.max_length),
            add_boa=bool(data.add_boa),
            add_eoa=bool(data.add_eoa),
            dynamic_padding=bool(data.dynamic_padding),
            codebook_size=int(manifest.codec.codebook_size),
            encode_batch_size=int(prepare.get("batch_size", 16)),
            silence_dbfs=prepare.get("silence_threshold_db", -80.0),
            min_seconds=float(prepare.get("min_seconds") or 0.0),
            thresholds=thresholds,
        )


# --------------------------------------------------------------------------------------------------
# Tokenizer identity: the one place that knows how a recorded identity becomes a tokenizer
# --------------------------------------------------------------------------------------------------


def recorded_identity(manifest: Any) -> dict[str, Any]:
    """The tokenizer identity a manifest records (derived from its codec section for older manifests)."""
    return dict(manifest.tokenizer)


def tokenizer_for(identity: dict[str, Any], given: Any = None, search_paths: list[Path] | tuple = (),
                  device: str | torch.device | None = None) -> Any:
    """The tokenizer a model was trained with, re-created from its recorded ``identity``.

    ``given``: a tokenizer object, or a path (a fitted tokenizer file, EnCodec weights, or a folder
    holding them) to look in first. Refuses with an ``InferenceError`` naming what is missing or what
    differs; never uses another tokenizer.
    """
    from af_train.tokenizers import TokenizerError, check_same_tokenizer, load_tokenizer, tokenizer_from_identity

    what = "the model (its training shards' manifest)"
    try:
        if given is not None and not isinstance(given, (str, Path)):
            check_same_tokenizer(identity, given.identity(), what, "the tokenizer given")
            return given
        paths = [Path(given)] if given is not None else []
        try:
            return tokenizer_from_identity(identity, [*paths, *search_paths], device)
        except TokenizerError:
            if given is None or not Path(given).is_file() or identity.get("kind") != "mel-rvq":
                raise
            # a fitted file that is not the recorded one: say how it differs
            check_same_tokenizer(identity, load_tokenizer(given, device).identity(), what, f"'{given}'")
            raise
    except TokenizerError as exc:
        raise InferenceError(f"{exc}. Give the tokenizer the model was trained with: --tokenizer PATH "
                             "(AudioTagger.load(..., tokenizer=PATH))") from None


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    encoder: RoFormerEncoder
    classifier: torch.nn.Module | None  # ClassificationHead over the mean-pooled last hidden state
    card: ModelCard
    source: str  # what was loaded, for messages and outputs


def _heads_from_module(module: torch.nn.Module, code_rows: list[int]) -> tuple[RoFormerEncoder, torch.nn.Module | None,
                                                                               int]:
    """(encoder, classifier or None, the code row it reads: the first of a joint-row pretraining's rows)."""
    code_row = module.code_row if module.code_row is not None else code_rows[0]
    return module.encoder, getattr(module, "classifier", None), int(code_row)


def _run_recipe(run_dir: Path) -> Any:
    """An MLM pretraining run's recipe as trained (inference uses its encoder), else ``evaluation_recipe``."""
    from af_train.config import Recipe
    from af_train.evaluate import evaluation_recipe

    config = run_dir / "config.yaml"
    if config.is_file():
        recipe = Recipe.load(config, ["objective.init_checkpoint=null"])
        if recipe.objective.mode == "pretrain":
            return recipe
    return evaluation_recipe(run_dir)


def _read_thresholds(path: Path, labels: list[str] | None) -> list[float] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if labels is not None and data.get("labels") not in (None, labels):
        log.warning("%s was chosen for other labels than the model's; not used", path)
        return None
    return [float("nan") if t is None else float(t) for t in data["thresholds"]]


def _selected_weights(run_dir: Path) -> tuple[Path | None, Path | None]:
    """(weights file, checkpoint directory) that a run directory's model is by default: the checkpoint
    selected on validation (its consolidated ``best/model.safetensors`` when that is of the current
    selection, else the checkpoint's own safetensors, else the checkpoint), then the final weights
    (safetensors before model.pt), then the newest complete checkpoint."""
    from af_train.checkpoint import BEST, BEST_RECORD, latest_complete, read_best

    root = run_dir / "checkpoints"
    best = read_best(root)
    if best is not None and (root / best[0]).is_dir():
        record = run_dir / "best" / BEST_RECORD
        if (run_dir / "best" / "model.safetensors").is_file() and record.is_file() \
                and json.loads(record.read_text(encoding="utf-8")).get("tag") == best[0]:
            return run_dir / "best" / "model.safetensors", None
        return None, root / best[0]
    for name in ("model.safetensors", "model.pt"):
        if (run_dir / "final" / name).is_file():
            log.info("%s has no checkpoint selected on validation (%s); using the final weights", run_dir, root / BEST)
            return run_dir / "final" / name, None
    checkpoint = latest_complete(root)
    if checkpoint is None:
        raise InferenceError(f"{run_dir} has neither final/model.pt nor a complete checkpoint; has it trained?")
    return None, checkpoint


def load_from_run(run_dir: str | Path, checkpoint: str | Path | None = None,
                  weights: str | Path | None = None, manifest: str | Path | None = None) -> LoadedModel:
    """A run's model: the checkpoint selected on validation unless told otherwise (a pretraining run:
    its encoder, no classifier).
    ``manifest``: the training shards (or their manifest.json) when they are no longer where the
    run's recipe says; its class list must be the model's own.

    Nothing here unpickles: weights are read from safetensors, from ``.pt`` files with
    ``weights_only=True``, or consolidated from a checkpoint's DeepSpeed files with an allow-list
    (``af_train.checkpoint.consolidated_state``), after checking the sizes and hashes recorded at save."""
    from af_train.checkpoint import CheckpointError, consolidated_state, read_meta
    from af_train.evaluate import EvaluationError, evaluation_module

    run_dir = Path(run_dir)
    try:
        recipe = _run_recipe(run_dir)
    except EvaluationError as exc:
        raise InferenceError(str(exc)) from None
    if checkpoint is None and weights is None:
        weights, checkpoint = _selected_weights(run_dir)
    if checkpoint is not None and (Path(checkpoint) / "model.safetensors").is_file():
        weights, checkpoint = Path(checkpoint) / "model.safetensors", None  # consolidated when it was saved
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        try:
            state, meta = consolidated_state(checkpoint), read_meta(checkpoint)
        except CheckpointError as exc:
            raise InferenceError(str(exc)) from None
        source, thresholds_file = str(checkpoint), checkpoint / THRESHOLDS_NAME
        trained_on, model_labels = meta.get("tokenizer"), meta.get("labels")
    else:
        payload = _read_weights(weights)
        state, source = payload["state_dict"], str(weights)
        thresholds_file = Path(weights).parent / THRESHOLDS_NAME
        trained_on, model_labels = payload.get("tokenizer"), payload.get("labels")
    shards = manifest or next((s for s in (recipe.data.train, recipe.data.val, recipe.data.test) if s), None)
    manifest = _manifest(shards, f"the training shards named in {run_dir / 'config.yaml'}")
    _check_trained_on(trained_on, manifest, source, shards)
    _check_model_labels(model_labels, manifest, source, shards)
    objectives_log = logging.getLogger("af_train.objectives")
    level = objectives_log.level
    objectives_log.setLevel(logging.ERROR)  # "starts from random weights": true of the shell, not of the weights
    try:
        module = evaluation_module(recipe, manifest, state, source).eval()
    finally:
        objectives_log.setLevel(level)
    encoder, classifier, code_row = _heads_from_module(module, recipe.data.code_rows)
    card = ModelCard.build(manifest, recipe.data, code_row, _read_thresholds(thresholds_file, list(manifest.labels)))
    return LoadedModel(encoder, classifier, card, source)


def _read_weights(weights: str | Path) -> dict[str, Any]:
    from af_train.model.checkpoint import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(weights)
    except CheckpointError as exc:
        raise InferenceError(str(exc)) from None


def _check_model_labels(model_labels: list[str] | None, manifest: Any, source: str, shards: Any) -> None:
    """Scores are named with the model's own class list: a manifest with another list (names or order)
    is refused, naming the first difference. Weights written before class lists were stored name none:
    the manifest's list is used, with a warning."""
    from af_train.shards import LabelsMismatch, check_same_labels

    if model_labels is None:
        log.warning("%s records no class list (written before af_train stored one); naming its outputs with the "
                    "class list of %s, which must be the manifest it was trained on", source, shards)
        return
    try:
        check_same_labels(model_labels, manifest.labels, f"the model '{source}'", f"the manifest of '{shards}'",
                          "give the shards the model was trained on (--manifest DIR), or leave --manifest out")
    except LabelsMismatch as exc:
        raise InferenceError(str(exc)) from None


def _check_trained_on(trained_on: dict[str, Any] | None, manifest: Any, source: str, shards: Any) -> None:
    """Weights that record the tokenizer they were trained on must match the manifest given with them."""
    from af_train.tokenizers import TokenizerError, check_same_tokenizer

    try:
        check_same_tokenizer(trained_on, manifest.tokenizer, f"the weights '{source}'", f"the shards '{shards}'")
    except TokenizerError as exc:
        raise InferenceError(f"{exc}. Give the manifest of the shards the model was trained on (--manifest DIR)") \
            from None


def _manifest(where: str | Path | None, what: str) -> Manifest:
    """The manifest of a local shard directory (or of its manifest.json), read without the data layer
    (whose streaming import costs seconds)."""
    if where is None:
        raise InferenceError(f"no shard directory to read the label vocabulary and tokenizer from ({what})")
    path = Path(where)
    if path.suffix == ".json":
        path = path.parent
    fix = (f"Inference reads the label vocabulary and the tokenizer identity from the manifest.json of {what}; "
           "give that shard directory (--manifest DIR)")
    if not path.is_dir():
        raise InferenceError(f"shard directory '{path}' does not exist; write one with af-prepare (or fix data.train / "
                             f"data.val / data.test in the recipe). {fix}")
    try:
        return Manifest.load(path)
    except ManifestError as exc:
        raise InferenceError(f"{exc}. {fix}") from None


def load_from_weights(weights: str | Path, manifest: str | Path | None = None) -> LoadedModel:
    """Consolidated module weights (``final/model.pt``) and the manifest of the shards it was trained on
    (default: the training shards its recipe names)."""
    from af_train.config import DataConfig, build_dataclass
    from af_train.model import MODULE_FORMAT, ClassificationHead, load_encoder, read_checkpoint
    from af_train.model.checkpoint import CheckpointError, check_and_load_state

    try:
        payload = read_checkpoint(weights)
        encoder = load_encoder(weights).eval()  # (reads the file again: safetensors or weights_only=True)
    except CheckpointError as exc:
        raise InferenceError(str(exc)) from None
    recipe = payload.get("recipe") or {}
    data = build_dataclass(DataConfig, recipe.get("data", {}), str(weights), "data")
    if manifest is None:
        manifest = next((s for s in (data.train, data.val, data.test) if s), None)
    shards = _manifest(manifest, f"the shards {weights} was trained on")
    _check_trained_on(payload.get("tokenizer"), shards, str(weights), manifest)
    classifier = None
    if payload["format"] == MODULE_FORMAT:
        head = {k[len("classifier."):]: v for k, v in payload["state_dict"].items() if k.startswith("classifier.")}
        if head:  # (an encoder without a classifier embeds audio of any data set: no class list to match)
            _check_model_labels(payload.get("labels"), shards, str(weights), manifest)
            classifier = ClassificationHead(encoder.config, head["classifier.weight"].shape[0])
            check_and_load_state(classifier, {k: v.float() for k, v in head.items()}, f"'{weights}'")
            classifier.eval()
            if classifier.classifier.out_features != shards.num_classes:
                raise InferenceError(
                    f"{weights} has {classifier.classifier.out_features} classes but the manifest of {manifest} "
                    f"lists {shards.num_classes}; give the shards the model was trained on (--manifest DIR)"
                )
    code_row = payload.get("code_row")
    code_row = int(code_row if code_row is not None else data.code_rows[0])
    thresholds = _read_thresholds(Path(weights).parent / THRESHOLDS_NAME, list(shards.labels))
    return LoadedModel(encoder, classifier, ModelCard.build(shards, data, code_row, thresholds), str(weights))


def load_from_hf(model_dir: str | Path) -> LoadedModel:
    """An ``af-export-hf`` directory of a fine-tuned (or pretrained) model."""
    from safetensors.torch import load_file

    from af_train.model import ClassificationHead
    from af_train.model.checkpoint import check_and_load_state
    from af_train.model.hf import import_roformer

    model_dir = Path(model_dir)
    card_path = model_dir / CARD_NAME
    if not card_path.is_file():
        raise InferenceError(
            f"{model_dir} has no {CARD_NAME} (label vocabulary, tokenizer identity, clip length); re-export it with "
            "af-export-hf CHECKPOINT OUT_DIR --manifest SHARD_DIR"
        )
    card = ModelCard.from_json(card_path.read_text(encoding="utf-8"), str(card_path))
    encoder = import_roformer(model_dir).eval()
    classifier = None
    head_file = model_dir / "classifier.safetensors"
    if head_file.is_file():
        head = load_file(str(head_file))
        classifier = ClassificationHead(encoder.config, head["weight"].shape[0])
        check_and_load_state(classifier, {f"classifier.{k}": v for k, v in head.items()}, f"'{head_file}'")
        classifier.eval()
    return LoadedModel(encoder, classifier, card, str(model_dir))


def load_model(path: str | Path, *, checkpoint: str | Path | None = None, weights: str | Path | None = None,
               manifest: str | Path | None = None) -> LoadedModel:
    """A run directory, module weights (``*.pt``) or an ``af-export-hf`` directory."""
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"model '{path}' does not exist; give a run directory, a model.pt or an af-export-hf "
                             "directory")
    if path.is_dir() and (path / "config.yaml").is_file():
        return load_from_run(path, checkpoint, weights, manifest)
    if checkpoint is not None or weights is not None:
        raise InferenceError(f"--checkpoint/--weights pick weights inside a run directory; '{path}' is not one")
    if path.is_dir() and (path / "config.json").is_file():
        return load_from_hf(path)
    if path.is_file():
        return load_from_weights(path, manifest)
    raise InferenceError(f"'{path}' is neither a run directory (config.yaml), an af-export-hf directory (config.json) "
                         "nor a weights file")
