"""Schedule-free SGD: plain gradient steps on z, averaged into x, gradients taken at y."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import kernels
from ..schedule import warmup_multiplier
from ..validation import check_range
from .base import ClosureForm, PrimalForm, advance_schedule, check_common


class SGDRule:
    """The SGD-SF update rule (mixin for a schedule-free form).

    z <- z - lr * (g + weight_decay * y); y interpolates z and x with ``momentum``.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default 1.0).
        momentum: interpolation y = (1 - momentum) z + momentum x (default 0.9); 0 < momentum < 1.
        weight_decay: decay at y, multiplied by the scheduled lr (default 0).
        warmup_steps: linear lr warmup length in steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the max lr in the averaging weight (default 2).
        foreach: list-wide ``_foreach`` ops for the eager path (default: on for non-CPU devices).
        fused: native single-pass kernel for CPU float32 tensors (default: on where available).
        master_weights: float32 master copy and state for float16/bfloat16 parameters (default True).
    """

    mup_rule = "sgd"  # the muP scaling rule (see scaling.py) that fits this update

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, foreach=foreach, fused=fused,
                        master_weights=master_weights)
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_common(group)
        check_range("momentum", group["momentum"], 0.0, 1.0, low_open=True)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _advance(self, group: dict[str, Any]) -> dict[str, Any]:
        lr, ckp1 = advance_schedule(group, warmup_multiplier(group["k"], group["warmup_steps"]))
        return dict(lr=lr, momentum=group["momentum"], weight_decay=group["weight_decay"], ckp1=ckp1)

    def _native_op(self, group: dict[str, Any]) -> str:
        return "sgd_sf_step_"  # its fused primal step in native.OPS

    def _kernel(self, lists: list[list[torch.Tensor]], scalars: dict[str, Any], *, fused: bool | None,
                foreach: bool | None, closure_form: bool, masters: list[torch.Tensor | None] | None,
                prepared: Any = None) -> None:
        kernels.sgd_step_(*lists, **scalars, closure_form=closure_form, foreach=foreach, fused=fused,
                          masters=masters, prepared=prepared)


class SGDScheduleFree(SGDRule, PrimalForm):
    __doc__ = """Schedule-Free SGD. Call ``optimizer.train()`` before training and ``optimizer.eval()``
    before evaluating or saving; a new optimizer starts in train mode.

    Example::

        opt = SGDScheduleFree(model.parameters(), lr=0.5, warmup_steps=100)

    """ + SGDRule.__doc__.split("\n\n", 1)[1]


class SGDScheduleFreeClosure(SGDRule, ClosureForm):
    __doc__ = """Schedule-Free SGD driven by a closure; parameters hold x between steps.

    Its positional order is ``(params, lr, weight_decay, momentum, ...)``, as in the published
    class of the same name (the other SGD forms take ``momentum`` before ``weight_decay``).

    Example::

        loss = SGDScheduleFreeClosure(model.parameters(), lr=0.5).step(closure)

    """ + SGDRule.__doc__.split("\n\n", 1)[1]

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1.0, weight_decay: float = 0,
                 momentum: float = 0.9, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         r=r, weight_lr_power=weight_lr_power, foreach=foreach, fused=fused,
                         master_weights=master_weights)
