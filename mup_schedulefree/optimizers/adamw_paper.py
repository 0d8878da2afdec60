"""Schedule-free AdamW as run in the paper's experiments: bias correction folded into the lr.

The paper form divides the gradient by the root of the raw second moment and multiplies the
learning rate by sqrt(1 - beta2^(k+1)) instead. Early in training, where v is still small, the two
forms differ by eps's weight: here eps is added to sqrt(v), not to sqrt(v / (1 - beta2^(k+1))). The
corrected lr also enters the averaging weight, so lr_max grows with the correction. The published
package keeps this form to reproduce the paper; it can be unstable on some problems, and
:class:`~mup_schedulefree.optimizers.adamw.AdamWScheduleFree` is the one to train with.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .base import FLAGS_DOC, PrimalForm
from .rules import ADAMW_PAPER, ADAMW_PAPER_ARGS_DOC, ADAMW_PAPER_UPDATE_DOC, PARAMS_DOC


class AdamWScheduleFreePaper(PrimalForm):
    __doc__ = f"""Schedule-Free AdamW in the form of the paper's experiments. Call ``optimizer.train()``
    before training and ``optimizer.eval()`` before evaluating or saving; a new optimizer starts
    in train mode.

    {ADAMW_PAPER_UPDATE_DOC}
    Kept to reproduce the paper; prefer :class:`AdamWScheduleFree`, which the published package
    recommends too.

    Example::

        opt = AdamWScheduleFreePaper(model.parameters(), lr=1e-3, warmup_steps=100)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        opt.eval()   # parameters now hold the averaged point x

    Args:
        {PARAMS_DOC}
        {ADAMW_PAPER_ARGS_DOC}
        {FLAGS_DOC}
    """

    rule = ADAMW_PAPER
    mup_rule = ADAMW_PAPER.mup_rule  # the muP scaling rule (see scaling.py) that fits this update

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True) -> None:
        # The published paper form has no inner_momentum (upstream HEAD neither), so its groups keep 0.
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      inner_momentum=0.0, foreach=foreach, fused=fused,
                                      master_weights=master_weights))
