"""Exponential moving average of the trainable weights (``train.ema_decay``), as BEATs/EAT fine-tune.

After every applied optimizer step: ``ema += (1 - decay) * (weight - ema)``, in float32, starting
from the weights the run starts with. Skipped (non-finite) steps do not update it.

Where it lives: one full float32 copy on every rank (identical everywhere). It is a plain stateful
component (``state_dict`` / ``load_state_dict``): the Trainer hands it to its ``CheckpointManager``,
which stores it once per checkpoint and resumes it at any world size. Under ZeRO-3 the partitioned
parameters are gathered for the update (one all-gather of the trainable weights per step: the
price of a replicated average; ZeRO-1/2 and 0 hold whole parameters and need no communication).
The average is taken of the module's weights, i.e. of the bf16 copies under ``precision=bf16``;
their rounding is unbiased noise that the average smooths further.

Evaluation swaps the average in (``applied``) and the exact raw weights back afterwards, so the
optimizer's own state never sees it. The consolidated weights of a checkpoint carry the average
(``af_train.checkpoint.files.consolidated_state``): ``final/model.pt``, the test scoring of a selected
checkpoint and ``af-evaluate --checkpoint`` all use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None) -> Any:
    """Whole parameters for the duration of the context (ZeRO-3 partitions them; others are whole)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


class EMA:
    """The running average of ``module``'s trainable parameters (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        with _gathered([p for _, p in named]), torch.no_grad():
            self.shadow = {n: p.detach().float().clone() for n, p in named}
        self._raw: dict[str, torch.Tensor] | None = None

    def _params(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = dict(module.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"the module has no parameter(s) {missing[:3]} that the EMA tracks")
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Fold the current weights in (call after an applied optimizer step)."""
        if self._raw is not None:
            raise RuntimeError("EMA.update while the average is swapped into the module")
        params = self._params(module)
        with _gathered(params):
            for name, param in zip(self.names, params):
                shadow = self.shadow[name]
                # ema + (1 - decay) * (w - ema): one rounding of a small step, ~5x closer to float64 than
                # decay * ema + (1 - decay) * w over many steps
                shadow.lerp_(param.detach().to(shadow.device, torch.float32), 1.0 - self.decay)
        self.updates += 1

    # -- swapping into the module for evaluation -------------------------------------------------
    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """The average in ``module`` for the duration (evaluation); the exact raw weights afterwards."""
        params = self._params(module)
        with _gathered(params, modifier_rank=0), torch.no_grad():
            self._raw = {n: p.detach().clone() for n, p in zip(self.names, params)}
            for name, param in zip(self.names, params):
                param.copy_(self.shadow[name].to(param.device, param.dtype))
        try:
            yield
        finally:
            self._restore(params)

    def _restore(self, params: list[torch.nn.Parameter]) -> None:
        raw, self._raw = self._raw, None
        if raw is None:
            return
        with _gathered(params, modifier_rank=0), torch.no_grad():
            for name, param in zip(self.names, params):
                param.copy_(raw[name])

    @contextlib.contextmanager
    def raw_weights(self, module: torch.nn.Module) -> Iterator[None]:
        """The raw weights back in ``module`` for the duration when the average is applied (saving a
        checkpoint during evaluation); a no-op otherwise."""
        if self._raw is None:
            yield
            return
        params = self._params(module)
        with _gathered(params, modifier_rank=0), torch.no_grad():
            averaged = {n: p.detach().clone() for n, p in zip(self.names, params)}
        self._restore(params)
        try:
            yield
        finally:
            with _gathered(params, modifier_rank=0), torch.no_grad():
                self._raw = {n: p.detach().clone() for n, p in zip(self.names, params)}
                for name, param in zip(self.names, params):
                    param.copy_(averaged[name])

    # -- state (the checkpoint manager saves and restores it) ------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "weights": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        if set(weights) != set(self.names):
            extra, missing = sorted(set(weights) - set(self.names)), sorted(set(self.names) - set(weights))
            raise KeyError(f"the checkpoint's EMA does not match the trainable parameters (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
        for name, tensor in weights.items():
            self.shadow[name].copy_(tensor.to(self.shadow[name].device, torch.float32))
        self.updates = int(state["updates"])


def raw_metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """``val/mAP`` -> ``val/raw_mAP``: the raw weights' metrics, logged beside the average's."""
    return {f"{k.split('/', 1)[0]}/raw_{k.split('/', 1)[1]}" if "/" in k else f"raw_{k}": v
            for k, v in metrics.items()}
