"""muP's per-parameter learning-rate and weight-decay rules: the only place they live.

Each parameter carries an infinite-width shape (``p.infshape``, set by ``mup.set_base_shapes``)
that says which of its dimensions grow with width. muP scales the learning rate of a parameter
by a multiplier that depends only on that shape and on the optimizer's family:

    rule "adam" (entrywise-normalised updates: Adam, AdamW, RAdam, their schedule-free forms)
        matrix-like (2 infinite dims):  lr / width_mult        (width_mult of the fan-in)
        everything else ("vector-like"): unchanged
    rule "sgd" (raw-gradient updates: SGD and its schedule-free form)
        matrix-like:  lr / fanin_fanout_mult_ratio
        vector-like (1 infinite dim):  lr * width_mult
        fixed (no infinite dim):  unchanged

Weight decay has to follow how the optimizer couples it to the learning rate. If a step removes
``lr^q * weight_decay * p``, the decay per step is width-independent when weight_decay is scaled
by ``lr_multiplier^(-q)``:

    q = 1  decay multiplied by lr: this package's and the published schedule-free optimizers
           (decay at y), the wrapper's decay at y, torch's AdamW/SGD/Adam decay  -> x 1/lr_mult
    q = 2  decay multiplied by lr squared (AdamC-style corrected decay)          -> x 1/lr_mult^2
    q = 0  decay independent of lr (``decoupled_wd=True``)                       -> unchanged

With q = 1 this reproduces mup 1.0.0's MuAdam/MuSGD exactly (same groups, same floats: scaling is
applied by multiplying or dividing by the shape quantity, as mup does).
"""
from __future__ import annotations

import numbers
import os
import sys
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from .validation import real_number

RULES = ("adam", "sgd")
ROLE_ORDER = {"adam": ("matrix-like", "vector-like"), "sgd": ("matrix-like", "vector-like", "fixed")}
DECAY_LR_POWERS = (0, 1, 2)


def check_rule(name: str, rule: Any) -> None:
    """Raise ValueError naming ``name`` unless ``rule`` is one of :data:`RULES`.

    Args:
        name: argument name shown in the message (e.g. ``"rule"``).
        rule: the value supplied by the user.
    """
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"Invalid {name}: {rule!r} (must be one of {RULES})")


def check_decay_lr_power(name: str, power: Any) -> None:
    """Raise ValueError naming ``name`` unless ``power`` is the int 0, 1 or 2.

    Args:
        name: argument name shown in the message (e.g. ``"decay_lr_power"``).
        power: the value supplied by the user.
    """
    if isinstance(power, bool) or not isinstance(power, numbers.Integral) or power not in DECAY_LR_POWERS:
        raise ValueError(f"Invalid {name}: {power!r} (must be the int 0, 1 or 2)")


def apply_power(value: float, key: float, exponent: int) -> float:
    """value * key**exponent, computed by repeated multiplication or division (as mup does)."""
    for _ in range(abs(exponent)):
        value = value * key if exponent > 0 else value / key
    return value


class Scaling(NamedTuple):
    """muP scaling of one parameter: its lr is multiplied by ``key ** exponent``.

    Attributes:
        role: "matrix-like", "vector-like" or "fixed" (mup's names).
        key: the shape quantity that defines the group (width_mult or fan-in/fan-out ratio).
        exponent: -1, 0 or +1.
    """

    role: str
    key: float
    exponent: int

    @property
    def lr_mult(self) -> float:
        """Multiplier on the learning rate."""
        return apply_power(1.0, self.key, self.exponent)

    def scale_lr(self, lr: float) -> float:
        """The muP learning rate of this parameter for base learning rate ``lr``."""
        return apply_power(lr, self.key, self.exponent)

    def scale_weight_decay(self, weight_decay: float, decay_lr_power: int) -> float:
        """Weight decay that keeps lr^q * weight_decay width-independent, q = ``decay_lr_power``.

        Args:
            weight_decay: base-width weight decay.
            decay_lr_power: q, the power of lr that multiplies the decay in the optimizer's step
                (1: decay x lr, 2: decay x lr^2, 0: decoupled).
        """
        check_decay_lr_power("decay_lr_power", decay_lr_power)
        return apply_power(weight_decay, self.key, -decay_lr_power * self.exponent)


def parameter_scaling(infshape: Any, rule: str, name: str = "parameter") -> Scaling:
    """The muP learning-rate scaling of a parameter with shape ``infshape`` under ``rule``.

    Args:
        infshape: a ``mup.InfShape`` (anything with ``ninf()``, ``width_mult()``,
            ``fanin_fanout_mult_ratio()``).
        rule: "adam" or "sgd".
        name: how to name the parameter in errors.

    Returns:
        Its role, grouping key and lr exponent.
    """
    check_rule("rule", rule)
    ninf = infshape.ninf()
    if ninf > 2:
        raise ValueError(
            f"{name} has {ninf} infinite dimensions (infshape {infshape}); muP defines scaling for at most 2. "
            "Mark the extra width dimensions finite in the base shapes."
        )
    if rule == "adam":
        if ninf == 2:
            return Scaling("matrix-like", infshape.width_mult(), -1)
        return Scaling("vector-like", 1.0, 0)
    if ninf == 2:
        return Scaling("matrix-like", infshape.fanin_fanout_mult_ratio(), -1)
    if ninf == 1:
        return Scaling("vector-like", infshape.width_mult(), 1)
    return Scaling("fixed", 1.0, 0)


def _name_of(index: int, name: str | None, p: torch.Tensor) -> str:
    return f"parameter {name!r}" if name is not None else f"parameter #{index} (shape {tuple(p.shape)})"


def _normalise(params: Any) -> list[dict[str, Any]]:
    """Turn any torch-style ``params`` argument into group dicts with (name or None, p) pairs."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, of (name, tensor) pairs or of dicts, got a Tensor")
    items = list(params)
    if not items:
        raise ValueError("params is empty: the optimizer got no parameters")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    for index, group in enumerate(groups):
        if not isinstance(group, dict):
            raise TypeError(f"params mixes dicts and non-dicts (entry {index} is {type(group).__name__})")
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        pairs = []
        for member in members:
            if isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], str):
                pairs.append(member)
            elif isinstance(member, torch.Tensor):
                pairs.append((None, member))
            else:
                raise TypeError(f"params group {index} holds a {type(member).__name__}; expected tensors or (name, tensor)")
        out.append({**group, "params": pairs})
    return out


def resolve_infshapes(infshapes: Mapping[str, Any] | str | os.PathLike | None) -> Mapping[str, Any] | None:
    """Load an infshape mapping from a mup base-shape file path, or pass a mapping through.

    Args:
        infshapes: None, a mapping name -> InfShape (or base shape list), or the path of a file
            written by ``mup.save_base_shapes`` / ``mup.make_base_shapes(..., savefile=...)``.

    Returns:
        A mapping name -> InfShape-like, or None.
    """
    if infshapes is None or isinstance(infshapes, Mapping):
        return infshapes
    if isinstance(infshapes, (str, os.PathLike)):
        import mup

        return mup.load_base_shapes(os.fspath(infshapes))
    raise TypeError(f"infshapes must be a mapping name -> InfShape or a base-shape file path, got {type(infshapes).__name__}")


def _infshape(p: torch.Tensor, name: str | None, index: int, infshapes: Mapping[str, Any] | None) -> Any:
    if infshapes is not None:
        if name is None:
            raise ValueError("infshapes was given but the parameters are unnamed: pass model.named_parameters()")
        if name not in infshapes:
            raise ValueError(f"{_name_of(index, name, p)} is missing from infshapes (it has {len(infshapes)} entries)")
        from mup.infshape import zip_infshape

        return zip_infshape(infshapes[name], list(p.shape))
    if not hasattr(p, "infshape"):
        raise ValueError(
            f"{_name_of(index, name, p)} has no infshape: call mup.set_base_shapes(model, base, delta=...) "
            "before building the optimizer, or pass infshapes=<name -> InfShape mapping or base-shape file> "
            "(needed after copy.deepcopy or FSDP2 fully_shard, which drop the attribute)."
        )
    return p.infshape


def mu_param_groups(
    params: Any,
    rule: str,
    *,
    lr: float,
    decay_keys: Mapping[str, float],
    decay_lr_power: int = 1,
    infshapes: Mapping[str, Any] | str | None = None,
) -> list[dict[str, Any]]:
    """Split every parameter group by muP role and scale its lr and weight decay.

    Each incoming group (with the user's own keys kept, e.g. ``weight_decay=0`` for norms) is split
    into sub-groups of equal scaling, ordered by role (matrix-like, vector-like, fixed) and then by
    first appearance. Every sub-group records ``mup_rule``, ``mup_role``, ``mup_lr_mult`` and
    ``mup_wd_mult``; parameters given with names keep them (torch stores ``param_names``).

    Args:
        params: parameters, (name, parameter) pairs (e.g. ``model.named_parameters()``), or group
            dicts holding either.
        rule: "adam" or "sgd" (see the module docstring).
        lr: base learning rate for groups that set none.
        decay_keys: weight-decay keys to scale, with the default for groups that set none
            (e.g. ``{"weight_decay": 0.0}``).
        decay_lr_power: how the optimizer couples decay to lr (see :meth:`Scaling.scale_weight_decay`).
        infshapes: a mapping name -> InfShape or a mup base-shape file, used instead of
            ``p.infshape`` (requires named parameters).

    Returns:
        The new group dicts, ready for an optimizer constructor.

    Raises:
        TypeError: a non-number lr or decay (argument or group entry), or params of the wrong kind.
        ValueError: an unknown rule or decay_lr_power, no parameters, or a parameter without an
            infshape. Every argument is checked before any group is built.
    """
    check_rule("rule", rule)
    real_number("lr", lr)
    for key, default in decay_keys.items():
        real_number(key, default)
    check_decay_lr_power("decay_lr_power", decay_lr_power)
    shapes = resolve_infshapes(infshapes)
    groups = _normalise(params)
    for number, group in enumerate(groups):
        for key in ("lr", *decay_keys):
            if key in group:
                real_number(f"{key} of params group {number}", group[key])
    new_groups: list[dict[str, Any]] = []
    index = 0
    for group in groups:
        buckets: dict[tuple[str, float], dict[str, Any]] = {}
        for name, p in group["params"]:
            scaling = parameter_scaling(_infshape(p, name, index, shapes), rule, _name_of(index, name, p))
            index += 1
            bucket = buckets.get((scaling.role, scaling.key))
            if bucket is None:
                bucket = {key: value for key, value in group.items() if key != "params"}
                bucket["lr"] = scaling.scale_lr(group.get("lr", lr))
                for key, default in decay_keys.items():
                    bucket[key] = scaling.scale_weight_decay(group.get(key, default), decay_lr_power)
                bucket.update(mup_rule=rule, mup_role=scaling.role, mup_lr_mult=scaling.lr_mult,
                              mup_wd_mult=scaling.scale_weight_decay(1.0, decay_lr_power), params=[])
                buckets[(scaling.role, scaling.key)] = bucket
            bucket["params"].append(p if name is None else (name, p))
        order = ROLE_ORDER[rule]
        new_groups.extend(sorted(buckets.values(), key=lambda g: order.index(g["mup_role"])))
    return new_groups


GROUP_SIGNATURE = ("mup_rule", "mup_role", "mup_lr_mult", "mup_wd_mult")


def check_same_grouping(saved_groups: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]]) -> None:
    """Raise ValueError unless saved muP groups line up with the current ones.

    Compares, group by group, the muP signature, the parameter count and (when both sides have
    them) the parameter names, so that optimizer state is never attached to the wrong parameter.

    Args:
        saved_groups: ``state_dict()["param_groups"]`` of the saved optimizer.
        groups: the current optimizer's ``param_groups``.
    """
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} parameter groups but this muP optimizer has {len(groups)}: "
            "it was saved from an optimizer with a different muP grouping"
        )
    for index, (saved, current) in enumerate(zip(saved_groups, groups)):
        if any(key not in saved for key in GROUP_SIGNATURE):
            raise ValueError(f"state_dict group {index} has no muP signature: it was not saved by a muP factory")
        for key in GROUP_SIGNATURE:
            if saved[key] != current[key]:
                raise ValueError(
                    f"state_dict group {index} has {key}={saved[key]!r} but this optimizer's group {index} has "
                    f"{current[key]!r}: the muP grouping differs, so state would attach to the wrong parameters"
                )
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(
                f"state_dict group {index} ({saved['mup_role']}) has {len(saved['params'])} parameters, this "
                f"optimizer's has {len(current['params'])}"
            )
        saved_names, names = saved.get("param_names"), current.get("param_names")
        if saved_names is not None and names is not None and list(saved_names) != list(names):
            raise ValueError(
                f"state_dict group {index} holds parameters {list(saved_names)} but this optimizer's group {index} "
                f"holds {list(names)}"
            )


def grouping_guard(optimizer: torch.optim.Optimizer) -> Callable[..., None]:
    """Register on ``optimizer`` a load_state_dict pre-hook that runs :func:`check_same_grouping`.

    It runs before any other pre-hook: a different grouping is the first thing to report.

    Works for any ``torch.optim.Optimizer`` (ours, the published schedule-free classes, torch's).

    Args:
        optimizer: an optimizer built from :func:`mu_param_groups`.

    Returns:
        The handle's ``remove`` function.
    """
    handle = optimizer.register_load_state_dict_pre_hook(_check_hook, prepend=True)
    return handle.remove


def _check_hook(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    check_same_grouping(state_dict["param_groups"], optimizer.param_groups)


# Classes of the published schedulefree package, by name (it is an optional dependency).
PUBLISHED_SGD_LIKE = ("SGDScheduleFree", "SGDScheduleFreeClosure", "SGDScheduleFreeReference")
PUBLISHED_ADAM_LIKE = ("AdamWScheduleFree", "AdamWScheduleFreeClosure", "AdamWScheduleFreeReference",
                       "AdamWScheduleFreePaper", "RAdamScheduleFree", "RAdamScheduleFreeClosure")


def infer_rule(optimizer_class: type) -> str | None:
    """The muP rule an optimizer class follows, or None when it is not known.

    A class states its rule in a ``mup_rule`` attribute ("adam" or "sgd"), as this package's
    optimizers do. Otherwise torch.optim's and the published ``schedulefree`` package's classes
    are known: SGD-like ones follow "sgd", Adam-like ones (entrywise-normalised updates) "adam".

    Args:
        optimizer_class: an optimizer class.

    Returns:
        The rule, or None when the class is not a class, or neither states nor has a known rule.

    Raises:
        ValueError: the class states a ``mup_rule`` that is not one of :data:`RULES`.
    """
    if not isinstance(optimizer_class, type):
        return None
    stated = getattr(optimizer_class, "mup_rule", None)
    if stated is not None:
        check_rule(f"{optimizer_class.__name__}.mup_rule", stated)
        return stated
    optim = torch.optim
    sgd_like = [optim.SGD, optim.ASGD]
    adam_like = [optim.Adam, optim.AdamW, optim.RAdam, optim.NAdam, optim.Adamax, optim.RMSprop, optim.Adagrad]
    published = sys.modules.get("schedulefree")  # loaded whenever one of its classes exists
    if published is not None:
        sgd_like += [getattr(published, name) for name in PUBLISHED_SGD_LIKE if hasattr(published, name)]
        adam_like += [getattr(published, name) for name in PUBLISHED_ADAM_LIKE if hasattr(published, name)]
    if issubclass(optimizer_class, tuple(sgd_like)):
        return "sgd"
    if issubclass(optimizer_class, tuple(adam_like)):
        return "adam"
    return None


__all__ = [
    "RULES",
    "Scaling",
    "check_rule",
    "check_decay_lr_power",
    "parameter_scaling",
    "apply_power",
    "mu_param_groups",
    "resolve_infshapes",
    "check_same_grouping",
    "grouping_guard",
    "infer_rule",
]
