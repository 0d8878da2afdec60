"""Named optimizer choices for the checks: the muP factory and its standard-parametrization twin.

Each choice maps to two factories ``params -> optimizer``:

* ``mup``: the muP factory of ``mup_schedulefree`` (``MuAdamW_ScheduleFree`` & co), which needs
  parameters carrying ``p.infshape`` and scales the learning rate per parameter group;
* ``sp``: the plain schedule-free optimizer with one learning rate for every parameter.

``wrapper`` wraps ``torch.optim.Adam`` with ``betas=(0.0, 0.999)`` in ``ScheduleFreeWrapper``
(momentum 0.9): the wrapper supplies the momentum, so the base optimizer has none.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import mup_schedulefree as msf
import torch
from torch import nn

from coord_checks.choices import check_choice
from coord_checks.models import check_parametrization

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "sgd", "radam", "wrapper")
#: Base-width learning rates at which standard parametrization visibly breaks width-independence
#: within a few steps while muP does not (the checks compare, they do not tune). The Transformer
#: check uses 1.0 for SGD (see ``coord_checks.experiments.default_lr``).
DEFAULT_LRS: dict[str, float] = {"adamw": 1e-2, "sgd": 0.5, "radam": 1e-2, "wrapper": 1e-2}
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
        name: ``"adamw"``, ``"sgd"``, ``"radam"`` or ``"wrapper"``.
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

    mup_factory, plain = {
        "adamw": (msf.MuAdamW_ScheduleFree, msf.AdamWScheduleFree),
        "sgd": (msf.MuSGD_ScheduleFree, msf.SGDScheduleFree),
        "radam": (msf.MuRAdam_ScheduleFree, msf.RAdamScheduleFree),
    }[name]
    build = mup_factory if mup else plain

    def make(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return build(params, lr=lr, **kwargs)

    return make
