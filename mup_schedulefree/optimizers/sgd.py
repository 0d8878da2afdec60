"""Schedule-free SGD: plain gradient steps on z, averaged into x, gradients taken at y."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .base import FLAGS_DOC, ClosureForm, PrimalForm
from .rules import PARAMS_DOC, SGD, SGD_ARGS_DOC, SGD_UPDATE_DOC


class SGDScheduleFree(PrimalForm):
    __doc__ = f"""Schedule-Free SGD. Call ``optimizer.train()`` before training and ``optimizer.eval()``
    before evaluating or saving; a new optimizer starts in train mode.

    {SGD_UPDATE_DOC}

    Example::

        opt = SGDScheduleFree(model.parameters(), lr=0.5, warmup_steps=100)

    Args:
        {PARAMS_DOC}
        {SGD_ARGS_DOC}
        {FLAGS_DOC}
    """

    rule = SGD
    mup_rule = SGD.mup_rule  # the muP scaling rule (see scaling.py) that fits this update

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                      r=r, weight_lr_power=weight_lr_power, foreach=foreach, fused=fused,
                                      master_weights=master_weights))


class SGDScheduleFreeClosure(ClosureForm):
    __doc__ = f"""Schedule-Free SGD driven by a closure; parameters hold x between steps.

    {SGD_UPDATE_DOC}

    Its positional order is ``(params, lr, weight_decay, momentum, ...)``, as in the published
    class of the same name (the other SGD forms take ``momentum`` before ``weight_decay``).

    Example::

        loss = SGDScheduleFreeClosure(model.parameters(), lr=0.5).step(closure)

    Args:
        {PARAMS_DOC}
        {SGD_ARGS_DOC}
        {FLAGS_DOC}
    """

    rule = SGD
    mup_rule = SGD.mup_rule

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1.0, weight_decay: float = 0,
                 momentum: float = 0.9, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                      r=r, weight_lr_power=weight_lr_power, foreach=foreach, fused=fused,
                                      master_weights=master_weights))
