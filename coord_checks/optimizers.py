"""Named optimizer choices for the checks: the muP factory and its standard-parametrization twin.

Each choice maps to two factories ``params -> optimizer``:

* ``mup``: the muP factory of ``mup_schedulefree`` (``MuAdamW_ScheduleFree`` & co), which needs
  parameters carrying ``p.infshape`` and scales the learning rate per parameter group;
* ``sp``: the plain schedule-free optimizer with one learning rate for every parameter.

``wrapper`` wraps ``torch.optim.Adam`` with ``betas=(0.0, 0.999)`` in ``ScheduleFreeWrapper``
(momentum 0.9): the wrapper supplies the momentum, so the base optimizer has none.

``adamc-plus`` is ScheduleFree+ (``AdamCScheduleFreePlus``; its lr multiplies the Polyak step
size); under muP, ``MuAdamC_ScheduleFreePlus`` with each group's Polyak weight its lr multiplier.
``adamc-plus-naive`` is the same under muP with every Polyak weight 1 (``polyak="global"``,
upstream's rule, which shrinks the step size like 1/width); in SP the two are the same optimizer.

``muon`` is ``MuMuon_ScheduleFree``: schedule-free Muon on the hidden matrices, schedule-free AdamW
on the rest. Its lr is Muon's; the AdamW part keeps adamw's default lr (``adam_lr`` overrides), so
a sweep moves Muon's lr alone. Muon runs with ``adjust_lr_fn="match_rms_adamw"``, where the "muon"
rule's multiplier is 1 / sqrt(width_mult); under "original" it is 1 for matrices whose dims grow
alike, and there would be nothing to contrast. Its update RMS matches AdamW's, but a low-rank
gradient's orthogonalisation spreads it over few directions, so Muon needs a larger lr than
AdamW to move the hidden layers as much within a few steps (0.3 here). ``muon-unscaled`` is the
same with the Muon part's groups put back at the base-width lr and decay: the "muon" rule undone,
everything else muP. In SP both follow torch's documented recipe: Muon on every 2-D parameter,
AdamW on the others, the same two lrs.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import mup_schedulefree as msf
import torch
from torch import nn

from coord_checks.choices import check_choice
from coord_checks.models import check_parametrization

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "sgd", "radam", "wrapper", "adamc-plus", "adamc-plus-naive", "muon",
                                     "muon-unscaled")
#: Base-width learning rates at which standard parametrization visibly breaks width-independence
#: within a few steps while muP does not (the checks compare, they do not tune). The Transformer
#: check uses 1.0 for SGD (see ``coord_checks.experiments.default_lr``). ScheduleFree+'s lr is a
#: multiplier on its Polyak step size (upstream's default 1.0).
DEFAULT_LRS: dict[str, float] = {"adamw": 1e-2, "sgd": 0.5, "radam": 1e-2, "wrapper": 1e-2,
                                 "adamc-plus": 1.0, "adamc-plus-naive": 1.0, "muon": 0.3, "muon-unscaled": 0.3}
_POLYAK = {"adamc-plus": "mup", "adamc-plus-naive": "global"}
_WRAPPER_BASE_KWARGS: dict[str, Any] = {"betas": (0.0, 0.999)}
_MUON_ADJUST = "match_rms_adamw"
_MUON_ADAM_LR = DEFAULT_LRS["adamw"]  # the AdamW part's lr in the muon choices; their lr is Muon's


def _muon(params: Iterable[nn.Parameter], mup: bool, scaled: bool, lr: float, kwargs: dict[str, Any]
          ) -> torch.optim.Optimizer:
    """The ``muon`` choices (see the module docstring)."""
    if not mup:
        params = list(params)
        matrices = [p for p in params if p.ndim == 2]
        others = [p for p in params if p.ndim != 2]
        weight_decay = kwargs.get("weight_decay", 0.0)
        parts = [msf.ScheduleFreeWrapper(torch.optim.Muon(matrices, lr=lr, weight_decay=0.0, momentum=0.0,
                                                          nesterov=False, adjust_lr_fn=_MUON_ADJUST),
                                         weight_decay_at_y=weight_decay)]
        if others:
            parts.insert(0, msf.AdamWScheduleFree(others, lr=kwargs.get("adam_lr", _MUON_ADAM_LR),
                                                  weight_decay=weight_decay))
        return msf.ComposedOptimizer(parts)
    defaults = {"adam_lr": _MUON_ADAM_LR, "adjust_lr_fn": _MUON_ADJUST}
    optimizer = msf.MuMuon_ScheduleFree(params, lr=lr, **{**defaults, **kwargs})
    if not scaled:
        for group in optimizer.parts[1].param_groups:
            group.update(lr=lr, weight_decay_at_y=kwargs.get("weight_decay", 0.0))
    return optimizer


def check_optimizer_name(name: str) -> str:
    """Validate an optimizer choice.

    Args:
        name: one of ``OPTIMIZER_NAMES``.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: for any other name.
    """
    return check_choice("optimizer", name, OPTIMIZER_NAMES)


def optimizer_factory(
    name: str, parametrization: str, lr: float | None = None, **kwargs: Any
) -> OptimizerFactory:
    """A ``params -> optimizer`` factory for a named schedule-free optimizer.

    Args:
        name: one of ``OPTIMIZER_NAMES``.
        parametrization: ``"mup"`` (muP factory) or ``"sp"`` (plain optimizer).
        lr: learning rate (default ``DEFAULT_LRS[name]``); under muP it is the base-width rate.
        **kwargs: further optimizer arguments (for ``wrapper``: arguments of the base Adam).

    Returns:
        A callable taking an iterable of parameters and returning the optimizer, in train mode.

    Raises:
        ValueError: for an unknown name or parametrization, or a non-positive ``lr``.
    """
    check_optimizer_name(name)
    check_parametrization(parametrization)
    lr = DEFAULT_LRS[name] if lr is None else lr
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    mup = parametrization == "mup"

    if name == "wrapper":
        base_kwargs = {**_WRAPPER_BASE_KWARGS, **kwargs}

        def make_wrapper(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
            if mup:
                return msf.MuScheduleFreeWrapper(
                    params, base_impl=torch.optim.Adam, lr=lr, **base_kwargs
                )
            return msf.ScheduleFreeWrapper(torch.optim.Adam(params, lr=lr, **base_kwargs))

        return make_wrapper

    if name in ("muon", "muon-unscaled"):
        return lambda params: _muon(params, mup, name == "muon", lr, kwargs)

    if name in _POLYAK:
        def make_plus(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
            if mup:
                return msf.MuAdamC_ScheduleFreePlus(params, polyak=_POLYAK[name], lr=lr, **kwargs)
            return msf.AdamCScheduleFreePlus(params, lr=lr, **kwargs)

        return make_plus

    mup_factory, plain = {
        "adamw": (msf.MuAdamW_ScheduleFree, msf.AdamWScheduleFree),
        "sgd": (msf.MuSGD_ScheduleFree, msf.SGDScheduleFree),
        "radam": (msf.MuRAdam_ScheduleFree, msf.RAdamScheduleFree),
    }[name]
    build = mup_factory if mup else plain

    def make(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return build(params, lr=lr, **kwargs)

    return make
