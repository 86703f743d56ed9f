"""Export an af_train checkpoint to a Hugging Face RoFormer directory.

    af-export-hf CHECKPOINT OUT_DIR [--manifest SHARD_DIR_OR_JSON] [--with-mlm-head] [--overwrite]
    (or python3 -m af_train.inference.export_hf ...)

CHECKPOINT is an encoder checkpoint (``af_train.encoder/1``, written by pretraining) or module
weights (``af_train.module/1``, written at the end of any run). OUT_DIR receives:

- ``config.json`` + ``model.safetensors``: the trainable encoder as ``transformers.RoFormerModel``
  (``RoFormerForMaskedLM`` with ``--with-mlm-head`` when the checkpoint has an MLM head);
- ``classifier.safetensors`` (``weight`` [C, hidden], ``bias`` [C]) and ``classifier.json`` when the
  checkpoint has a classification head. The head reads the encoder's last hidden state mean-pooled over
  ``attention_mask == 1`` (BOA/EOA included): ``logits = pooled @ weight.T + bias``; apply a sigmoid
  (multi-label) or softmax (single-label). ``classifier.json`` holds ``num_classes``, ``multi_label``,
  ``labels`` (class names from the manifest, when found) and ``code_row``;
- ``af_train_inference.json`` (module weights with a manifest): what af-predict, af-embed and the HEAR
  module need besides the weights: label vocabulary, tokenizer identity, training clip length, code row,
  sequence framing, and the per-class thresholds stored beside the weights (``af_thresholds.json``);
- ``af_train_export.json``: provenance (source file, format, code row, recipe).

Frozen FT2 row encoders are not exported: inference uses the trainable row only.

The reader of this directory is ``af_train.inference.model.load_from_hf`` (beside this writer); the
model stack is imported inside the functions, so that ``--help`` answers without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOKEN_CONVENTIONS = {
    "codes": "EnCodec 24 kHz codes 0..1023 of one codebook row (3 kbps: rows 0..3, 75 frames/s)",
    "pad": 1024,
    "mask": 1025,
    "boa": 1026,
    "eoa": 1027,
    "sequence": "BOA + codes + EOA, padded with PAD; attention_mask 1 on BOA, codes and EOA",
}


def _find_manifest(manifest_arg: str | None, recipe: dict[str, Any] | None):
    """The manifest of the shards the checkpoint was trained on (--manifest, else the recipe's splits)."""
    from af_train.shards import Manifest

    candidates: list[Path] = []
    if manifest_arg:
        candidates.append(Path(manifest_arg))
    elif recipe:
        for split in ("train", "val", "test"):
            where = (recipe.get("data") or {}).get(split)
            if where:
                candidates.append(Path(where))
    for candidate in candidates:
        directory = candidate.parent if candidate.suffix == ".json" else candidate
        if (directory / "manifest.json").is_file():
            return Manifest.load(directory)
        if manifest_arg:
            raise FileNotFoundError(f"--manifest '{manifest_arg}': no manifest.json there")
    return None


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    manifest: str | None = None,
    with_mlm_head: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export ``checkpoint`` into ``out_dir`` (see the module docstring); returns ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    from af_train.model import MODULE_FORMAT, MLMHead, load_encoder, read_checkpoint
    from af_train.model.checkpoint import check_and_load_state
    from af_train.model.hf import export_roformer

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"'{out_dir}' exists and is not empty; pass --overwrite to replace its files")
    payload = read_checkpoint(checkpoint)
    encoder = load_encoder(checkpoint).eval()
    is_module = payload["format"] == MODULE_FORMAT
    state = payload["state_dict"] if is_module else {}
    recipe = payload.get("recipe") if is_module else None

    mlm_head = None
    if with_mlm_head:
        head_state = {k[len("mlm_head."):]: v for k, v in state.items() if k.startswith("mlm_head.")}
        if not head_state:
            raise ValueError(f"--with-mlm-head: '{checkpoint}' has no MLM head (only pretraining module weights do)")
        mlm_head = MLMHead(encoder.config, encoder.embeddings.word_embeddings)
        if encoder.config.tie_word_embeddings:
            head_state["predictions.decoder.weight"] = encoder.embeddings.word_embeddings.weight.detach()
        check_and_load_state(mlm_head, head_state, f"'{checkpoint}'")

    code_row = payload.get("code_row")
    export_roformer(encoder, out_dir, mlm_head=mlm_head, extra_config={"af_train_code_row": code_row})

    written = ["config.json", "model.safetensors"]
    shards = _find_manifest(manifest, recipe)
    weight, bias = state.get("classifier.classifier.weight"), state.get("classifier.classifier.bias")
    if weight is not None and bias is not None:
        labels = list(shards.labels) if shards is not None else None
        if labels is not None and len(labels) != weight.shape[0]:
            raise ValueError(
                f"the manifest lists {len(labels)} labels but the classifier has {weight.shape[0]} outputs; "
                "pass --manifest with the dataset the model was fine-tuned on"
            )
        if labels is None:
            log.warning("no manifest found: classifier.json has no label names (pass --manifest SHARD_DIR)")
        save_file(
            {"weight": weight.detach().float().contiguous(), "bias": bias.detach().float().contiguous()},
            str(out_dir / "classifier.safetensors"),
        )
        head_info = {
            "num_classes": int(weight.shape[0]),
            "multi_label": bool(payload.get("multi_label")),
            "activation": "sigmoid" if payload.get("multi_label") else "softmax",
            "pooling": "mean of last_hidden_state over attention_mask == 1 (BOA and EOA included)",
            "formula": "logits = pooled @ weight.T + bias",
            "labels": labels,
            "code_row": code_row,
        }
        (out_dir / "classifier.json").write_text(json.dumps(head_info, indent=2) + "\n", encoding="utf-8")
        written += ["classifier.safetensors", "classifier.json"]
    if shards is not None and recipe is not None:
        written.append(_write_inference_card(out_dir, shards, recipe, code_row, Path(checkpoint)))
    else:
        log.warning("no %s written (af-predict/af-embed/HEAR need it): give module weights (a run's final/model.pt) "
                    "and --manifest SHARD_DIR", "af_train_inference.json")
    frozen = {k.split(".")[1] for k in state if k.startswith("frozen_encoders.")}
    if frozen:
        log.info("%d frozen FT2 row encoder(s) not exported (inference uses the trainable row only)", len(frozen))

    provenance = {
        "source": str(Path(checkpoint).resolve()),
        "format": payload["format"],
        "code_row": code_row,
        "row_embedding": encoder.config.row_embedding,
        "tokens": TOKEN_CONVENTIONS,
        "recipe": recipe,
        "torch": torch.__version__,
    }
    (out_dir / "af_train_export.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    written.append("af_train_export.json")
    log.info("exported %s -> %s (%s)", checkpoint, out_dir, ", ".join(written))
    return out_dir


def _write_inference_card(out_dir: Path, shards: Any, recipe: dict[str, Any], code_row: int | None,
                          checkpoint: Path) -> str:
    """``af_train_inference.json``: what af_train's inference needs beside the weights (labels, tokenizer
    identity, clip length, code row, sequence framing, the per-class thresholds stored with the weights)."""
    from af_train.config import DataConfig, build_dataclass
    from af_train.inference.model import CARD_NAME, THRESHOLDS_NAME, ModelCard

    data = build_dataclass(DataConfig, recipe.get("data", {}), str(checkpoint), "data")
    thresholds_file = checkpoint.parent / THRESHOLDS_NAME
    thresholds = json.loads(thresholds_file.read_text(encoding="utf-8"))["thresholds"] \
        if thresholds_file.is_file() else None
    row = code_row if code_row is not None else data.code_rows[0]
    (out_dir / CARD_NAME).write_text(ModelCard.build(shards, data, row, thresholds).to_json(), encoding="utf-8")
    return CARD_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="af-export-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="encoder checkpoint or module weights (.pt)")
    parser.add_argument("out_dir", help="Hugging Face model directory to write")
    parser.add_argument("--manifest", help="shard directory (or its manifest.json) for class names")
    parser.add_argument("--with-mlm-head", action="store_true", help="export RoFormerForMaskedLM (pretraining)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export_checkpoint(args.checkpoint, args.out_dir, args.manifest, args.with_mlm_head, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"af-export-hf: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
