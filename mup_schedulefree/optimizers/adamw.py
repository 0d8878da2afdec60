"""Schedule-free AdamW: Adam's per-coordinate normalisation inside the schedule-free averaging."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import kernels
from ..schedule import warmup_multiplier
from ..validation import check_range
from .base import ClosureForm, PrimalForm, advance_schedule, check_betas, check_common


class AdamWRule:
    """The AdamW-SF update rule (mixin for a schedule-free form).

    z <- z - lr * (g / (sqrt(v / (1 - beta2^k)) + eps) + weight_decay * y), with v the EMA of g^2;
    y interpolates z and x with beta1. The lr has a linear warmup of ``warmup_steps``. With
    ``inner_momentum`` = mu > 0, g in the numerator becomes m / (1 - mu^k), m the EMA of g with decay mu.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default 0.0025).
        betas: (beta1, beta2): interpolation y = (1 - beta1) z + beta1 x, and second-moment decay
            (default (0.9, 0.999)). Requires 0 < beta1 < 1, 0 <= beta2 < 1.
        eps: added to the second-moment root (default 1e-8).
        weight_decay: decay at y, multiplied by the scheduled lr (default 0).
        warmup_steps: linear lr warmup length in steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the max lr in the averaging weight (default 2.0).
        inner_momentum: decay mu of an EMA m of the gradient, kept as ``exp_avg`` state, whose
            bias-corrected value m / (1 - mu^k) replaces g in the Adam direction: Adam's own first
            moment, inside the schedule-free averaging (default 0: none, and no memory for it;
            upstream suggests 0.9). 0 <= mu < 1; k counts the group's steps, as for beta2.
        foreach: list-wide ``_foreach`` ops for the eager path (default: on for non-CPU devices).
        fused: native single-pass kernel for CPU float32 tensors (default: on where available).
        master_weights: float32 master copy and state for float16/bfloat16 parameters (default True).
    """

    mup_rule = "adam"  # the muP scaling rule (see scaling.py) that fits this update

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0, inner_momentum: float = 0.0,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, inner_momentum=inner_momentum, foreach=foreach,
                        fused=fused, master_weights=master_weights)
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_common(group)
        check_betas(group["betas"])
        if "inner_momentum" in group:  # RAdam's groups have none
            check_range("inner_momentum", group["inner_momentum"], 0.0, 1.0)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg_sq", "exp_avg") if group.get("inner_momentum") else ("exp_avg_sq",)

    def _multiplier(self, group: dict[str, Any]) -> tuple[float, bool]:
        return warmup_multiplier(group["k"], group["warmup_steps"]), True

    def _advance(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        k = group["k"]
        multiplier, adaptive = self._multiplier(group)
        lr, ckp1 = advance_schedule(group, multiplier)
        scalars = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                       ckp1=ckp1, bias_correction2=1.0 - beta2 ** (k + 1), adaptive=adaptive)
        inner = float(group.get("inner_momentum", 0.0))
        if inner:
            scalars.update(inner_momentum=inner, bias_correction1=1.0 - inner ** (k + 1))
        return scalars

    def _native_op(self, group: dict[str, Any]) -> str:
        return "adam_sf_inner_step_" if group.get("inner_momentum") else "adam_sf_step_"

    def _kernel(self, lists: list[list[torch.Tensor]], scalars: dict[str, Any], *, fused: bool | None,
                foreach: bool | None, closure_form: bool, masters: list[torch.Tensor | None] | None,
                prepared: Any = None) -> None:
        kernels.adam_step_(*lists, **scalars, closure_form=closure_form, foreach=foreach, fused=fused,
                           masters=masters, prepared=prepared)


class AdamWScheduleFree(AdamWRule, PrimalForm):
    __doc__ = """Schedule-Free AdamW. Call ``optimizer.train()`` before training and ``optimizer.eval()``
    before evaluating or saving; a new optimizer starts in train mode.

    Example::

        opt = AdamWScheduleFree(model.parameters(), lr=1e-3, warmup_steps=100)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        opt.eval()   # parameters now hold the averaged point x

    """ + AdamWRule.__doc__.split("\n\n", 1)[1]


class AdamWScheduleFreeClosure(AdamWRule, ClosureForm):
    __doc__ = """Schedule-Free AdamW driven by a closure; parameters hold x between steps, so no
    train()/eval() calls are needed.

    Example::

        def closure():
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
        opt = AdamWScheduleFreeClosure(model.parameters(), lr=1e-3)
        loss = opt.step(closure)

    ``inner_momentum`` comes last here: the published closure class (1.4.1 and upstream HEAD)
    has no such argument, so its positional arguments keep their places.

    """ + AdamWRule.__doc__.split("\n\n", 1)[1]

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool | None = None, fused: bool | None = None, master_weights: bool = True,
                 inner_momentum: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         r=r, weight_lr_power=weight_lr_power, inner_momentum=inner_momentum, foreach=foreach,
                         fused=fused, master_weights=master_weights)
