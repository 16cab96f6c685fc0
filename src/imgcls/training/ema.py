"""Exponential moving average of model weights (`train.ema_decay`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEma:
    """A frozen copy of the model whose weights trail the trained ones: `e = d*e + (1-d)*w`.

    The decay warms up as `min(decay, (1 + n) / (10 + n))` after `n` updates: with a fixed 0.999
    a short run would validate weights that are still mostly the random initialisation.
    Floating-point buffers (BatchNorm running statistics) are averaged too; integer buffers are
    copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses (after warmup: `decay`)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards `model`'s current weights."""
        d = self.current_decay()
        self.updates += 1
        ema_t, new_t, ema_i, new_i = [], [], [], []
        for e, w in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if e.dtype.is_floating_point:
                ema_t.append(e)
                new_t.append(w.detach().to(e.dtype))
            else:
                ema_i.append(e)
                new_i.append(w)
        if ema_t:
            torch._foreach_lerp_(ema_t, new_t, 1.0 - d)  # one fused kernel per dtype / device
        for e, w in zip(ema_i, new_i, strict=True):
            e.copy_(w)

    def state_dict(self) -> dict[str, Any]:
        """Weights and update count (for checkpoints)."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
