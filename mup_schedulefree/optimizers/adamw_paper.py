"""Schedule-free AdamW as run in the paper's experiments: bias correction folded into the lr.

The paper form divides the gradient by the root of the raw second moment and multiplies the
learning rate by sqrt(1 - beta2^(k+1)) instead. Early in training, where v is still small, the two
forms differ by eps's weight: here eps is added to sqrt(v), not to sqrt(v / (1 - beta2^(k+1))). The
corrected lr also enters the averaging weight, so lr_max grows with the correction. The published
package keeps this form to reproduce the paper; it can be unstable on some problems, and
:class:`~mup_schedulefree.optimizers.adamw.AdamWScheduleFree` is the one to train with.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..schedule import warmup_multiplier
from .adamw import AdamWRule
from .base import PrimalForm


class AdamWPaperRule(AdamWRule):
    """The AdamW-SF rule of the paper's experiments (mixin for a schedule-free form).

    z <- z - lr_k * (g / (sqrt(v) + eps) + weight_decay * y), with v the EMA of g^2 and
    lr_k = lr * warmup_k * sqrt(1 - beta2^(k+1)); lr_k is also the lr of the averaging weight.
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True) -> None:
        # The published paper form has no inner_momentum (upstream HEAD neither), so its groups keep 0.
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         r=r, weight_lr_power=weight_lr_power, foreach=foreach, fused=fused,
                         master_weights=master_weights)

    def _multiplier(self, group: dict[str, Any]) -> tuple[float, bool]:
        beta2, k = group["betas"][1], group["k"]
        return warmup_multiplier(k, group["warmup_steps"]) * math.sqrt(1.0 - beta2 ** (k + 1)), True

    def _advance(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super()._advance(group), "bias_correction2": 1.0}  # the correction is in the lr


class AdamWScheduleFreePaper(AdamWPaperRule, PrimalForm):
    """Schedule-Free AdamW in the form of the paper's experiments. Call ``optimizer.train()``
    before training and ``optimizer.eval()`` before evaluating or saving; a new optimizer starts
    in train mode.

    The step is AdamW-SF's with the second-moment bias correction moved from the denominator into
    the learning rate: z <- z - lr_k * (g / (sqrt(v) + eps) + weight_decay * y), with
    lr_k = lr * warmup_k * sqrt(1 - beta2^(k+1)), and lr_k weights the average. Kept to reproduce
    the paper; prefer :class:`AdamWScheduleFree`, which the published package recommends too.

    Example::

        opt = AdamWScheduleFreePaper(model.parameters(), lr=1e-3, warmup_steps=100)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        opt.eval()   # parameters now hold the averaged point x

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default 0.0025).
        betas: (beta1, beta2): interpolation y = (1 - beta1) z + beta1 x, and second-moment decay
            (default (0.9, 0.999)). Requires 0 < beta1 < 1, 0 <= beta2 < 1.
        eps: added to the root of the uncorrected second moment (default 1e-8).
        weight_decay: decay at y, multiplied by the scheduled lr (default 0).
        warmup_steps: linear lr warmup length in steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the max scheduled lr in the averaging weight (default 2.0).
        foreach: list-wide ``_foreach`` ops for the eager path (default: on for non-CPU devices).
        fused: native single-pass kernel for CPU float32 tensors (default: on where available).
        master_weights: float32 master copy and state for float16/bfloat16 parameters (default True).
    """
