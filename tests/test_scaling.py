"""muP's per-parameter rules (mup_schedulefree.scaling) on hand-built infinite-width shapes.

Oracle: the rules as mup 1.0.0 states them (mup/optim.py), written out here as literal
arithmetic on the shape's multipliers, independently of scaling.py:

    adam  ninf == 2: lr / width_mult, wd * width_mult          else unchanged
    sgd   ninf == 2: lr / fanin_fanout_mult_ratio, wd * ratio
          ninf == 1: lr * width_mult, wd / width_mult
          ninf == 0: unchanged

Weight decay multiplied by lr^q must keep lr^q * wd width-independent: q = 1 gets the inverse
of the lr multiplier (exactly mup's floats), q = 2 its square, q = 0 (decoupled) nothing.
"""
from __future__ import annotations

import copy

import pytest
import schedulefree
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mup.infshape import InfDim, InfShape

import mup_schedulefree as msf
from mup_schedulefree import mu_param_groups
from mup_schedulefree.scaling import Scaling, infer_rule, parameter_scaling

LR, WD = 0.01, 0.1


def infshape(*dims: tuple[int | None, int]) -> InfShape:
    """InfShape from (base_dim, dim) pairs; base_dim None marks a finite dimension."""
    return InfShape([InfDim(base, dim) for base, dim in dims])


# Multipliers 3, 5, 6 and ratios 0.5, 1/3: none are powers of two, so x * m and x / (1/m) round differently.
MATRIX = infshape((8, 48), (8, 24))  # fan-out mult 6, fan-in mult 3: width_mult 3, fan-in/fan-out ratio 0.5
SQUARE = infshape((8, 24), (8, 24))  # ratio 1
WIDE_IN = infshape((8, 24), (8, 72))  # fan-out 3, fan-in 9: width_mult 9, ratio 3
INF_FIN = infshape((8, 24), (None, 5))  # input layer weight: vector-like, width_mult 3
FIN_INF = infshape((None, 3), (8, 40))  # readout weight: vector-like, width_mult 5
BIAS = infshape((8, 40))  # bias / LayerNorm of a width-40 layer: width_mult 5
FIXED = infshape((None, 3))  # readout bias
FIXED_2D = infshape((None, 3), (None, 5))
THREE_INF = infshape((8, 24), (8, 24), (8, 24))

# (shape, rule, role, lr, wd at q = 1): mup's arithmetic, spelled out.
EXPECTED = [
    (MATRIX, "adam", "matrix-like", LR / 3.0, WD * 3.0),
    (SQUARE, "adam", "matrix-like", LR / 3.0, WD * 3.0),
    (WIDE_IN, "adam", "matrix-like", LR / 9.0, WD * 9.0),
    (INF_FIN, "adam", "vector-like", LR, WD),
    (FIN_INF, "adam", "vector-like", LR, WD),
    (BIAS, "adam", "vector-like", LR, WD),
    (FIXED, "adam", "vector-like", LR, WD),
    (FIXED_2D, "adam", "vector-like", LR, WD),
    (MATRIX, "sgd", "matrix-like", LR / 0.5, WD * 0.5),
    (SQUARE, "sgd", "matrix-like", LR / 1.0, WD * 1.0),
    (WIDE_IN, "sgd", "matrix-like", LR / 3.0, WD * 3.0),
    (INF_FIN, "sgd", "vector-like", LR * 3.0, WD / 3.0),
    (FIN_INF, "sgd", "vector-like", LR * 5.0, WD / 5.0),
    (BIAS, "sgd", "vector-like", LR * 5.0, WD / 5.0),
    (FIXED, "sgd", "fixed", LR, WD),
    (FIXED_2D, "sgd", "fixed", LR, WD),
]
SHAPE_NAMES = {id(MATRIX): "matrix", id(SQUARE): "square", id(WIDE_IN): "wide-in", id(INF_FIN): "inf-x-fin",
               id(FIN_INF): "fin-x-inf", id(BIAS): "bias", id(FIXED): "fixed", id(FIXED_2D): "fixed-2d"}
CASES = [pytest.param(*row, id=f"{row[1]}-{SHAPE_NAMES[id(row[0])]}") for row in EXPECTED]


@pytest.mark.parametrize("shape, rule, role, lr, wd", CASES)
def test_rule_scales_lr_and_coupled_decay_exactly_as_mup(shape, rule, role, lr, wd):
    """Oracle: mup 1.0.0's arithmetic (table above); exact float equality, since both divide or
    multiply by the same shape quantity."""
    scaling = parameter_scaling(shape, rule, name="w")
    assert scaling.role == role
    assert scaling.scale_lr(LR) == lr
    assert scaling.scale_weight_decay(WD, decay_lr_power=1) == wd


@pytest.mark.parametrize("shape, rule, role, lr, wd", CASES)
def test_decay_multiplier_is_squared_for_lr_squared_decay_and_absent_when_decoupled(shape, rule, role, lr, wd):
    """Oracle: q = 2 (decay x lr^2, AdamC-style) gets the q = 1 decay multiplier squared
    (rel. tolerance 1e-14: two roundings instead of one), q = 0 gets none (exact)."""
    scaling = parameter_scaling(shape, rule)
    q1_multiplier = wd / WD
    assert scaling.scale_weight_decay(WD, decay_lr_power=2) == pytest.approx(WD * q1_multiplier**2, rel=1e-14)
    assert scaling.scale_weight_decay(WD, decay_lr_power=0) == WD


@pytest.mark.parametrize("shape, rule, role, lr, wd", CASES)
def test_mu_param_groups_puts_hand_built_shapes_in_the_expected_group(shape, rule, role, lr, wd):
    """Oracle: the table above, through the public mu_param_groups on one parameter carrying the
    hand-built infshape; the group records its rule, role and multipliers."""
    p = torch.nn.Parameter(torch.zeros(shape.shape()))
    p.infshape = shape
    for q, expected_wd in ((1, wd), (0, WD)):
        (group,) = mu_param_groups([("w", p)], rule, lr=LR, decay_keys={"weight_decay": WD}, decay_lr_power=q)
        assert group["params"] == [("w", p)]
        assert (group["lr"], group["weight_decay"]) == (lr, expected_wd)
        assert (group["mup_rule"], group["mup_role"]) == (rule, role)
        assert group["mup_lr_mult"] == pytest.approx(lr / LR, rel=1e-15)
        assert group["mup_wd_mult"] == pytest.approx(expected_wd / WD, rel=1e-15)


@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_more_than_two_infinite_dims_raises_naming_the_parameter(rule):
    """Oracle: muP defines no scaling for ninf > 2 (mup raises too); the error names the parameter,
    directly and through mu_param_groups with named parameters."""
    with pytest.raises(ValueError, match="blocks.0.qkv"):
        parameter_scaling(THREE_INF, rule, name="parameter 'blocks.0.qkv'")
    p = torch.nn.Parameter(torch.zeros(24, 24, 24))
    p.infshape = THREE_INF
    with pytest.raises(ValueError, match=r"'blocks\.0\.qkv'.*3 infinite dimensions"):
        mu_param_groups([("blocks.0.qkv", p)], rule, lr=LR, decay_keys={"weight_decay": WD})


def test_unknown_rule_and_decay_power_are_rejected_by_name():
    """Oracle: only rules "adam"/"sgd" and decay powers 0, 1, 2 are defined."""
    with pytest.raises(ValueError, match="rule"):
        parameter_scaling(MATRIX, "lion")
    with pytest.raises(ValueError, match="decay_lr_power"):
        Scaling("matrix-like", 3.0, -1).scale_weight_decay(WD, decay_lr_power=3)


multipliers = st.builds(lambda base, factor: (base, base * factor), st.integers(1, 64), st.integers(1, 40))
shapes = st.lists(st.one_of(multipliers, st.builds(lambda d: (None, d), st.integers(1, 9))), min_size=1, max_size=2)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(dims=shapes, rule=st.sampled_from(["adam", "sgd"]), q=st.sampled_from([0, 1, 2]),
       lr=st.floats(1e-5, 10.0), wd=st.floats(0.0, 1.0))
def test_lr_power_times_decay_is_width_independent(dims, rule, q, lr, wd):
    """Oracle: the invariant the decay scaling exists for, scaled_lr^q * scaled_wd = lr_mult^q *
    lr^q * wd / lr_mult^q = lr^q * wd (rel. tolerance 1e-12), on random shapes with at most 2
    infinite dims; the role is determined by the count of infinite dims alone."""
    shape = infshape(*dims)
    scaling = parameter_scaling(shape, rule)
    scaled = scaling.scale_lr(lr) ** q * scaling.scale_weight_decay(wd, q)
    assert scaled == pytest.approx(lr**q * wd, rel=1e-12, abs=1e-300)
    roles = {"adam": {2: "matrix-like"}, "sgd": {2: "matrix-like", 1: "vector-like", 0: "fixed"}}[rule]
    assert scaling.role == roles.get(shape.ninf(), "vector-like")


# ---------------------------------------------------------------- infer_rule


# The rule of each class, written out: Adam-like (entrywise-normalised update) or SGD-like.
PACKAGE_RULES = {
    msf.AdamWScheduleFree: "adam", msf.AdamWScheduleFreeClosure: "adam", msf.AdamWScheduleFreeReference: "adam",
    msf.RAdamScheduleFree: "adam", msf.RAdamScheduleFreeClosure: "adam",
    msf.SGDScheduleFree: "sgd", msf.SGDScheduleFreeClosure: "sgd", msf.SGDScheduleFreeReference: "sgd",
}
KNOWN_RULES = {
    torch.optim.SGD: "sgd", torch.optim.ASGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam",
    torch.optim.RAdam: "adam", torch.optim.NAdam: "adam", torch.optim.Adamax: "adam", torch.optim.RMSprop: "adam",
    torch.optim.Adagrad: "adam",
    schedulefree.SGDScheduleFree: "sgd", schedulefree.SGDScheduleFreeClosure: "sgd",
    schedulefree.SGDScheduleFreeReference: "sgd", schedulefree.AdamWScheduleFree: "adam",
    schedulefree.AdamWScheduleFreeClosure: "adam", schedulefree.AdamWScheduleFreeReference: "adam",
    schedulefree.AdamWScheduleFreePaper: "adam", schedulefree.RAdamScheduleFree: "adam",
    schedulefree.RAdamScheduleFreeClosure: "adam",
}


@pytest.mark.parametrize("cls, rule", [pytest.param(c, r, id=c.__name__) for c, r in PACKAGE_RULES.items()])
def test_infer_rule_reads_the_mup_rule_of_every_package_class(cls, rule):
    """Oracle: PACKAGE_RULES (written out above); each class states it as ``mup_rule`` and
    infer_rule returns that attribute."""
    assert cls.mup_rule == rule
    assert infer_rule(cls) == rule


@pytest.mark.parametrize("cls, rule", [pytest.param(c, r, id=f"{c.__module__.split('.')[0]}.{c.__name__}")
                                       for c, r in KNOWN_RULES.items()])
def test_infer_rule_knows_torch_and_published_schedulefree_classes(cls, rule):
    """Oracle: KNOWN_RULES (written out above), for classes that state no ``mup_rule``."""
    assert not hasattr(cls, "mup_rule")
    assert infer_rule(cls) == rule


def test_infer_rule_prefers_a_stated_rule_and_refuses_an_unknown_one():
    """Oracle: the stated attribute. A subclass of torch's SGD stating "adam" follows "adam";
    classes of unknown kind (Adadelta, either ScheduleFreeWrapper, nn.Linear) and non-classes
    give None; a stated rule that is not "adam"/"sgd" raises ValueError naming the attribute."""
    class AdamLikeSGD(torch.optim.SGD):
        mup_rule = "adam"

    class Lion(torch.optim.Optimizer):
        mup_rule = "lion"

    assert infer_rule(AdamLikeSGD) == "adam"
    for unknown in (torch.optim.Adadelta, msf.ScheduleFreeWrapper, schedulefree.ScheduleFreeWrapper,
                    torch.nn.Linear, 42, "Adam"):
        assert infer_rule(unknown) is None, unknown
    with pytest.raises(ValueError, match=r"^Invalid Lion\.mup_rule: 'lion' \(must be one of"):
        infer_rule(Lion)


# ---------------------------------------------------------------- mu_param_groups arguments


def shaped_parameters() -> list[tuple[str, torch.nn.Parameter]]:
    """Two named parameters carrying hand-built infshapes (a matrix and a bias)."""
    out = []
    for name, shape in (("w", MATRIX), ("b", BIAS)):
        p = torch.nn.Parameter(torch.zeros(shape.shape()))
        p.infshape = shape
        out.append((name, p))
    return out


@pytest.mark.parametrize("value", [None, "0.1", True, [0.1]], ids=["None", "str", "bool", "list"])
def test_mu_param_groups_names_a_non_number_lr_or_decay_before_reading_params(value):
    """Oracle: the value given. TypeError, one line, naming the argument (or the decay key) and
    repeating the value; a params generator is still unread afterwards."""
    for kwargs, name in (({"lr": value, "decay_keys": {"weight_decay": WD}}, "lr"),
                         ({"lr": LR, "decay_keys": {"weight_decay": value}}, "weight_decay")):
        params = (pair for pair in shaped_parameters())
        with pytest.raises(TypeError) as error:
            mu_param_groups(params, "adam", **kwargs)
        assert str(error.value).startswith(f"Invalid {name}: {value!r} (must be a real number, got ")
        assert "\n" not in str(error.value)
        assert len(list(params)) == 2


@pytest.mark.parametrize("key", ["lr", "weight_decay"])
def test_mu_param_groups_names_a_non_number_in_a_user_group_and_leaves_the_groups_as_they_were(key):
    """Oracle: the user's group dicts, deep-copied before the call. The error names the key and
    the group's index; the dicts are unchanged."""
    pairs = shaped_parameters()
    groups = [{"params": pairs[:1], "lr": 0.03}, {"params": pairs[1:], key: "0.5"}]
    before = copy.deepcopy(groups)
    with pytest.raises(TypeError, match=rf"^Invalid {key} of params group 1: '0\.5' \(must be a real number"):
        mu_param_groups(groups, "sgd", lr=LR, decay_keys={"weight_decay": WD})
    assert len(groups) == len(before)
    for group, saved in zip(groups, before):
        assert group.keys() == saved.keys()
        assert [name for name, _ in group["params"]] == [name for name, _ in saved["params"]]
        assert all(group[k] == saved[k] for k in group if k != "params")


@pytest.mark.parametrize("kwargs, message", [
    ({"rule": "lion"}, r"^Invalid rule: 'lion' \(must be one of"),
    ({"rule": None}, r"^Invalid rule: None \(must be one of"),
    ({"decay_lr_power": 3}, r"^Invalid decay_lr_power: 3 \(must be the int 0, 1 or 2\)"),
    ({"decay_lr_power": True}, r"^Invalid decay_lr_power: True \(must be the int 0, 1 or 2\)"),
    ({"decay_lr_power": 1.0}, r"^Invalid decay_lr_power: 1\.0 \(must be the int 0, 1 or 2\)"),
], ids=["rule-lion", "rule-None", "power-3", "power-True", "power-1.0"])
def test_mu_param_groups_names_an_unknown_rule_or_decay_power_before_reading_params(kwargs, message):
    """Oracle: the rules "adam"/"sgd" and decay powers 0, 1, 2 (ints) are the only ones defined."""
    params = (pair for pair in shaped_parameters())
    with pytest.raises(ValueError, match=message):
        mu_param_groups(params, **{"rule": "adam", "lr": LR, "decay_keys": {"weight_decay": WD}, **kwargs})
    assert len(list(params)) == 2
