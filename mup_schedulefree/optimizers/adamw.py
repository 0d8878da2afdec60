"""Schedule-free AdamW: Adam's per-coordinate normalisation inside the schedule-free averaging."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .base import FLAGS_DOC, ClosureForm, PrimalForm
from .rules import ADAMW, ADAMW_ARGS_DOC, ADAMW_UPDATE_DOC, INNER_MOMENTUM_DOC, PARAMS_DOC


class AdamWScheduleFree(PrimalForm):
    __doc__ = f"""Schedule-Free AdamW. Call ``optimizer.train()`` before training and ``optimizer.eval()``
    before evaluating or saving; a new optimizer starts in train mode.

    {ADAMW_UPDATE_DOC}

    Example::

        opt = AdamWScheduleFree(model.parameters(), lr=1e-3, warmup_steps=100)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        opt.eval()   # parameters now hold the averaged point x

    Args:
        {PARAMS_DOC}
        {ADAMW_ARGS_DOC}
        {INNER_MOMENTUM_DOC}
        {FLAGS_DOC}
    """

    rule = ADAMW
    mup_rule = ADAMW.mup_rule  # the muP scaling rule (see scaling.py) that fits this update

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0, inner_momentum: float = 0.0,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      inner_momentum=inner_momentum, foreach=foreach, fused=fused,
                                      master_weights=master_weights))


class AdamWScheduleFreeClosure(ClosureForm):
    __doc__ = f"""Schedule-Free AdamW driven by a closure; parameters hold x between steps, so no
    train()/eval() calls are needed.

    {ADAMW_UPDATE_DOC}

    Example::

        def closure():
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
        opt = AdamWScheduleFreeClosure(model.parameters(), lr=1e-3)
        loss = opt.step(closure)

    ``inner_momentum`` comes last here: the published closure class (1.4.1 and upstream HEAD)
    has no such argument, so its positional arguments keep their places.

    Args:
        {PARAMS_DOC}
        {ADAMW_ARGS_DOC}
        {FLAGS_DOC}
        {INNER_MOMENTUM_DOC}
    """

    rule = ADAMW
    mup_rule = ADAMW.mup_rule

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True,
                 inner_momentum: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      inner_momentum=inner_momentum, foreach=foreach, fused=fused,
                                      master_weights=master_weights))
