"""muP factories: regroup parameters with :mod:`scaling`, then construct the optimizer.

``MuAdamW_ScheduleFree(params, impl=AdamWScheduleFree, decoupled_wd=False, **kwargs)`` and its
siblings accept what users have: ``model.parameters()``, ``model.named_parameters()`` (errors then
name parameters), or group dicts of either. ``impl`` may be any optimizer class with a
torch.optim-style constructor: this package's, the published ``schedulefree`` classes, or
torch.optim classes. The returned optimizer refuses, with a clear error, a state dict saved from
a different muP grouping.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch.optim import Optimizer

from .optimizers import (
    AdamWScheduleFree,
    AdamWScheduleFreeClosure,
    AdamWScheduleFreeReference,
    RAdamScheduleFree,
    RAdamScheduleFreeClosure,
    ScheduleFreeWrapper,
    SGDScheduleFree,
    SGDScheduleFreeClosure,
    SGDScheduleFreeReference,
)
from .scaling import grouping_guard, infer_rule, mu_param_groups

InfShapes = Mapping[str, Any] | str | None


def _default(impl: type, name: str, fallback: Any) -> Any:
    """The default of constructor argument ``name`` of ``impl``, or ``fallback``."""
    try:
        parameter = inspect.signature(impl).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def _decay_lr_power(impl: type, decoupled_wd: bool, decay_lr_power: int | None) -> int:
    """How ``impl`` couples weight decay to lr: explicit argument, else 0 if decoupled, else the
    class's ``decay_lr_power`` attribute, else 1 (decay multiplied by lr)."""
    if decay_lr_power is None:
        return 0 if decoupled_wd else int(getattr(impl, "decay_lr_power", 1))
    if decoupled_wd and decay_lr_power != 0:
        raise ValueError(f"decoupled_wd=True contradicts decay_lr_power={decay_lr_power!r}: pass one of them")
    return decay_lr_power


def mu_optimizer(
    params: Any,
    impl: type,
    rule: str,
    *,
    decoupled_wd: bool = False,
    decay_lr_power: int | None = None,
    infshapes: InfShapes = None,
    **kwargs: Any,
) -> Optimizer:
    """Build ``impl`` on muP-scaled parameter groups.

    Args:
        params: parameters, ``named_parameters()``, or group dicts of either.
        impl: optimizer class constructed as ``impl(groups, **kwargs)``.
        rule: muP rule, "adam" or "sgd" (see :mod:`mup_schedulefree.scaling`).
        decoupled_wd: the optimizer's decay does not scale with lr, so weight decay is not rescaled.
        decay_lr_power: power q of lr in the optimizer's decay step (1, 2, or 0); overrides the
            ``decay_lr_power`` attribute of ``impl`` (default 1).
        infshapes: mapping name -> InfShape or mup base-shape file, for parameters that lost
            ``infshape`` (requires named parameters).
        **kwargs: optimizer arguments; ``lr`` and ``weight_decay`` are the base-width values.

    Returns:
        The optimizer, guarded against loading a state dict of a different muP grouping.
    """
    if not isinstance(impl, type):
        raise TypeError(f"impl must be an optimizer class, got {impl!r}")
    lr = kwargs.get("lr", _default(impl, "lr", None))
    if lr is None:
        raise ValueError(f"lr is required: {impl.__name__} has no default learning rate")
    decay = {"weight_decay": kwargs.get("weight_decay", _default(impl, "weight_decay", 0.0))}
    groups = mu_param_groups(params, rule, lr=float(lr), decay_keys=decay,
                             decay_lr_power=_decay_lr_power(impl, decoupled_wd, decay_lr_power), infshapes=infshapes)
    optimizer = impl(groups, **kwargs)
    grouping_guard(optimizer)
    return optimizer


def MuAdamW_ScheduleFree(params: Any, impl: type = AdamWScheduleFree, decoupled_wd: bool = False, **kwargs: Any) -> Optimizer:
    """Schedule-Free AdamW with muP scaling (Adam rule: matrix-like lr / width_mult).

    Example::

        mup.set_base_shapes(model, base_model, delta=delta_model)
        opt = MuAdamW_ScheduleFree(model.named_parameters(), lr=3e-3, weight_decay=0.1)

    Args:
        params: parameters, ``named_parameters()``, or group dicts of either.
        impl: the optimizer class (default :class:`AdamWScheduleFree`; the published
            ``schedulefree.AdamWScheduleFree`` or ``torch.optim.AdamW`` also work).
        decoupled_wd: weight decay that does not scale with lr is left unscaled.
        **kwargs: ``infshapes``, ``decay_lr_power`` (see :func:`mu_optimizer`) and ``impl``'s arguments.

    Returns:
        The optimizer.
    """
    return mu_optimizer(params, impl, "adam", decoupled_wd=decoupled_wd, **kwargs)


def MuRAdam_ScheduleFree(params: Any, impl: type = RAdamScheduleFree, decoupled_wd: bool = False, **kwargs: Any) -> Optimizer:
    """Schedule-Free RAdam with muP scaling (Adam rule). Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return mu_optimizer(params, impl, "adam", decoupled_wd=decoupled_wd, **kwargs)


def MuSGD_ScheduleFree(params: Any, impl: type = SGDScheduleFree, decoupled_wd: bool = False, **kwargs: Any) -> Optimizer:
    """Schedule-Free SGD with muP scaling (SGD rule: matrix-like lr / fan-in-fan-out ratio,
    vector-like lr x width_mult). Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return mu_optimizer(params, impl, "sgd", decoupled_wd=decoupled_wd, **kwargs)


def MuAdamW_ScheduleFreeClosure(params: Any, impl: type = AdamWScheduleFreeClosure, decoupled_wd: bool = False,
                                **kwargs: Any) -> Optimizer:
    """Closure-form Schedule-Free AdamW with muP scaling. Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return mu_optimizer(params, impl, "adam", decoupled_wd=decoupled_wd, **kwargs)


def MuRAdam_ScheduleFreeClosure(params: Any, impl: type = RAdamScheduleFreeClosure, decoupled_wd: bool = False,
                                **kwargs: Any) -> Optimizer:
    """Closure-form Schedule-Free RAdam with muP scaling. Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return mu_optimizer(params, impl, "adam", decoupled_wd=decoupled_wd, **kwargs)


def MuSGD_ScheduleFreeClosure(params: Any, impl: type = SGDScheduleFreeClosure, decoupled_wd: bool = False,
                              **kwargs: Any) -> Optimizer:
    """Closure-form Schedule-Free SGD with muP scaling. Arguments as :func:`MuSGD_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return mu_optimizer(params, impl, "sgd", decoupled_wd=decoupled_wd, **kwargs)


def MuAdamW_ScheduleFreeReference(params: Any, impl: type = AdamWScheduleFreeReference, decoupled_wd: bool = False,
                                  **kwargs: Any) -> Optimizer:
    """Reference Schedule-Free AdamW with muP scaling. Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return mu_optimizer(params, impl, "adam", decoupled_wd=decoupled_wd, **kwargs)


def MuSGD_ScheduleFreeReference(params: Any, impl: type = SGDScheduleFreeReference, decoupled_wd: bool = False,
                                **kwargs: Any) -> Optimizer:
    """Reference Schedule-Free SGD with muP scaling. Arguments as :func:`MuSGD_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return mu_optimizer(params, impl, "sgd", decoupled_wd=decoupled_wd, **kwargs)


def MuScheduleFreeWrapper(
    params: Any,
    base_impl: type = torch.optim.Adam,
    rule: str | None = None,
    weight_decay_at_y: float = 0.0,
    momentum: float = 0.9,
    weight_lr_power: float = 2,
    r: float = 0,
    decoupled_wd: bool = False,
    **base_kwargs: Any,
) -> ScheduleFreeWrapper:
    """A muP-scaled base optimizer made schedule-free, with per-group decay at y.

    Both the base optimizer's ``weight_decay`` (taken at z) and ``weight_decay_at_y`` are scaled
    per group like any decay multiplied by lr.

    Example::

        opt = MuScheduleFreeWrapper(model.named_parameters(), torch.optim.Adam, lr=1e-3,
                                    betas=(0.0, 0.999), weight_decay_at_y=0.1)

    Args:
        params: parameters, ``named_parameters()``, or group dicts of either.
        base_impl: the base optimizer class (default ``torch.optim.Adam``).
        rule: muP rule "adam" or "sgd"; inferred for torch.optim classes, required otherwise.
        weight_decay_at_y: decay at y at the base width (group key ``weight_decay_at_y`` overrides).
        momentum: the wrapper's interpolation coefficient, 0 < momentum < 1.
        weight_lr_power: power of the max lr in the averaging weight.
        r: polynomial weighting power of the average.
        decoupled_wd: leave both decays unscaled.
        **base_kwargs: ``infshapes``, ``decay_lr_power`` (see :func:`mu_optimizer`) and the base
            optimizer's arguments.

    Returns:
        The wrapper.
    """
    rule = rule if rule is not None else infer_rule(base_impl)
    if rule is None:
        raise ValueError(f"rule is required for base_impl={getattr(base_impl, '__name__', base_impl)!r}: "
                         "pass rule='adam' (entrywise-normalised updates) or rule='sgd' (raw-gradient updates)")
    infshapes = base_kwargs.pop("infshapes", None)
    power = _decay_lr_power(base_impl, decoupled_wd, base_kwargs.pop("decay_lr_power", None))
    lr = base_kwargs.get("lr", _default(base_impl, "lr", None))
    if lr is None:
        raise ValueError(f"lr is required: {base_impl.__name__} has no default learning rate")
    decay = {"weight_decay": base_kwargs.get("weight_decay", _default(base_impl, "weight_decay", 0.0)),
             "weight_decay_at_y": weight_decay_at_y}
    groups = mu_param_groups(params, rule, lr=float(lr), decay_keys=decay, decay_lr_power=power, infshapes=infshapes)
    wrapper = ScheduleFreeWrapper(base_impl(groups, **base_kwargs), weight_decay_at_y=weight_decay_at_y,
                                  momentum=momentum, weight_lr_power=weight_lr_power, r=r)
    grouping_guard(wrapper)
    return wrapper
