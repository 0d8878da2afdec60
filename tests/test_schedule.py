"""Unit tests of the scalar schedules in ``mup_schedulefree.schedule``.

Oracle: the formulas of the published ``schedulefree`` 1.4.1 step functions, transcribed below
(``published_*``) in the order the published code evaluates them, and a few closed forms derived by
hand. Where our function computes the same quantity through a different but equal expression
(ckp1 from learning rates relative to the group's reference lr), agreement is to a relative 1e-12
(a few double-precision roundings); elsewhere it is exact.
"""
from __future__ import annotations

import math

import pytest

from mup_schedulefree import SGDScheduleFree
from mup_schedulefree.optimizers.base import SCHEDULE_DEFAULTS, advance_schedule
from mup_schedulefree.schedule import averaging_weight, radam_rectification, warmup_multiplier
from published_schedule import published_ckp1s, published_rect, published_warmup


def our_ckp1s(lrs: list[float], lr_ref: float, r: float, weight_lr_power: float) -> list[float]:
    lr_max, weight_sum, out = -1.0, 0.0, []
    for k, lr in enumerate(lrs):
        avg = averaging_weight(k, lr / lr_ref, lr_max, weight_sum, r, weight_lr_power)
        lr_max, weight_sum = avg.lr_max, avg.weight_sum
        out.append(avg.ckp1)
    return out


# ----------------------------------------------------------------------------- warmup
@pytest.mark.parametrize("warmup_steps", [0, 1, 5, 7])
def test_warmup_multiplier_is_the_published_linear_ramp(warmup_steps):
    """(k+1)/warmup_steps for k < warmup_steps, then exactly 1.0 (exact equality with the published formula)."""
    for k in range(12):
        assert warmup_multiplier(k, warmup_steps) == published_warmup(k, warmup_steps)
    assert warmup_multiplier(warmup_steps, warmup_steps) == 1.0


# ----------------------------------------------------------------------------- RAdam rectification
@pytest.mark.parametrize("beta2", [0.9, 0.99, 0.999, 0.9999])
@pytest.mark.parametrize("silent", [True, False])
def test_radam_rectification_matches_published_term(beta2, silent):
    """Multiplier within 4 double ulps of the published term (math.sqrt vs ** 0.5), adaptive exactly
    when the published step divides by the second moment; outside that phase 0.0 (silent) or 1.0."""
    for k in list(range(60)) + [500, 10_000]:
        expected, adaptive = published_rect(k, beta2, silent)
        got = radam_rectification(k, beta2, silent)
        assert got.adaptive is adaptive, (k, got)
        if adaptive:
            assert math.isclose(got.multiplier, expected, rel_tol=4 * 2.0**-52), (k, got, expected)
        else:
            assert got.multiplier == (0.0 if silent else 1.0)


@pytest.mark.parametrize("beta2", [0.9, 0.99, 0.999])
def test_radam_silent_phase_is_a_prefix_ending_where_rho_exceeds_4(beta2):
    """The non-adaptive steps are exactly the first n, n = the published count, and the term then
    rises toward 1 monotonically. At beta2 = 0.999, rho_t = 1999 - 2 t 0.999^t / (1 - 0.999^t) is
    3.9975 at step t = 4 and 4.9960 at t = 5 (by hand), so steps 1-4 (k = 0..3) are silent, as the
    published docstring's "< 5 when beta2 = 0.999" says."""
    flags = [radam_rectification(k, beta2, True).adaptive for k in range(200)]
    n = flags.index(True)
    assert not any(flags[:n]) and all(flags[n:])
    assert n == sum(not published_rect(k, beta2, True)[1] for k in range(200))
    if beta2 == 0.999:
        assert n == 4
    terms = [radam_rectification(k, beta2, True).multiplier for k in range(n, 200)]
    assert all(a < b for a, b in zip(terms, terms[1:])) and 0.0 < terms[0] and terms[-1] < 1.0


def test_radam_with_beta2_zero_is_never_adaptive():
    """beta2 = 0: rho_inf = 1, so rho_t = 1 <= 4 at every step (published formula)."""
    assert not any(radam_rectification(k, 0.0, False).adaptive for k in range(20))


# ----------------------------------------------------------------------------- averaging weight
LR_SCHEDULE = [0.0, 0.0] + [0.3 * (k + 1) / 6 for k in range(6)] + [0.3] * 6 + [0.15] * 4 + [0.45] * 3


@pytest.mark.parametrize("r", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("weight_lr_power", [0.0, 1.0, 2.0])
def test_averaging_weight_matches_published_ckp1(r, weight_lr_power):
    """Over lr = 0, 0, a 6-step warmup, a plateau, a drop and a rise, ckp1 from relative learning
    rates equals the published ckp1 from absolute ones to a relative 1e-12 (0 exactly where the
    published code hits 0/0 at lr = 0; with weight_lr_power = 0 lr = 0 still weighs (k+1)^r)."""
    expected = published_ckp1s(LR_SCHEDULE, r, weight_lr_power)
    got = our_ckp1s(LR_SCHEDULE, 0.3, r, weight_lr_power)
    for k, (a, b) in enumerate(zip(got, expected)):
        if b == 0:
            assert a == 0.0, (k, a)
        else:
            assert math.isclose(a, b, rel_tol=1e-12), (k, a, b)


def test_averaging_weight_at_lr_zero_is_zero_and_then_one():
    """While every lr so far is 0 (weight_lr_power > 0) ckp1 = 0: x stays put; the first step with
    lr > 0 has ckp1 = 1: x jumps to z."""
    got = our_ckp1s([0.0, 0.0, 0.0, 0.1, 0.1], 0.1, 0.0, 2.0)
    assert got[:3] == [0.0, 0.0, 0.0]
    assert got[3] == 1.0 and got[4] == 0.5


def test_averaging_weight_with_power_zero_ignores_lr():
    """weight_lr_power = 0: w_k = (k+1)^r whatever the lr (0 included; 0**0 = 1 as in the published
    code), so r = 0 gives ckp1 = 1/(k+1) exactly."""
    assert our_ckp1s([0.0, 0.3, 0.0, 0.1], 0.3, 0.0, 0.0) == [1.0, 1 / 2, 1 / 3, 1 / 4]


@pytest.mark.parametrize("r, closed_form", [(0.0, lambda k: 1 / (k + 1)), (1.0, lambda k: 2 / (k + 2))])
def test_averaging_weight_closed_forms_at_constant_lr(r, closed_form):
    """Constant lr: w_k = (k+1)^r, so ckp1 = 1/(k+1) for r = 0 and (k+1) / sum_{i<=k+1} i = 2/(k+2)
    for r = 1 (derived by hand; relative 1e-15)."""
    for k, ckp1 in enumerate(our_ckp1s([0.2] * 30, 0.2, r, 2.0)):
        assert math.isclose(ckp1, closed_form(k), rel_tol=1e-15), (k, ckp1)


# ----------------------------------------------------------------------------- bit-identical ckp1 across groups
def _group_ckp1s(lr: float, warmup: int, steps: int, r: float) -> list[float]:
    group = {**SCHEDULE_DEFAULTS, "lr": lr, "r": r, "weight_lr_power": 2.0}
    return [advance_schedule(group, warmup_multiplier(k, warmup))[1] for k in range(steps)]


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_ckp1_is_bit_identical_across_groups_whose_lr_differ_by_one_third(r):
    """Groups with lr 0.3 and 0.3/3 (a non-power-of-two factor), 10-step warmup, 40 steps: ckp1 is
    bitwise equal at every step. The published formula on absolute learning rates is not (checked
    here too, so the claim is not vacuous)."""
    ours_a, ours_b = _group_ckp1s(0.3, 10, 40, r), _group_ckp1s(0.3 / 3, 10, 40, r)
    assert ours_a == ours_b
    schedule = [warmup_multiplier(k, 10) for k in range(40)]
    assert published_ckp1s([0.3 * m for m in schedule], r, 2.0) != published_ckp1s([0.1 * m for m in schedule], r, 2.0)


def test_optimizer_groups_with_lr_ratio_one_third_share_averaging_state_bitwise():
    """In SGDScheduleFree, two groups with lr 0.3 and 0.1 and a 10-step warmup keep bitwise equal
    averaging sums over 40 steps, including after both lrs are halved at step 20 (an exact change),
    so their ckp1 = w / sum is bitwise equal too."""
    import torch

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = SGDScheduleFree([{"params": [a], "lr": 0.3}, {"params": [b], "lr": 0.1}], warmup_steps=10, r=1.0)
    for k in range(40):
        if k == 20:
            for group in opt.param_groups:
                group["lr"] *= 0.5
        a.grad, b.grad = torch.ones(3), torch.ones(3)
        opt.step()
        first, second = opt.param_groups
        assert first["averaging"]["weight_sum"] == second["averaging"]["weight_sum"], k
        assert first["averaging"]["lr_max"] == second["averaging"]["lr_max"], k
