"""Schedule-free RAdam: AdamW-SF with RAdam's variance rectification instead of a warmup."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..schedule import radam_rectification
from .adamw import AdamWRule
from .base import ClosureForm, PrimalForm


class RAdamRule(AdamWRule):
    """The RAdam-SF update rule (mixin for a schedule-free form).

    As AdamW-SF, with the lr multiplied by RAdam's rectification term; while that term is
    undefined (the first few steps) the step is an un-normalised SGD step, or no step at all
    with ``silent_sgd_phase`` (the default), which also gives those steps zero averaging weight.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default 0.0025).
        betas: (beta1, beta2) (default (0.9, 0.999)); 0 < beta1 < 1, 0 <= beta2 < 1.
        eps: added to the second-moment root (default 1e-8).
        weight_decay: decay at y, multiplied by the scheduled lr (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the max lr in the averaging weight (default 2.0).
        foreach: list-wide ``_foreach`` ops for the eager path (default: on for non-CPU devices).
        silent_sgd_phase: take no step while the rectification is undefined (default True).
        fused: native single-pass kernel for CPU float32 tensors (default: on where available).
        master_weights: float32 master copy and state for float16/bfloat16 parameters (default True).
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 r: float = 0.0, weight_lr_power: float = 2.0, foreach: bool | None = None,
                 silent_sgd_phase: bool = True, fused: bool | None = None, master_weights: bool = True) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, r=r, weight_lr_power=weight_lr_power, foreach=foreach,
                        silent_sgd_phase=silent_sgd_phase, fused=fused, master_weights=master_weights)
        self._validate(defaults)
        super(AdamWRule, self).__init__(params, defaults)

    def _multiplier(self, group: dict[str, Any]) -> tuple[float, bool]:
        rect = radam_rectification(group["k"], group["betas"][1], group["silent_sgd_phase"])
        return rect.multiplier, rect.adaptive


class RAdamScheduleFree(RAdamRule, PrimalForm):
    __doc__ = """Schedule-Free RAdam. Call ``optimizer.train()`` before training and ``optimizer.eval()``
    before evaluating or saving; a new optimizer starts in train mode. No warmup is needed.

    Example::

        opt = RAdamScheduleFree(model.parameters(), lr=1e-3)

    """ + RAdamRule.__doc__.split("\n\n", 1)[1]


class RAdamScheduleFreeClosure(RAdamRule, ClosureForm):
    __doc__ = """Schedule-Free RAdam driven by a closure; parameters hold x between steps.

    Example::

        loss = RAdamScheduleFreeClosure(model.parameters(), lr=1e-3).step(closure)

    """ + RAdamRule.__doc__.split("\n\n", 1)[1]
