"""Optimizer parameter groups: which parameters get weight decay, and layer-wise learning-rate decay.

Biases and normalisation weights get no weight decay (``no_decay``); frozen parameters (FT2 row
encoders) stay out of the optimizer. Without ``optim.layer_decay`` there are two groups
(``optimizer_groups``: with and without weight decay).

With ``optim.layer_decay`` (as BEiT / AudioMAE / BEATs fine-tune) the learning rate shrinks towards
the input: with ``L`` encoder layers and decay ``d``, a parameter at depth ``k`` gets
``lr x d ** (L + 1 - k)``, where

- depth 0: the embeddings (word, token-type / code-row, their LayerNorm): the lowest rate;
- depth i + 1: encoder layer i;
- depth L + 1: everything above the encoder (classifier, MLM head, ...): the full rate (1.0).

A tied MLM decoder is the word-embedding matrix and so sits at depth 0. Every group carries its
``lr`` (the base lr times ``lr_scale``): torch's ``LambdaLR`` multiplies each group's own initial lr by the
schedule, so warmup and decay keep the ratios. The head group comes first, so the lr the run logs
(the first group's) is the base lr.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)encoder\.encoder\.layer\.(\d+)\.")


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation weights (all 1-D tensors) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def optimizer_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable (requires_grad) parameters: with and without weight decay."""
    with_decay, without_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue  # frozen FT2 row encoders stay out of the optimizer
        (without_decay if no_decay(name, param) else with_decay).append(param)
    if not with_decay and not without_decay:
        raise ValueError("the training module has no trainable parameters (all requires_grad=False)")
    groups = []
    if with_decay:
        groups.append({"params": with_decay, "weight_decay": weight_decay})
    if without_decay:
        groups.append({"params": without_decay, "weight_decay": 0.0})
    return groups


def layer_depth(name: str, num_layers: int) -> int:
    """Depth of a trainable parameter of a training module (see the module docstring)."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith("encoder.embeddings."):
        return 0
    return num_layers + 1


def layer_decay_groups(module: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float,
                       num_layers: int) -> list[dict[str, Any]]:
    """AdamW groups keyed by (depth, decay or not), each with ``lr = lr x layer_decay ** (L + 1 - depth)``."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        depth = layer_depth(name, num_layers)
        without_decay = no_decay(name, param)
        group = groups.get((depth, without_decay))
        if group is None:
            scale = layer_decay ** (num_layers + 1 - depth)
            group = groups[(depth, without_decay)] = {
                "params": [], "names": [], "lr": lr * scale, "lr_scale": scale, "depth": depth,
                "weight_decay": 0.0 if without_decay else weight_decay,
            }
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("the training module has no trainable parameters (all requires_grad=False)")
    ordered = [groups[key] for key in sorted(groups, key=lambda k: (-k[0], k[1]))]  # head first
    for group in ordered:
        del group["names"]  # kept only while building: optimizer state dicts stay small
    return ordered


def describe_groups(groups: list[dict[str, Any]], lr: float) -> list[str]:
    """One line per group: depth, lr scale, lr, weight decay, tensors and parameters (for the run log)."""
    lines = []
    for index, group in enumerate(groups):
        count = sum(p.numel() for p in group["params"])
        lines.append(f"group {index}: depth {group.get('depth', '-')}, lr scale {group.get('lr_scale', 1.0):.4g} "
                     f"(lr {group.get('lr', lr):.3g}), weight decay {group['weight_decay']:g}, "
                     f"{len(group['params'])} tensors, {count} parameters")
    return lines


def parameter_groups(module: torch.nn.Module, optim: Any) -> list[dict[str, Any]]:
    """The optimizer groups of a recipe's ``optim`` section (layer decay when ``optim.layer_decay`` is set),
    logged once."""
    if optim.layer_decay is None:
        groups = optimizer_groups(module, optim.weight_decay)
    else:
        encoder = getattr(module, "encoder", None)
        if encoder is None or not hasattr(encoder, "config"):
            raise ValueError("optim.layer_decay needs a training module with an 'encoder' (RoFormerEncoder)")
        groups = layer_decay_groups(module, optim.lr, optim.weight_decay, optim.layer_decay,
                                    encoder.config.num_hidden_layers)
    log.info("optimizer parameter groups%s:\n  %s",
             f" (layer decay {optim.layer_decay:g})" if optim.layer_decay is not None else "",
             "\n  ".join(describe_groups(groups, optim.lr)))
    return groups
