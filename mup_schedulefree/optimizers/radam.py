"""Schedule-free RAdam: AdamW-SF with RAdam's variance rectification instead of a warmup."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .base import FLAGS_DOC, ClosureForm, PrimalForm
from .rules import PARAMS_DOC, RADAM, RADAM_ARGS_DOC, RADAM_UPDATE_DOC, SILENT_SGD_PHASE_DOC


class RAdamScheduleFree(PrimalForm):
    __doc__ = f"""Schedule-Free RAdam. Call ``optimizer.train()`` before training and ``optimizer.eval()``
    before evaluating or saving; a new optimizer starts in train mode. No warmup is needed.

    {RADAM_UPDATE_DOC}

    Example::

        opt = RAdamScheduleFree(model.parameters(), lr=1e-3)

    Args:
        {PARAMS_DOC}
        {RADAM_ARGS_DOC}
        {SILENT_SGD_PHASE_DOC}
        {FLAGS_DOC}
    """

    rule = RADAM
    mup_rule = RADAM.mup_rule  # the muP scaling rule (see scaling.py) that fits this update

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 r: float = 0.0, weight_lr_power: float = 2.0, foreach: bool | None = None,
                 silent_sgd_phase: bool = True, fused: bool | None = None, master_weights: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r,
                                      weight_lr_power=weight_lr_power, foreach=foreach,
                                      silent_sgd_phase=silent_sgd_phase, fused=fused, master_weights=master_weights))


class RAdamScheduleFreeClosure(ClosureForm):
    __doc__ = f"""Schedule-Free RAdam driven by a closure; parameters hold x between steps.

    {RADAM_UPDATE_DOC}

    Example::

        loss = RAdamScheduleFreeClosure(model.parameters(), lr=1e-3).step(closure)

    Args:
        {PARAMS_DOC}
        {RADAM_ARGS_DOC}
        {SILENT_SGD_PHASE_DOC}
        {FLAGS_DOC}
    """

    rule = RADAM
    mup_rule = RADAM.mup_rule

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 r: float = 0.0, weight_lr_power: float = 2.0, foreach: bool | None = None,
                 silent_sgd_phase: bool = True, fused: bool | None = None, master_weights: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r,
                                      weight_lr_power=weight_lr_power, foreach=foreach,
                                      silent_sgd_phase=silent_sgd_phase, fused=fused, master_weights=master_weights))
