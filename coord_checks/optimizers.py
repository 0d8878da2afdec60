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
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import mup_schedulefree as msf
import torch
from torch import nn

from coord_checks.choices import check_choice
from coord_checks.models import check_parametrization

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "sgd", "radam", "wrapper", "adamc-plus", "adamc-plus-naive")
#: Base-width learning rates at which standard parametrization visibly breaks width-independence
#: within a few steps while muP does not (the checks compare, they do not tune). The Transformer
#: check uses 1.0 for SGD (see ``coord_checks.experiments.default_lr``). ScheduleFree+'s lr is a
#: multiplier on its Polyak step size (upstream's default 1.0).
DEFAULT_LRS: dict[str, float] = {"adamw": 1e-2, "sgd": 0.5, "radam": 1e-2, "wrapper": 1e-2,
                                 "adamc-plus": 1.0, "adamc-plus-naive": 1.0}
_POLYAK = {"adamc-plus": "mup", "adamc-plus-naive": "global"}
_WRAPPER_BASE_KWARGS: dict[str, Any] = {"betas": (0.0, 0.999)}


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
