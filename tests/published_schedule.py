"""The published ``schedulefree`` 1.4.1 step functions' scalar formulas, transcribed in the order the
published code evaluates them: the oracle of the schedule tests (``test_schedule.py``) and of the
rule records' tests (``test_rules.py``)."""
from __future__ import annotations


def published_warmup(k: int, warmup_steps: int) -> float:
    """adamw_schedulefree.py: sched = (k+1) / warmup_steps if k < warmup_steps else 1.0."""
    return (k + 1) / warmup_steps if k < warmup_steps else 1.0


def published_rect(k: int, beta2: float, silent_sgd_phase: bool) -> tuple[float, bool]:
    """radam_schedulefree.py: rectification term and whether the step divides by the second moment."""
    step = k + 1
    beta2_t = beta2**step
    bias_correction2 = 1 - beta2_t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2_t / bias_correction2
    if rho_t > 4.0:
        return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5, True
    return float(not silent_sgd_phase), False


def published_ckp1s(lrs: list[float], r: float, weight_lr_power: float) -> list[float]:
    """adamw_schedulefree.py: lr_max = max(lr, lr_max); weight = (k+1)^r lr_max^p; ckp1 = weight / sum,
    0 on ZeroDivisionError (lr_max starts at -1)."""
    lr_max, weight_sum, out = -1.0, 0.0, []
    for k, lr in enumerate(lrs):
        lr_max = max(lr, lr_max)
        weight = ((k + 1) ** r) * (lr_max**weight_lr_power)
        weight_sum = weight_sum + weight
        try:
            out.append(weight / weight_sum)
        except ZeroDivisionError:
            out.append(0)
    return out
