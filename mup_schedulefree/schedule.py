"""Scalar schedules of schedule-free training: warmup, RAdam rectification, averaging weight,
and ScheduleFree+'s annealed momentum and averaging warmup.

Schedule-free methods keep three sequences: z (the base optimizer's iterate), x (a weighted
running average of z, the point to evaluate) and y = (1 - beta) z + beta x (the point where
gradients are taken). The only scalars that change from step to step are the learning-rate
multiplier of the current step and the averaging weight ckp1 used in

    x_{k+1} = (1 - ckp1) x_k + ckp1 z_{k+1},    ckp1 = w_{k+1} / (w_1 + ... + w_{k+1}),
    w_k = k^r * lr_max_k^weight_lr_power,

where lr_max_k is the largest scheduled learning rate seen so far. Everything here is a pure
function of Python numbers, shared by every optimizer in the package.
"""
from __future__ import annotations

import math
from typing import NamedTuple


def warmup_multiplier(k: int, warmup_steps: int) -> float:
    """Linear warmup factor applied to the learning rate at step index ``k`` (0-based).

    Args:
        k: number of steps already taken.
        warmup_steps: length of the linear warmup; 0 disables it.

    Returns:
        (k + 1) / warmup_steps during warmup, 1.0 afterwards.
    """
    if k < warmup_steps:
        return (k + 1) / warmup_steps
    return 1.0


class Rectification(NamedTuple):
    """RAdam's variance rectification at one step.

    Attributes:
        multiplier: factor on the learning rate (0.0 in the silent SGD phase).
        adaptive: whether the step divides by the second-moment estimate.
    """

    multiplier: float
    adaptive: bool


def radam_rectification(k: int, beta2: float, silent_sgd_phase: bool) -> Rectification:
    """RAdam's rectification term for step index ``k`` (0-based).

    While the approximated length of the SMA, rho_t, is at most 4 the second-moment estimate is
    too noisy to use: the step is a plain (un-normalised) gradient step, or no step at all when
    ``silent_sgd_phase`` is set.

    Args:
        k: number of steps already taken.
        beta2: second-moment decay.
        silent_sgd_phase: skip the un-normalised early steps (learning-rate multiplier 0).

    Returns:
        The learning-rate multiplier and whether the step is adaptive.
    """
    step = k + 1
    beta2_t = beta2**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    if rho_t > 4.0:
        ratio = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        return Rectification(math.sqrt(ratio), True)
    return Rectification(0.0 if silent_sgd_phase else 1.0, False)


class Averaging(NamedTuple):
    """Result of one update of the averaging weight.

    Attributes:
        ckp1: interpolation weight of the new z into x.
        lr_max: updated running maximum of the relative scheduled learning rate.
        weight_sum: updated running sum of the weights.
    """

    ckp1: float
    lr_max: float
    weight_sum: float


def averaging_weight(
    k: int, relative_lr: float, lr_max: float, weight_sum: float, r: float, weight_lr_power: float
) -> Averaging:
    """Advance the averaging weight of schedule-free training by one step.

    The weight depends on the learning rate only through ratios (w_k / sum w), so it is computed
    from the learning rate *relative to the group's reference learning rate*. This gives the same
    ckp1 as the published formula, and makes it bit-identical across parameter groups whose
    learning rates differ by a constant factor, as muP's groups do.

    Args:
        k: number of steps already taken.
        relative_lr: scheduled learning rate of this step divided by the reference learning rate.
        lr_max: running maximum of ``relative_lr`` before this step (start with -1.0).
        weight_sum: running sum of weights before this step (start with 0.0).
        r: power of the polynomial weighting (k+1)^r.
        weight_lr_power: power of lr_max in the weight.

    Returns:
        ckp1 (0.0 while every weight so far is zero, e.g. at learning rate 0), and the updated
        running maximum and sum.
    """
    lr_max = max(relative_lr, lr_max)
    weight = ((k + 1) ** r) * (max(lr_max, 0.0) ** weight_lr_power)
    weight_sum = weight_sum + weight
    ckp1 = weight / weight_sum if weight_sum > 0.0 else 0.0
    return Averaging(ckp1, lr_max, weight_sum)


def averaging_weight_c_warmup(
    k: int, lr: float, lr_max: float, weight_sum: float, r: float, weight_lr_power: float, c_warmup: int
) -> Averaging:
    """:func:`averaging_weight` after ``c_warmup`` steps in which x simply follows z (ScheduleFree+).

    For k < c_warmup, ckp1 is 1 (x is set to the new z) and the step adds no weight to the sum,
    while the running maximum of the learning rate keeps tracking every step; from step
    c_warmup on, the usual weighting applies to the steps that follow.

    Args:
        k: number of steps already taken.
        lr: learning rate of this step (in whatever unit ``lr_max`` is kept).
        lr_max: running maximum of ``lr`` before this step.
        weight_sum: running sum of weights before this step.
        r: power of the polynomial weighting (k+1)^r.
        weight_lr_power: power of lr_max in the weight.
        c_warmup: number of initial steps with ckp1 = 1; 0 disables the warmup.

    Returns:
        ckp1 and the updated running maximum and sum.
    """
    if k < c_warmup:
        return Averaging(1.0, max(lr, lr_max), weight_sum)
    return averaging_weight(k, lr, lr_max, weight_sum, r, weight_lr_power)


def annealed_momentum(k: int, start: float, end: float, anneal_steps: int) -> float:
    """The interpolation coefficient beta at step index ``k``, annealed from ``start`` to ``end``.

    The annealing is geometric in 1 - beta, the inverse of the averaging window's length:
    1 - beta_k = (1 - start)^(1 - t) * (1 - end)^t with t = min(k / anneal_steps, 1), so the
    window grows by the same factor every step until it reaches its final length.

    Args:
        k: number of steps already taken.
        start: beta at step 0, in (0, 1).
        end: beta from step ``anneal_steps`` on, in (0, 1).
        anneal_steps: length of the annealing; 0 keeps ``start`` for ever.

    Returns:
        beta_k.
    """
    if anneal_steps <= 0:
        return start
    t = min(k / anneal_steps, 1.0)
    return 1.0 - math.exp((1.0 - t) * math.log(1.0 - start) + t * math.log(1.0 - end))
