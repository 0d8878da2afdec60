"""muP factories: regroup parameters with :mod:`scaling`, then construct the optimizer.

``MuAdamW_ScheduleFree(params, impl=AdamWScheduleFree, decoupled_wd=False, **kwargs)`` and its
siblings accept what users have: ``model.parameters()``, ``model.named_parameters()`` (errors then
name parameters), or group dicts of either. ``impl`` may be any optimizer class with a
torch.optim-style constructor: this package's, the published ``schedulefree`` classes, or
torch.optim classes. The returned optimizer refuses, with a clear error, a state dict saved from
a different muP grouping.

Every argument is checked before anything is built (before ``params`` is even read), with a
one-line error that names it: ``impl`` must be an optimizer class, the hyperparameters that get
scaled must be real numbers (a 1-element tensor lr works, as in torch.optim), and a factory
refuses an ``impl`` whose own muP rule (its ``mup_rule`` attribute, or a known torch/schedulefree
class) is not the factory's. ``mu_optimizer`` takes the rule as an argument and applies it to any
class: that is the way to override.

``scale_eps=True`` (Adam rule only; default False, mup 1.0.0's groups) also scales each group's
eps with width (:func:`mup_schedulefree.scaling.eps_scaling`), so that a base-width eps keeps its
size relative to Adam's sqrt(v), whose entries shrink with width under muP. SGD factories refuse it.

Every factory also takes ``depth_mult=`` (L / L_base), ``depth_alpha=`` (1 for CompleteP, 0.5
for depth-muP) and ``block_prefix=`` (default "blocks."): parameters inside residual blocks then
take the depth rule of :data:`mup_schedulefree.scaling.DEPTH_RULE` on top of the width rule; the
model's residual branches must be multiplied by depth_mult ** -alpha
(:func:`mup_schedulefree.depth.scale_residual_branches`). Default: no depth scaling.

``MuAdamC_ScheduleFreePlus`` (ScheduleFree+) also weights each group's gradient L1 norm in the
Polyak step size by its lr multiplier (``polyak="mup"``, :func:`mup_schedulefree.scaling.polyak_weight`),
without which the step size shrinks like 1/width; ``polyak="global"`` keeps upstream's weights of 1.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
from torch.optim import Optimizer

from .optimizers import (
    AdamCScheduleFreePlus,
    AdamWScheduleFree,
    AdamWScheduleFreeClosure,
    AdamWScheduleFreePaper,
    AdamWScheduleFreePaperReference,
    AdamWScheduleFreeReference,
    RAdamScheduleFree,
    RAdamScheduleFreeClosure,
    RAdamScheduleFreeReference,
    ScheduleFreeWrapper,
    ScheduleFreeWrapperReference,
    SGDScheduleFree,
    SGDScheduleFreeClosure,
    SGDScheduleFreeReference,
)
from .optimizers.composite import ComposedOptimizer
from .scaling import (BLOCK_PREFIX, check_adjust_lr_fn, check_decay_lr_power, check_depth, check_rule, check_scale_eps,
                      grouping_guard, infer_rule, mu_param_groups, polyak_weight, resolve_infshapes,
                      split_hidden_matrices)
from .validation import check_count, check_range, real_number

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


def _check_optimizer_class(name: str, value: Any) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is a subclass of ``torch.optim.Optimizer``."""
    if isinstance(value, type) and issubclass(value, Optimizer):
        return
    got = "a class that is not one" if isinstance(value, type) else type(value).__name__
    raise TypeError(f"Invalid {name}: {value!r} (must be an optimizer class, a subclass of torch.optim.Optimizer, "
                    f"got {got})")


def _decay_lr_power(impl: type, decoupled_wd: bool, decay_lr_power: int | None) -> int:
    """How ``impl`` couples weight decay to lr: explicit argument, else 0 if decoupled, else the
    class's ``decay_lr_power`` attribute, else 1 (decay multiplied by lr)."""
    if not isinstance(decoupled_wd, bool):
        raise TypeError(f"Invalid decoupled_wd: {decoupled_wd!r} (must be True or False, got "
                        f"{type(decoupled_wd).__name__})")
    if decay_lr_power is None:
        if decoupled_wd:
            return 0
        power = getattr(impl, "decay_lr_power", 1)
        check_decay_lr_power(f"{impl.__name__}.decay_lr_power", power)
        return power
    check_decay_lr_power("decay_lr_power", decay_lr_power)
    if decoupled_wd and decay_lr_power != 0:
        raise ValueError(f"decoupled_wd=True contradicts decay_lr_power={decay_lr_power!r}: pass one of them")
    return decay_lr_power


def _base_eps(impl: type, kwargs: Mapping[str, Any], scale_eps: bool) -> float | None:
    """Base-width eps to scale: None unless ``scale_eps``; else from ``kwargs``, else ``impl``'s
    default. An ``impl`` without an eps argument raises ValueError naming ``scale_eps``."""
    if not scale_eps:
        return None
    if "eps" not in kwargs and _default(impl, "eps", None) is None:
        raise ValueError(f"Invalid scale_eps: True ({impl.__name__} has no eps argument to scale)")
    return _base_value(impl, kwargs, "eps", None)


def _base_value(impl: type, kwargs: Mapping[str, Any], name: str, fallback: Any) -> Any:
    """Base-width value of the scaled hyperparameter ``name``: from ``kwargs``, else ``impl``'s
    default, else ``fallback``; checked to be a real number. A missing lr raises ValueError."""
    value = kwargs[name] if name in kwargs else _default(impl, name, fallback)
    if name == "lr" and "lr" not in kwargs and value is None:
        raise ValueError(f"lr is required: {impl.__name__} has no default learning rate")
    real_number(name, value)
    return value


def _adjust_lr_fn(impl: type, kwargs: Mapping[str, Any], rule: str) -> str | None:
    """Muon's ``adjust_lr_fn`` that the "muon" rule must cancel: from ``kwargs``, else ``impl``'s
    default; None under the other rules (they have no such factor)."""
    if rule != "muon":
        return None
    return kwargs["adjust_lr_fn"] if "adjust_lr_fn" in kwargs else _default(impl, "adjust_lr_fn", None)


def mu_optimizer(
    params: Any,
    impl: type,
    rule: str,
    *,
    decoupled_wd: bool = False,
    decay_lr_power: int | None = None,
    infshapes: InfShapes = None,
    scale_eps: bool = False,
    depth_mult: float | None = None,
    depth_alpha: float | None = None,
    block_prefix: str | Mapping[str, bool] = BLOCK_PREFIX,
    **kwargs: Any,
) -> Optimizer:
    """Build ``impl`` on muP-scaled parameter groups.

    Args:
        params: parameters, ``named_parameters()``, or group dicts of either.
        impl: optimizer class constructed as ``impl(groups, **kwargs)``.
        rule: muP rule, "adam", "sgd" or "muon" (see :mod:`mup_schedulefree.scaling`; under "muon"
            the multiplier cancels ``impl``'s ``adjust_lr_fn``, read from ``kwargs`` or its default).
        decoupled_wd: the optimizer's decay does not scale with lr, so weight decay is not rescaled.
        decay_lr_power: power q of lr in the optimizer's decay step (1, 2, or 0); overrides the
            ``decay_lr_power`` attribute of ``impl`` (default 1).
        infshapes: mapping name -> InfShape or mup base-shape file, for parameters that lost
            ``infshape`` (requires named parameters).
        scale_eps: also scale each group's eps with width (Adam rule only; see
            :func:`mup_schedulefree.scaling.mu_param_groups`). Default False: mup 1.0.0's groups.
        depth_mult: L / L_base, residual blocks over the base model's; None (default): no depth scaling.
        depth_alpha: 1 (CompleteP) or 0.5 (depth-muP); required with ``depth_mult``.
        block_prefix: name prefix of the parameters inside residual blocks (default "blocks."), or
            a mapping name -> bool (see :func:`mup_schedulefree.scaling.mu_param_groups`).
        **kwargs: optimizer arguments; ``lr``, ``weight_decay`` and ``eps`` are the base-width values.

    Returns:
        The optimizer, guarded against loading a state dict of a different muP grouping (or one
        saved with a different ``scale_eps``, ``depth_mult`` or ``depth_alpha``).

    Raises:
        TypeError: ``impl`` is not an optimizer class, lr / weight_decay / eps is not a real
            number, or ``scale_eps`` is not a bool.
        ValueError: an unknown rule, a missing lr, inconsistent decay arguments,
            ``scale_eps=True`` under the "sgd" rule or for an ``impl`` without eps, or depth
            arguments :func:`mup_schedulefree.scaling.check_depth` refuses; raised before
            ``params`` is read or any group is built.
    """
    _check_optimizer_class("impl", impl)
    check_rule("rule", rule)
    check_scale_eps("scale_eps", scale_eps, rule)
    check_depth(depth_mult, depth_alpha, block_prefix)
    lr = _base_value(impl, kwargs, "lr", None)
    decay = {"weight_decay": _base_value(impl, kwargs, "weight_decay", 0.0)}
    power = _decay_lr_power(impl, decoupled_wd, decay_lr_power)
    eps = _base_eps(impl, kwargs, scale_eps)
    groups = mu_param_groups(params, rule, lr=float(lr), decay_keys=decay, decay_lr_power=power, infshapes=infshapes,
                             scale_eps=scale_eps, eps=eps, adjust_lr_fn=_adjust_lr_fn(impl, kwargs, rule),
                             depth_mult=depth_mult, depth_alpha=depth_alpha, block_prefix=block_prefix)
    optimizer = impl(groups, **kwargs)
    grouping_guard(optimizer)
    return optimizer


def _mu_factory(factory: Callable[..., Optimizer], rule: str, params: Any, impl: type, decoupled_wd: bool,
                kwargs: dict[str, Any]) -> Optimizer:
    """:func:`mu_optimizer` under ``rule`` for ``factory``, refusing an ``impl`` that follows the other rule,
    and ScheduleFree+ anywhere but :func:`MuAdamC_ScheduleFreePlus` (its Polyak weights)."""
    _check_optimizer_class("impl", impl)
    if getattr(impl, "needs_function_value", False) and factory is not MuAdamC_ScheduleFreePlus:
        raise ValueError(f"{factory.__name__}: impl={impl.__name__} is ScheduleFree+, whose Polyak step size needs "
                         "per-group weights under muP: use MuAdamC_ScheduleFreePlus")
    impl_rule = infer_rule(impl)
    if impl_rule is not None and impl_rule != rule:
        raise ValueError(
            f"{factory.__name__} uses the {rule!r} rule but impl={impl.__name__} follows the {impl_rule!r} rule: "
            f"use {_factory_for(impl, impl_rule, factory)}, or mu_optimizer(params, impl, rule={rule!r}) to force "
            f"the {rule!r} rule")
    return mu_optimizer(params, impl, rule, decoupled_wd=decoupled_wd, **kwargs)


def _factory_for(impl: type, impl_rule: str, factory: Callable[..., Optimizer]) -> str:
    """Name of the factory to use for ``impl``: the one built for it (or a parent class), else the
    factory of ``impl_rule`` in the same form (primal, closure or reference) as ``factory``, or in
    primal form where the rule has no factory of that form (there is no SGD "Paper" form)."""
    for candidate in FACTORIES:
        if issubclass(impl, inspect.signature(candidate).parameters["impl"].default):
            return candidate.__name__
    if impl_rule == "muon":
        return "MuMuon_ScheduleFree"
    form = factory.__name__.rsplit("ScheduleFree", 1)[1]
    name = {"adam": "MuAdamW_ScheduleFree", "sgd": "MuSGD_ScheduleFree"}[impl_rule] + form
    return name if name in {candidate.__name__ for candidate in FACTORIES} else name[:len(name) - len(form)]


def MuAdamW_ScheduleFree(params: Any, impl: type = AdamWScheduleFree, decoupled_wd: bool = False,
                         scale_eps: bool = False, **kwargs: Any) -> Optimizer:
    """Schedule-Free AdamW with muP scaling (Adam rule: matrix-like lr / width_mult).

    Example::

        mup.set_base_shapes(model, base_model, delta=delta_model)
        opt = MuAdamW_ScheduleFree(model.named_parameters(), lr=3e-3, weight_decay=0.1)

    Args:
        params: parameters, ``named_parameters()``, or group dicts of either.
        impl: the optimizer class (default :class:`AdamWScheduleFree`; the published
            ``schedulefree.AdamWScheduleFree`` or ``torch.optim.AdamW`` also work).
        decoupled_wd: weight decay that does not scale with lr is left unscaled.
        scale_eps: also scale eps with width, eps * width_mult ** exponent per group (see
            :data:`mup_schedulefree.scaling.EPS_RULE`), so that a base-width eps keeps its size
            relative to sqrt(v). Default False: mup 1.0.0's groups, eps unscaled.
        **kwargs: ``infshapes``, ``decay_lr_power``, ``depth_mult``, ``depth_alpha``, ``block_prefix``
            (see :func:`mu_optimizer`) and ``impl``'s arguments.

    Returns:
        The optimizer.

    Raises:
        TypeError: ``impl`` is not an optimizer class, lr / weight_decay / eps is not a real
            number, or ``scale_eps`` is not a bool.
        ValueError: ``impl`` follows the SGD rule (its ``mup_rule``, or a known SGD-like class):
            use the matching factory, or :func:`mu_optimizer` with an explicit rule to override;
            ``scale_eps=True`` for an ``impl`` without eps; or depth arguments
            :func:`mup_schedulefree.scaling.check_depth` refuses.
    """
    return _mu_factory(MuAdamW_ScheduleFree, "adam", params, impl, decoupled_wd,
                       dict(kwargs, scale_eps=scale_eps))


def MuRAdam_ScheduleFree(params: Any, impl: type = RAdamScheduleFree, decoupled_wd: bool = False,
                         scale_eps: bool = False, **kwargs: Any) -> Optimizer:
    """Schedule-Free RAdam with muP scaling (Adam rule). Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return _mu_factory(MuRAdam_ScheduleFree, "adam", params, impl, decoupled_wd,
                       dict(kwargs, scale_eps=scale_eps))


def MuSGD_ScheduleFree(params: Any, impl: type = SGDScheduleFree, decoupled_wd: bool = False,
                       **kwargs: Any) -> Optimizer:
    """Schedule-Free SGD with muP scaling (SGD rule: matrix-like lr / fan-in-fan-out ratio,
    vector-like lr x width_mult). Arguments as :func:`MuAdamW_ScheduleFree`, except ``scale_eps``:
    SGD has no eps, and ``scale_eps=True`` raises ValueError naming it.

    Returns:
        The optimizer.
    """
    return _mu_factory(MuSGD_ScheduleFree, "sgd", params, impl, decoupled_wd, kwargs)


def MuAdamW_ScheduleFreeClosure(params: Any, impl: type = AdamWScheduleFreeClosure, decoupled_wd: bool = False,
                                scale_eps: bool = False, **kwargs: Any) -> Optimizer:
    """Closure-form Schedule-Free AdamW with muP scaling. Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return _mu_factory(MuAdamW_ScheduleFreeClosure, "adam", params, impl, decoupled_wd,
                       dict(kwargs, scale_eps=scale_eps))


def MuRAdam_ScheduleFreeClosure(params: Any, impl: type = RAdamScheduleFreeClosure, decoupled_wd: bool = False,
                                scale_eps: bool = False, **kwargs: Any) -> Optimizer:
    """Closure-form Schedule-Free RAdam with muP scaling. Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return _mu_factory(MuRAdam_ScheduleFreeClosure, "adam", params, impl, decoupled_wd,
                       dict(kwargs, scale_eps=scale_eps))


def MuSGD_ScheduleFreeClosure(params: Any, impl: type = SGDScheduleFreeClosure, decoupled_wd: bool = False,
                              **kwargs: Any) -> Optimizer:
    """Closure-form Schedule-Free SGD with muP scaling. Arguments as :func:`MuSGD_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return _mu_factory(MuSGD_ScheduleFreeClosure, "sgd", params, impl, decoupled_wd, kwargs)


def MuAdamW_ScheduleFreeReference(params: Any, impl: type = AdamWScheduleFreeReference, decoupled_wd: bool = False,
                                  scale_eps: bool = False, **kwargs: Any) -> Optimizer:
    """Reference Schedule-Free AdamW with muP scaling. Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return _mu_factory(MuAdamW_ScheduleFreeReference, "adam", params, impl, decoupled_wd,
                       dict(kwargs, scale_eps=scale_eps))


def MuRAdam_ScheduleFreeReference(params: Any, impl: type = RAdamScheduleFreeReference, decoupled_wd: bool = False,
                                  scale_eps: bool = False, **kwargs: Any) -> Optimizer:
    """Reference Schedule-Free RAdam with muP scaling. Arguments as :func:`MuAdamW_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return _mu_factory(MuRAdam_ScheduleFreeReference, "adam", params, impl, decoupled_wd,
                       dict(kwargs, scale_eps=scale_eps))


def MuAdamW_ScheduleFreePaper(params: Any, impl: type = AdamWScheduleFreePaper, decoupled_wd: bool = False,
                              scale_eps: bool = False, **kwargs: Any) -> Optimizer:
    """Schedule-Free AdamW of the paper's experiments with muP scaling (Adam rule). Arguments as
    :func:`MuAdamW_ScheduleFree`.

    The bias correction sqrt(1 - beta2^(k+1)) it folds into the lr is the same at every width, so
    the Adam rule applies unchanged, and so does the weight-decay scaling (decay at y multiplied
    by lr).

    Returns:
        The optimizer.
    """
    return _mu_factory(MuAdamW_ScheduleFreePaper, "adam", params, impl, decoupled_wd,
                       dict(kwargs, scale_eps=scale_eps))


def MuAdamW_ScheduleFreePaperReference(params: Any, impl: type = AdamWScheduleFreePaperReference,
                                       decoupled_wd: bool = False, scale_eps: bool = False,
                                       **kwargs: Any) -> Optimizer:
    """Reference form of the paper's Schedule-Free AdamW with muP scaling. Arguments as
    :func:`MuAdamW_ScheduleFreePaper`.

    Returns:
        The optimizer.
    """
    return _mu_factory(MuAdamW_ScheduleFreePaperReference, "adam", params, impl, decoupled_wd,
                       dict(kwargs, scale_eps=scale_eps))


def MuSGD_ScheduleFreeReference(params: Any, impl: type = SGDScheduleFreeReference, decoupled_wd: bool = False,
                                **kwargs: Any) -> Optimizer:
    """Reference Schedule-Free SGD with muP scaling. Arguments as :func:`MuSGD_ScheduleFree`.

    Returns:
        The optimizer.
    """
    return _mu_factory(MuSGD_ScheduleFreeReference, "sgd", params, impl, decoupled_wd, kwargs)


POLYAK_RULES = ("mup", "global")


def MuAdamC_ScheduleFreePlus(params: Any, impl: type = AdamCScheduleFreePlus, polyak: str = "mup",
                             decoupled_wd: bool = False, scale_eps: bool = False, **kwargs: Any) -> Optimizer:
    """ScheduleFree+ with muP scaling (Adam rule; AdamC's decay, coupled to lr squared, scaled by 1/lr_mult^2).

    ScheduleFree+ multiplies every group's lr by one Polyak step size, max(0, f + ip) divided by
    sqrt(pi/2) times the sum over groups of polyak_weight_G * |g_G|_1. Under muP the hidden
    groups' L1 norms grow like the width, so with weights of 1 (upstream's rule) the step size
    shrinks like 1/width and takes muP's lrs with it. ``polyak="mup"`` weights each group by its
    lr multiplier (:func:`mup_schedulefree.scaling.polyak_weight`; derivation in
    :mod:`mup_schedulefree.optimizers.adamc_plus`), which keeps the step size width-independent;
    at the base width every weight is 1, upstream's step. Every group records the choice as
    ``mup_polyak``, and a state dict saved with the other choice is refused.

    Example::

        mup.set_base_shapes(model, base_model, delta=delta_model)
        opt = MuAdamC_ScheduleFreePlus(model.named_parameters(), lr=1.0, c_warmup=100)
        loss = loss_fn(model(inputs), targets); loss.backward()
        opt.step(function_value=loss)

    Args:
        params: parameters, ``named_parameters()``, or group dicts of either (a group's own
            ``polyak_weight`` is multiplied by its lr multiplier under ``polyak="mup"``).
        impl: :class:`AdamCScheduleFreePlus` (default) or :class:`AdamCScheduleFreePlusPaper`.
        polyak: "mup" (each group's Polyak weight is its lr multiplier) or "global" (every
            weight 1: upstream's denominator, which breaks muP; kept for comparison).
        decoupled_wd: weight decay that does not scale with lr is left unscaled.
        scale_eps: also scale eps with width (see :func:`MuAdamW_ScheduleFree`). Default False.
        **kwargs: ``infshapes``, ``decay_lr_power``, ``depth_mult``, ``depth_alpha``, ``block_prefix``
            (see :func:`mu_optimizer`) and ``impl``'s arguments.

    Returns:
        The optimizer.

    Raises:
        TypeError, ValueError: as :func:`MuAdamW_ScheduleFree`; ValueError naming ``polyak`` for
            any other value than "mup" or "global", before ``params`` is read.
    """
    if not isinstance(polyak, str) or polyak not in POLYAK_RULES:
        raise ValueError(f"Invalid polyak: {polyak!r} (must be one of {POLYAK_RULES})")
    optimizer = _mu_factory(MuAdamC_ScheduleFreePlus, "adam", params, impl, decoupled_wd,
                            dict(kwargs, scale_eps=scale_eps))
    for group in optimizer.param_groups:
        group.update(polyak_weight=polyak_weight(group) if polyak == "mup" else group.get("polyak_weight", 1.0),
                     mup_polyak=polyak)
    return optimizer


def MuScheduleFreeWrapper(
    params: Any,
    base_impl: type = torch.optim.Adam,
    rule: str | None = None,
    weight_decay_at_y: float = 0.0,
    momentum: float = 0.9,
    weight_lr_power: float = 2,
    r: float = 0,
    decoupled_wd: bool = False,
    scale_eps: bool = False,
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
        rule: muP rule "adam", "sgd" or "muon"; inferred for torch.optim classes, required otherwise.
        weight_decay_at_y: decay at y at the base width (group key ``weight_decay_at_y`` overrides).
        momentum: the wrapper's interpolation coefficient, 0 < momentum < 1.
        weight_lr_power: power of the max lr in the averaging weight.
        r: polynomial weighting power of the average.
        decoupled_wd: leave both decays unscaled.
        scale_eps: also scale the base optimizer's eps with width (Adam rule only; see
            :func:`MuAdamW_ScheduleFree`). Default False.
        **base_kwargs: ``infshapes``, ``decay_lr_power``, ``depth_mult``, ``depth_alpha``,
            ``block_prefix`` (see :func:`mu_optimizer`) and the base optimizer's arguments.

    Returns:
        The wrapper.

    Raises:
        TypeError: ``base_impl`` is not an optimizer class, or a scaled or numeric wrapper
            argument is not a real number.
        ValueError: no rule given for a class whose rule is unknown, an unknown rule, or
            ``scale_eps=True`` under the "sgd" rule or for a base without eps, or depth arguments
            :func:`mup_schedulefree.scaling.check_depth` refuses. An explicit ``rule`` overrides
            the one inferred from ``base_impl``.
    """
    return _mu_wrapper(ScheduleFreeWrapper, params, base_impl, rule, decoupled_wd, scale_eps, base_kwargs,
                       weight_decay_at_y=weight_decay_at_y, momentum=momentum, weight_lr_power=weight_lr_power, r=r)


def MuScheduleFreeWrapperReference(
    params: Any,
    base_impl: type = torch.optim.Adam,
    rule: str | None = None,
    momentum: float = 0.9,
    weight_decay_at_y: float = 0.0,
    r: float = 0,
    weight_lr_power: float = 2,
    decoupled_wd: bool = False,
    scale_eps: bool = False,
    **base_kwargs: Any,
) -> ScheduleFreeWrapperReference:
    """:class:`ScheduleFreeWrapperReference` around a muP-scaled base optimizer.

    The groups, rules and errors are those of :func:`MuScheduleFreeWrapper`; the wrapper's own
    arguments come in the reference class's order.

    Example::

        opt = MuScheduleFreeWrapperReference(model.named_parameters(), torch.optim.Adam, lr=1e-3,
                                             betas=(0.0, 0.999), weight_decay_at_y=0.1)

    Args:
        params: parameters, ``named_parameters()``, or group dicts of either.
        base_impl: the base optimizer class (default ``torch.optim.Adam``).
        rule: muP rule "adam" or "sgd"; inferred for torch.optim classes, required otherwise.
        momentum: the wrapper's interpolation coefficient, 0 < momentum < 1.
        weight_decay_at_y: decay at y at the base width (group key ``weight_decay_at_y`` overrides).
        r: polynomial weighting power of the average.
        weight_lr_power: power of the max lr in the averaging weight.
        decoupled_wd: leave both decays unscaled.
        scale_eps: also scale the base optimizer's eps with width (Adam rule only; see
            :func:`MuAdamW_ScheduleFree`). Default False.
        **base_kwargs: ``infshapes``, ``decay_lr_power``, ``depth_mult``, ``depth_alpha``,
            ``block_prefix`` (see :func:`mu_optimizer`) and the base optimizer's arguments.

    Returns:
        The wrapper.

    Raises:
        TypeError, ValueError: as :func:`MuScheduleFreeWrapper`.
    """
    return _mu_wrapper(ScheduleFreeWrapperReference, params, base_impl, rule, decoupled_wd, scale_eps, base_kwargs,
                       momentum=momentum, weight_decay_at_y=weight_decay_at_y, r=r, weight_lr_power=weight_lr_power)


def _mu_wrapper(wrapper_cls: type, params: Any, base_impl: type, rule: str | None, decoupled_wd: bool,
                scale_eps: bool, base_kwargs: dict[str, Any], **wrapper_kwargs: Any) -> Optimizer:
    """``wrapper_cls(base_impl(muP groups, **base_kwargs), **wrapper_kwargs)``, every argument checked first.

    Both decays, the base's ``weight_decay`` and ``weight_decay_at_y``, are scaled like a decay
    multiplied by lr (unless ``decoupled_wd``); the base's eps is scaled if ``scale_eps``.
    """
    _check_optimizer_class("base_impl", base_impl)
    rule = rule if rule is not None else infer_rule(base_impl)
    if rule is None:
        raise ValueError(f"rule is required for base_impl={base_impl.__name__}: "
                         "pass rule='adam' (entrywise-normalised updates) or rule='sgd' (raw-gradient updates)")
    check_rule("rule", rule)
    check_scale_eps("scale_eps", scale_eps, rule)
    for name, value in wrapper_kwargs.items():
        real_number(name, value)
    infshapes = base_kwargs.pop("infshapes", None)
    depth = {"depth_mult": base_kwargs.pop("depth_mult", None), "depth_alpha": base_kwargs.pop("depth_alpha", None),
             "block_prefix": base_kwargs.pop("block_prefix", BLOCK_PREFIX)}
    check_depth(**depth)
    power = _decay_lr_power(base_impl, decoupled_wd, base_kwargs.pop("decay_lr_power", None))
    lr = _base_value(base_impl, base_kwargs, "lr", None)
    decay = {"weight_decay": _base_value(base_impl, base_kwargs, "weight_decay", 0.0),
             "weight_decay_at_y": wrapper_kwargs["weight_decay_at_y"]}
    eps = _base_eps(base_impl, base_kwargs, scale_eps)
    groups = mu_param_groups(params, rule, lr=float(lr), decay_keys=decay, decay_lr_power=power, infshapes=infshapes,
                             scale_eps=scale_eps, eps=eps, adjust_lr_fn=_adjust_lr_fn(base_impl, base_kwargs, rule),
                             **depth)
    wrapper = wrapper_cls(base_impl(groups, **base_kwargs), **wrapper_kwargs)
    grouping_guard(wrapper)
    return wrapper


#: Group keys that only the Muon part reads, and the one only the AdamW part reads.
MUON_GROUP_KEYS = ("lr", "adjust_lr_fn", "ns_steps")
ADAM_GROUP_KEYS = ("adam_lr",)


def MuMuon_ScheduleFree(
    params: Any,
    lr: float = 0.02,
    adam_lr: float = 0.0025,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    adjust_lr_fn: str | None = None,
    ns_steps: int = 5,
    weight_lr_power: float = 2.0,
    r: float = 0.0,
    scale_eps: bool = False,
    infshapes: InfShapes = None,
    depth_mult: float | None = None,
    depth_alpha: float | None = None,
    block_prefix: str | Mapping[str, bool] = BLOCK_PREFIX,
) -> ComposedOptimizer:
    """Schedule-free Muon on the hidden matrices and schedule-free AdamW on the rest, muP-scaled, as one optimizer.

    Hidden matrices (2-D, both dimensions infinite) get :class:`ScheduleFreeWrapper` around
    ``torch.optim.Muon`` under the "muon" rule (lr x sqrt(m_out / m_in) x adjust(A0, B0) /
    adjust(A, B), see :mod:`mup_schedulefree.scaling`); everything else (embeddings, input and
    readout weights, norms, biases) gets :class:`AdamWScheduleFree` under the "adam" rule. The two
    are one :class:`ComposedOptimizer`: one ``train()``/``eval()``/``step()``/``state_dict()``, one
    interpolation ``momentum`` (y = momentum x + (1 - momentum) z in both parts), one averaging
    weight (lr^weight_lr_power in units of each group's own lr, so every group's average is the
    same), and one weight decay, taken at y and multiplied by the group's lr in both parts.
    Muon's own momentum and decay are off: the wrapper's interpolation provides the momentum.

    Example::

        mup.set_base_shapes(model, base_model, delta=delta_model)
        opt = MuMuon_ScheduleFree(model.named_parameters(), lr=0.02, adam_lr=3e-3, weight_decay=0.1)

    A params group's ``lr``, ``adjust_lr_fn`` and ``ns_steps`` apply to its hidden matrices,
    ``adam_lr`` to its other parameters, ``weight_decay`` to both.

    Args:
        params: parameters, ``named_parameters()``, or group dicts of either; each needs an
            ``infshape`` (``mup.set_base_shapes``) or an entry in ``infshapes``.
        lr: Muon's base-width learning rate.
        adam_lr: AdamW's base-width learning rate.
        momentum: interpolation coefficient of both parts, 0 < momentum < 1.
        weight_decay: base-width decay at y, multiplied by each group's lr.
        adam_beta2: AdamW's second-moment decay, 0 <= adam_beta2 < 1.
        adam_eps: AdamW's eps.
        adjust_lr_fn: Muon's shape factor, None/"original" or "match_rms_adamw"; the "muon" rule
            cancels it as muP requires.
        ns_steps: Muon's Newton-Schulz iterations, 1 to 99.
        weight_lr_power: power of the lr in the averaging weight.
        r: polynomial weighting power of the average.
        scale_eps: scale AdamW's eps with width (see :func:`MuAdamW_ScheduleFree`); Muon has no Adam eps.
        infshapes: mapping name -> InfShape or mup base-shape file, for parameters without ``infshape``.
        depth_mult: L / L_base for both parts (see :func:`mu_optimizer`); None: no depth scaling.
        depth_alpha: 1 (CompleteP) or 0.5 (depth-muP); required with ``depth_mult``.
        block_prefix: name prefix of the parameters inside residual blocks (default "blocks."), or
            a mapping name -> bool.

    Returns:
        The composed optimizer, its AdamW part first; each part refuses a state dict of another
        muP grouping, and :meth:`ComposedOptimizer.add_param_group` splits and scales a new group
        the same way.

    Raises:
        TypeError: a hyperparameter of the wrong type, or params of the wrong kind.
        ValueError: a hyperparameter out of range, an unknown ``adjust_lr_fn`` or depth arguments
            :func:`mup_schedulefree.scaling.check_depth` refuses (checked before ``params`` is
            read), a parameter without an infshape, or params without a hidden
            matrix or without any other parameter (use :func:`MuAdamW_ScheduleFree` then).
    """
    for name, value, low, high, low_open in (("lr", lr, 0.0, None, False), ("adam_lr", adam_lr, 0.0, None, False),
                                             ("momentum", momentum, 0.0, 1.0, True),
                                             ("weight_decay", weight_decay, 0.0, None, False),
                                             ("adam_beta2", adam_beta2, 0.0, 1.0, False),
                                             ("adam_eps", adam_eps, 0.0, None, False),
                                             ("weight_lr_power", weight_lr_power, 0.0, None, False),
                                             ("r", r, 0.0, None, False)):
        check_range(name, value, low, high, low_open=low_open)
    check_adjust_lr_fn("adjust_lr_fn", adjust_lr_fn)
    check_count("ns_steps", ns_steps)
    check_range("ns_steps", ns_steps, 1, 100)
    check_scale_eps("scale_eps", scale_eps, "adam")
    check_depth(depth_mult, depth_alpha, block_prefix)
    depth = {"depth_mult": depth_mult, "depth_alpha": depth_alpha, "block_prefix": block_prefix}
    shapes = resolve_infshapes(infshapes)

    def split(params: Any) -> list[list[dict[str, Any]]]:
        """muP-scaled groups of (the AdamW part, the Muon part) for ``params``."""
        matrices, others = split_hidden_matrices(params, shapes)
        for group in matrices + others:
            for key in ("lr", "adam_lr", "weight_decay"):
                if key in group:
                    check_range(key, group[key], 0.0)
        adam_groups = [{("lr" if key == "adam_lr" else key): value for key, value in group.items()
                        if key not in MUON_GROUP_KEYS} for group in others]
        muon_groups = [{("weight_decay_at_y" if key == "weight_decay" else key): value for key, value in group.items()
                        if key not in ADAM_GROUP_KEYS} for group in matrices]
        return [mu_param_groups(adam_groups, "adam", lr=float(adam_lr), decay_keys={"weight_decay": weight_decay},
                                infshapes=shapes, scale_eps=scale_eps, eps=adam_eps, **depth) if adam_groups else [],
                mu_param_groups(muon_groups, "muon", lr=float(lr), decay_keys={"weight_decay_at_y": weight_decay},
                                infshapes=shapes, adjust_lr_fn=adjust_lr_fn, **depth) if muon_groups else []]

    adam_groups, muon_groups = split(params)
    if not muon_groups or not adam_groups:
        missing = ("hidden matrix (2-D, both dimensions infinite)" if not muon_groups
                   else "parameter besides hidden matrices")
        raise ValueError(f"Invalid params: no {missing}, so one of Muon and AdamW would have nothing to train; "
                         "use MuAdamW_ScheduleFree (or mu_optimizer with torch.optim.Muon) instead")
    adam = AdamWScheduleFree(adam_groups, lr=adam_lr, betas=(momentum, adam_beta2), eps=adam_eps,
                             weight_decay=weight_decay, weight_lr_power=weight_lr_power, r=r)
    muon = ScheduleFreeWrapper(torch.optim.Muon(muon_groups, lr=lr, weight_decay=0.0, momentum=0.0, nesterov=False,
                                                adjust_lr_fn=adjust_lr_fn, ns_steps=ns_steps),
                               weight_decay_at_y=weight_decay, momentum=momentum, weight_lr_power=weight_lr_power, r=r)
    for part in (adam, muon):
        grouping_guard(part)
    return ComposedOptimizer([adam, muon], split=lambda group: split([group]))


FACTORIES = (MuAdamW_ScheduleFree, MuRAdam_ScheduleFree, MuSGD_ScheduleFree, MuAdamW_ScheduleFreeClosure,
             MuRAdam_ScheduleFreeClosure, MuSGD_ScheduleFreeClosure, MuAdamW_ScheduleFreeReference,
             MuRAdam_ScheduleFreeReference, MuSGD_ScheduleFreeReference, MuAdamW_ScheduleFreePaper,
             MuAdamW_ScheduleFreePaperReference, MuAdamC_ScheduleFreePlus)
