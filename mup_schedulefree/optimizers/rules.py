"""Update rules of the schedule-free optimizers, as records.

A rule is what tells SGD-SF, AdamW-SF, RAdam-SF and the paper's AdamW-SF apart: its
hyperparameters and their defaults, their validation, the interpolation coefficient beta of
y = (1 - beta) z + beta x, the moments it keeps per parameter, how the learning rate of a step is
scheduled, the scalars its kernel takes, and that kernel (by name, in :mod:`kernels` and
``native.OPS``). A form (primal and closure in base.py, reference in reference.py) holds a record
as its ``rule`` and decides where the parameters sit; every rule's averaging weight advances
through :func:`~mup_schedulefree.optimizers.base.advance_schedule`, with the formulas of
:mod:`mup_schedulefree.schedule`.

Every function of a record is pure: it reads a parameter group (a dict) and returns values.
:meth:`Rule.advance` is the one step that writes: it advances the group's averaging bookkeeping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

import torch

from .. import kernels
from ..schedule import radam_rectification, warmup_multiplier
from ..validation import check_range
from .base import advance_schedule, check_flags

Group = dict[str, Any]


class Schedule(NamedTuple):
    """The learning-rate schedule of one step.

    Attributes:
        multiplier: factor on the group's lr (warmup, RAdam's rectification, the paper's correction).
        adaptive: whether the step divides by the second-moment root (False in RAdam's early steps).
    """

    multiplier: float
    adaptive: bool


@dataclass(frozen=True, eq=False)  # one record per rule: compared and hashed by identity
class Rule:
    """One update rule, as the forms consume it.

    Attributes:
        name: the rule's name in messages and tests ("SGD", "AdamW", ...).
        mup_rule: the muP scaling rule (see scaling.py) that fits this update.
        defaults: its hyperparameters and their defaults, as every class built on it declares them.
        beta: group -> the interpolation coefficient between z and x.
        moment_keys: group -> names of the zero-initialised state tensors besides z that the
            group's hyperparameters call for (created lazily, on a parameter's next step).
        validate: group -> None; raises TypeError/ValueError naming the argument at fault.
        schedule: group -> the :class:`Schedule` of its next step (at its step count ``k``).
        scalars: (group, k, lr, ckp1, adaptive) -> the keyword scalars of the kernel at step ``k``,
            given the scheduled lr and the averaging weight ckp1 of that step.
        kernel: name of the step function in :mod:`mup_schedulefree.kernels` that applies the update
            to parallel lists [points, grads, z, *moments] (looked up when called, so that a function
            put in its place, as a test's spy, is the one that runs).
        native_op: group -> its fused primal step in ``native.OPS``.
        direction: (state, grad, scalars) -> the update direction of one tensor (the reference form's
            statement of the math; it updates the moments in ``state``), decay excluded.
    """

    name: str
    mup_rule: str
    defaults: Mapping[str, Any]
    beta: Callable[[Group], float]
    moment_keys: Callable[[Group], tuple[str, ...]]
    validate: Callable[[Group], None]
    schedule: Callable[[Group], Schedule]
    scalars: Callable[[Group, int, float, float, bool], dict[str, Any]]
    kernel: str
    native_op: Callable[[Group], str]
    direction: Callable[[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]], torch.Tensor]

    def advance(self, group: Group) -> dict[str, Any]:
        """Advance ``group``'s schedule by one step and return the kernel's scalars of that step.

        Called once per group and step, with or without gradients: the group's step count and
        averaging sums advance in place (:func:`~mup_schedulefree.optimizers.base.advance_schedule`).

        Args:
            group: a parameter group with its schedule bookkeeping.

        Returns:
            The keyword scalars of the rule's kernel (``lr``, ``ckp1`` and the rule's own).
        """
        k = group["k"]
        schedule = self.schedule(group)
        lr, ckp1 = advance_schedule(group, schedule.multiplier)
        return self.scalars(group, k, lr, ckp1, schedule.adaptive)

    def step_(self, lists: list[list[torch.Tensor]], scalars: dict[str, Any], **flags: Any) -> None:
        """Apply the update to parallel lists [points, grads, z, *moments] with the rule's kernel.

        Args:
            lists: the lists, moments in the order of :attr:`moment_keys`.
            scalars: this step's scalars, from :meth:`advance`.
            **flags: ``closure_form``, ``foreach``, ``fused``, ``masters`` and ``prepared`` (see
                :func:`mup_schedulefree.kernels.adam_step_`).
        """
        getattr(kernels, self.kernel)(*lists, **scalars, **flags)


# ----------------------------------------------------------------------------- validation
def check_betas(betas: Any, *, beta1_name: str = "betas[0]") -> None:
    """Validate an Adam (beta1, beta2) pair: 0 < beta1 < 1 and 0 <= beta2 < 1.

    beta1 must be positive because the evaluation point x is recovered from y and z by dividing
    by beta1.

    Args:
        betas: the pair supplied by the user.
        beta1_name: name used for the first coefficient in messages.
    """
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    check_range(beta1_name, betas[0], 0.0, 1.0, low_open=True)
    check_range("betas[1]", betas[1], 0.0, 1.0)


def check_common(group: Group) -> None:
    """Validate the hyperparameters every rule's group has.

    Args:
        group: a parameter group with defaults filled in.
    """
    check_range("lr", group["lr"], 0.0)
    check_range("weight_decay", group["weight_decay"], 0.0)
    check_range("r", group["r"], 0.0)
    check_range("weight_lr_power", group["weight_lr_power"], 0.0)
    if "eps" in group:
        check_range("eps", group["eps"], 0.0)
    if "warmup_steps" in group:
        warmup = group["warmup_steps"]
        if isinstance(warmup, bool) or not isinstance(warmup, int):
            raise TypeError(f"Invalid warmup_steps: {warmup!r} (must be a non-negative int, got {type(warmup).__name__})")
        check_range("warmup_steps", warmup, 0.0)
    check_flags(group)


# ----------------------------------------------------------------------------- SGD-SF
def _sgd_validate(group: Group) -> None:
    check_common(group)
    check_range("momentum", group["momentum"], 0.0, 1.0, low_open=True)


def _warmup_schedule(group: Group) -> Schedule:
    return Schedule(warmup_multiplier(group["k"], group["warmup_steps"]), True)


def _sgd_scalars(group: Group, k: int, lr: float, ckp1: float, adaptive: bool) -> dict[str, Any]:
    return dict(lr=lr, momentum=group["momentum"], weight_decay=group["weight_decay"], ckp1=ckp1)


def _sgd_direction(state: dict[str, torch.Tensor], grad: torch.Tensor, scalars: dict[str, Any]) -> torch.Tensor:
    return grad


SGD = Rule(
    name="SGD",
    mup_rule="sgd",
    defaults=MappingProxyType(dict(lr=1.0, momentum=0.9, weight_decay=0, warmup_steps=0, r=0.0, weight_lr_power=2)),
    beta=lambda group: group["momentum"],
    moment_keys=lambda group: (),
    validate=_sgd_validate,
    schedule=_warmup_schedule,
    scalars=_sgd_scalars,
    kernel="sgd_step_",
    native_op=lambda group: "sgd_sf_step_",
    direction=_sgd_direction,
)


# ----------------------------------------------------------------------------- AdamW-SF
def _adam_validate(group: Group) -> None:
    check_common(group)
    check_betas(group["betas"])
    if "inner_momentum" in group:  # RAdam's groups have none
        check_range("inner_momentum", group["inner_momentum"], 0.0, 1.0)


def _adam_moment_keys(group: Group) -> tuple[str, ...]:
    return ("exp_avg_sq", "exp_avg") if group.get("inner_momentum") else ("exp_avg_sq",)


def _adam_scalars(group: Group, k: int, lr: float, ckp1: float, adaptive: bool) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    scalars = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                   ckp1=ckp1, bias_correction2=1.0 - beta2 ** (k + 1), adaptive=adaptive)
    inner = float(group.get("inner_momentum", 0.0))
    if inner:
        scalars.update(inner_momentum=inner, bias_correction1=1.0 - inner ** (k + 1))
    return scalars


def _adam_direction(state: dict[str, torch.Tensor], grad: torch.Tensor, scalars: dict[str, Any]) -> torch.Tensor:
    """v <- beta2 v + (1 - beta2) g^2; with inner momentum mu, m <- mu m + (1 - mu) g and g becomes
    m / bias_correction1; the direction is g / (sqrt(v / bias_correction2) + eps), or g while not adaptive."""
    beta2 = scalars["beta2"]
    v = state["exp_avg_sq"]
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    inner = scalars.get("inner_momentum", 0.0)
    if inner:
        m = state["exp_avg"]
        m.mul_(inner).add_(grad, alpha=1.0 - inner)
        grad = m / scalars["bias_correction1"]
    if not scalars["adaptive"]:
        return grad
    return grad / ((v / scalars["bias_correction2"]).sqrt() + scalars["eps"])


ADAMW = Rule(
    name="AdamW",
    mup_rule="adam",
    defaults=MappingProxyType(dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, warmup_steps=0, r=0.0,
                                   weight_lr_power=2.0, inner_momentum=0.0)),
    beta=lambda group: group["betas"][0],
    moment_keys=_adam_moment_keys,
    validate=_adam_validate,
    schedule=_warmup_schedule,
    scalars=_adam_scalars,
    kernel="adam_step_",
    native_op=lambda group: "adam_sf_inner_step_" if group.get("inner_momentum") else "adam_sf_step_",
    direction=_adam_direction,
)


# ----------------------------------------------------------------------------- RAdam-SF
def _radam_schedule(group: Group) -> Schedule:
    rect = radam_rectification(group["k"], group["betas"][1], group["silent_sgd_phase"])
    return Schedule(rect.multiplier, rect.adaptive)


RADAM = replace(
    ADAMW,
    name="RAdam",
    defaults=MappingProxyType(dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, r=0.0,
                                   weight_lr_power=2.0, silent_sgd_phase=True)),
    schedule=_radam_schedule,
)


# ----------------------------------------------------------------------------- AdamW-SF of the paper
def _paper_schedule(group: Group) -> Schedule:
    k, beta2 = group["k"], group["betas"][1]
    return Schedule(warmup_multiplier(k, group["warmup_steps"]) * math.sqrt(1.0 - beta2 ** (k + 1)), True)


def _paper_scalars(group: Group, k: int, lr: float, ckp1: float, adaptive: bool) -> dict[str, Any]:
    return {**_adam_scalars(group, k, lr, ckp1, adaptive), "bias_correction2": 1.0}  # the correction is in the lr


# Its groups keep inner_momentum = 0: the published paper form has none (upstream HEAD neither).
ADAMW_PAPER = replace(ADAMW, name="AdamW-paper", schedule=_paper_schedule, scalars=_paper_scalars)


# ----------------------------------------------------------------------------- docstring fragments
# The Args entries of the rules' hyperparameters, formatted into each class's docstring as torch.optim
# does (an entry's continuation lines are indented for a class docstring's Args section).
PARAMS_DOC = "params: iterable of parameters or of dicts defining parameter groups."
SGD_ARGS_DOC = """lr: learning rate (default {lr}).
        momentum: interpolation y = (1 - momentum) z + momentum x (default {momentum}); 0 < momentum < 1.
        weight_decay: decay at y, multiplied by the scheduled lr (default {weight_decay}).
        warmup_steps: linear lr warmup length in steps (default {warmup_steps}).
        r: polynomial weighting power of the average (default {r}).
        weight_lr_power: power of the max lr in the averaging weight (default {weight_lr_power}).""".format(
    **SGD.defaults)
_ADAM_ARGS = """lr: learning rate (default {lr}).
        betas: (beta1, beta2): interpolation y = (1 - beta1) z + beta1 x, and second-moment decay
            (default {betas}). Requires 0 < beta1 < 1, 0 <= beta2 < 1.
        eps: added to the {eps_root} (default {eps}).
        weight_decay: decay at y, multiplied by the scheduled lr (default {weight_decay})."""
_AVERAGING_ARGS = """r: polynomial weighting power of the average (default {r}).
        weight_lr_power: power of the max {scheduled}lr in the averaging weight (default {weight_lr_power})."""
_WARMUP_ARG = "warmup_steps: linear lr warmup length in steps (default {warmup_steps})."
ADAMW_ARGS_DOC = "\n        ".join([_ADAM_ARGS, _WARMUP_ARG, _AVERAGING_ARGS]).format(
    eps_root="second-moment root", scheduled="", **ADAMW.defaults)
INNER_MOMENTUM_DOC = """inner_momentum: decay mu of an EMA m of the gradient, kept as ``exp_avg`` state, whose
            bias-corrected value m / (1 - mu^k) replaces g in the Adam direction: Adam's own first
            moment, inside the schedule-free averaging (default {inner_momentum}: none, and no memory
            for it; upstream suggests 0.9). 0 <= mu < 1; k counts the group's steps, as for beta2.""".format(
    **ADAMW.defaults)
RADAM_ARGS_DOC = "\n        ".join([_ADAM_ARGS, _AVERAGING_ARGS]).format(
    eps_root="second-moment root", scheduled="", **RADAM.defaults)
SILENT_SGD_PHASE_DOC = ("silent_sgd_phase: take no step while the rectification is undefined "
                        "(default {silent_sgd_phase}).").format(**RADAM.defaults)
ADAMW_PAPER_ARGS_DOC = "\n        ".join([_ADAM_ARGS, _WARMUP_ARG, _AVERAGING_ARGS]).format(
    eps_root="root of the uncorrected second moment", scheduled="scheduled ", **ADAMW.defaults)

# The update each rule makes, for the class docstrings (continuation lines indented for a class docstring).
SGD_UPDATE_DOC = "z <- z - lr * (g + weight_decay * y); y interpolates z and x with ``momentum``."
ADAMW_UPDATE_DOC = """z <- z - lr * (g / (sqrt(v / (1 - beta2^k)) + eps) + weight_decay * y), with v the EMA of g^2;
    y interpolates z and x with beta1. The lr has a linear warmup of ``warmup_steps``. With
    ``inner_momentum`` = mu > 0, g in the numerator becomes m / (1 - mu^k), m the EMA of g with decay mu."""
RADAM_UPDATE_DOC = """As AdamW-SF, with the lr multiplied by RAdam's rectification term; while that term is
    undefined (the first few steps) the step is an un-normalised SGD step, or no step at all
    with ``silent_sgd_phase`` (the default), which also gives those steps zero averaging weight."""
ADAMW_PAPER_UPDATE_DOC = """The step is AdamW-SF's with the second-moment bias correction moved from the denominator
    into the learning rate: z <- z - lr_k * (g / (sqrt(v) + eps) + weight_decay * y), with
    lr_k = lr * warmup_k * sqrt(1 - beta2^(k+1)), and lr_k weights the average."""
