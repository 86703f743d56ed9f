"""Weight files exchanged between runs: encoder checkpoints and whole training-module weights.

Encoder checkpoint (``save_encoder``), what pretraining hands to fine-tuning::

    {"format": "af_train.encoder/1", "config": asdict(AudioFormerConfig), "state_dict": {...},
     "code_row": int | None, "extra": {...}, "tokenizer": {...} | None}

Module weights (``save_module_weights``), what the engine writes at the end of a run::

    {"format": "af_train.module/1", "recipe": {...}, "num_classes": int, "multi_label": bool,
     "state_dict": {...}, "encoder_config": asdict(AudioFormerConfig), "code_row": int | None,
     "tokenizer": {...} | None, "labels": [class names] | None, "labels_hash": "sha256:..." | None,
     "framing": {"max_length", "add_boa", "add_eoa", "dynamic_padding", "code_rows"} | None}

Module weights are written as ``model.pt`` (``torch.save``) and/or ``model.safetensors``: the same tensors,
with every other field above as JSON in the safetensors metadata (key ``af_train``; also ``labels``,
``labels_hash``, ``tokenizer`` and ``framing`` on their own). Reading a ``.safetensors`` file never
unpickles; ``read_checkpoint`` returns the same dictionary for both.

``labels`` is the ordered class list the classifier's outputs mean (the training shards' manifest):
inference names scores with it, and fine-tuning from these weights refuses another list. Files written
before it existed have none.

``tokenizer`` is the identity of the tokenizer whose codes the weights were trained on
(``af_train.tokenizers``; the shards' ``manifest.json`` ``tokenizer``): fine-tuning refuses weights
of another tokenizer, and inference re-creates it (``tokenizer_from_identity``). Files written before
it existed have none (None: not compared).

In a module state dict the trainable encoder's tensors are the keys under ``encoder.``; frozen FT2
row encoders live under ``frozen_encoders.N.``, the heads under ``mlm_head.`` and ``classifier.``.
``load_encoder_weights`` / ``load_encoder`` accept either file. Files are read with
``torch.load(weights_only=True)``: only tensors and plain Python values, never pickled code.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from af_train.files import atomic_open, atomic_write
from af_train.model.config import AudioFormerConfig
from af_train.model.encoder import RoFormerEncoder
from af_train.shards import labels_hash

__all__ = [
    "ENCODER_FORMAT",
    "MODULE_FORMAT",
    "CheckpointError",
    "save_encoder",
    "load_encoder",
    "load_encoder_weights",
    "read_checkpoint",
    "encoder_state_from_checkpoint",
    "save_module_weights",
    "check_and_load_state",
]

log = logging.getLogger(__name__)

ENCODER_FORMAT = "af_train.encoder/1"
MODULE_FORMAT = "af_train.module/1"
SAFETENSORS_SUFFIX = ".safetensors"
_METADATA_KEY = "af_train"
TRAINABLE_ENCODER_PREFIX = "encoder."


class CheckpointError(ValueError):
    """A weight file or training checkpoint that is missing, damaged, of an unknown format, or does
    not fit the model or run (the one error for both; ``af_train.checkpoint`` re-exports it)."""


def _unwrap(module: nn.Module) -> nn.Module:
    # DeepSpeedEngine / DDP keep the real module in .module
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) else module


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in state.items()}


def save_encoder(
    encoder: RoFormerEncoder,
    path: str | Path,
    code_row: int | None = None,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    tokenizer: dict[str, Any] | None = None,
) -> Path:
    """Write an encoder checkpoint. ``state_dict`` overrides the module's (e.g. consolidated ZeRO-3);
    ``tokenizer``: the identity of the tokenizer whose codes it was trained on."""
    encoder = _unwrap(encoder)
    if not isinstance(encoder, RoFormerEncoder):
        raise TypeError(f"save_encoder expects a RoFormerEncoder, got {type(encoder).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": ENCODER_FORMAT,
        "config": asdict(encoder.config),
        "state_dict": _cpu_state(state_dict if state_dict is not None else encoder.state_dict()),
        "code_row": code_row,
        "extra": dict(extra or {}),
        "tokenizer": dict(tokenizer) if tokenizer else None,
    }
    with atomic_open(path) as f:  # never a half-written checkpoint under the final name
        torch.save(payload, f)
    return path


def save_module_weights(
    module: nn.Module,
    path: str | Path,
    recipe_dict: dict[str, Any],
    num_classes: int,
    multi_label: bool,
    state_dict: dict[str, torch.Tensor] | None = None,
    tokenizer: dict[str, Any] | None = None,
    labels: list[str] | None = None,
) -> Path:
    """Write a training module's weights (all of them, frozen encoders included) with its recipe, the
    identity of the tokenizer whose codes it was trained on and its ordered class list. A path ending in
    ``.safetensors`` is written as safetensors (metadata as JSON), anything else with ``torch.save``."""
    module = _unwrap(module)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = getattr(module, "encoder", None)
    data = (recipe_dict or {}).get("data") or {}
    payload = {
        "format": MODULE_FORMAT,
        "recipe": recipe_dict,
        "num_classes": int(num_classes),
        "multi_label": bool(multi_label),
        "state_dict": _cpu_state(state_dict if state_dict is not None else module.state_dict()),
        "encoder_config": asdict(encoder.config) if isinstance(encoder, RoFormerEncoder) else None,
        "code_row": getattr(module, "code_row", None),
        "tokenizer": dict(tokenizer) if tokenizer else None,
        "labels": list(labels) if labels is not None else None,
        "labels_hash": labels_hash(labels) if labels is not None else None,
        "framing": {key: data.get(key) for key in ("max_length", "add_boa", "add_eoa", "dynamic_padding", "code_rows")},
    }
    if path.suffix == SAFETENSORS_SUFFIX:
        _write_safetensors(payload, path)
        return path
    with atomic_open(path) as f:
        torch.save(payload, f)
    return path


def _write_safetensors(payload: dict[str, Any], path: Path) -> None:
    import json

    from safetensors.torch import save

    tensors = {name: t.contiguous().clone() for name, t in payload["state_dict"].items()}  # tied weights: own copies
    rest = {k: v for k, v in payload.items() if k != "state_dict"}
    metadata = {_METADATA_KEY: json.dumps(rest), "format": payload["format"]}
    metadata.update({key: json.dumps(payload.get(key)) for key in ("labels", "labels_hash", "tokenizer", "framing")})
    atomic_write(path, save(tensors, metadata))


def _read_safetensors(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` module-weights file as ``read_checkpoint``'s dictionary (no unpickling)."""
    import json

    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            tensors[name] = f.get_tensor(name)
    if _METADATA_KEY not in metadata:
        raise CheckpointError(f"'{path}' is a safetensors file without af_train metadata (not written by af_train's "
                              "save_module_weights)")
    return {**json.loads(metadata[_METADATA_KEY]), "state_dict": tensors}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an encoder or module-weights file (``.pt`` with ``weights_only=True``, or ``.safetensors``),
    checking that it exists and has a known format. Never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' does not exist; give an encoder checkpoint written by pretraining "
            "(af_train.model.save_encoder) or module weights written at the end of a run"
        )
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            payload = _read_safetensors(path)
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # a truncated or foreign file: say which, in one line
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(exc).__name__}: {detail}); it is "
                              "truncated, damaged or not af_train weights") from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in (ENCODER_FORMAT, MODULE_FORMAT):
        raise CheckpointError(
            f"checkpoint '{path}' has format {fmt!r}; expected '{ENCODER_FORMAT}' or '{MODULE_FORMAT}' "
            "(a DeepSpeed checkpoint directory must first be consolidated by the engine)"
        )
    return payload


def encoder_state_from_checkpoint(
    payload: dict[str, Any], path: str | Path = "<checkpoint>"
) -> tuple[AudioFormerConfig, dict[str, torch.Tensor], int | None]:
    """(config, encoder state dict, code row) of the trainable encoder in an encoder/module file."""
    if payload["format"] == ENCODER_FORMAT:
        return AudioFormerConfig.from_dict(payload["config"]), payload["state_dict"], payload.get("code_row")
    state = {
        k[len(TRAINABLE_ENCODER_PREFIX):]: v
        for k, v in payload["state_dict"].items()
        if k.startswith(TRAINABLE_ENCODER_PREFIX)
    }
    if not state:
        raise CheckpointError(f"module weights '{path}' hold no trainable encoder (no keys under 'encoder.')")
    config_dict = payload.get("encoder_config")
    if config_dict is None:
        from af_train.config import ModelConfig, build_dataclass

        model_section = build_dataclass(ModelConfig, payload["recipe"].get("model", {}), str(path), "model")
        config = AudioFormerConfig.from_recipe(model_section)
    else:
        config = AudioFormerConfig.from_dict(config_dict)
    return config, state, payload.get("code_row")


def check_and_load_state(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    hint: str = "",
) -> None:
    """``load_state_dict(strict=True)`` with errors that name the tensor, both shapes and the file."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    problems = []
    for name in sorted(set(own) & set(state)):
        if tuple(own[name].shape) != tuple(state[name].shape):
            problems.append(
                f"tensor '{name}' has shape {list(state[name].shape)} in {source} but {list(own[name].shape)} "
                "in the model"
            )
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model are missing from {source}, e.g. '{missing[0]}'")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in {source} have no place in the model, e.g. '{unexpected[0]}'")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(f"{shown}{'. ' + hint if hint else ''}")
    module.load_state_dict(state, strict=True)


def load_encoder_weights(
    encoder: RoFormerEncoder, path: str | Path, payload: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Copy the (trainable) encoder weights of an encoder or module-weights file into ``encoder``.

    Returns the file's metadata (``config``, ``code_row``, ``format``, ``tokenizer``). A tensor whose shape differs
    is reported by name with both shapes, together with the architecture fields that differ.
    ``payload``: the file already read with ``read_checkpoint`` (avoids reading it twice).
    """
    payload = read_checkpoint(path) if payload is None else payload
    config, state, code_row = encoder_state_from_checkpoint(payload, path)
    diffs = config.architecture_differences(encoder.config)
    hint = (
        f"The checkpoint's architecture differs from the model's (checkpoint vs model: {', '.join(diffs)}); "
        "set the recipe's model section to match the checkpoint"
        if diffs
        else ""
    )
    check_and_load_state(encoder, state, f"checkpoint '{path}'", hint)
    return {"config": config, "code_row": code_row, "format": payload["format"], "tokenizer": payload.get("tokenizer")}


def load_encoder(path: str | Path, kernels: str = "auto", **config_overrides: Any) -> RoFormerEncoder:
    """Build a ``RoFormerEncoder`` with the checkpoint's config and weights.

    ``kernels``: the attention backend (``RoFormerEncoder``). ``config_overrides`` may change
    training-time fields (dropout, activation checkpointing).
    """
    payload = read_checkpoint(path)
    config, state, code_row = encoder_state_from_checkpoint(payload, path)
    for name in config_overrides:
        if name in AudioFormerConfig.ARCHITECTURE_FIELDS:
            raise ValueError(f"load_encoder: '{name}' is fixed by the checkpoint's weights and cannot be overridden")
    config = AudioFormerConfig.from_dict({**asdict(config), **config_overrides})
    encoder = RoFormerEncoder(config, kernels)
    check_and_load_state(encoder, state, f"checkpoint '{path}'")
    encoder.code_row = code_row  # where it came from; informational
    encoder.tokenizer = payload.get("tokenizer")  # whose codes it was trained on (None: not recorded)
    return encoder
