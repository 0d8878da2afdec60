"""The update rules as records (``mup_schedulefree.optimizers.rules``), each on its own.

Oracle for the scalar schedules: the published ``schedulefree`` 1.4.1 step functions' formulas,
transcribed below (``published_*``) in the order the published code evaluates them. The learning
rate, bias corrections and adaptivity are exact (RAdam's rectification: within 4 double ulps,
``math.sqrt`` against ``** 0.5``, and the paper form's lr, the same product in another order); ckp1 is computed here from learning rates relative to the
group's reference lr, the same quantity through another expression, so it agrees to a relative
1e-12.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from mup_schedulefree import kernels, native
from mup_schedulefree import optimizers as forms
from mup_schedulefree.optimizers import rules
from mup_schedulefree.optimizers.base import SCHEDULE_DEFAULTS
from published_schedule import published_ckp1s, published_rect, published_warmup

STEPS = 40


# ----------------------------------------------------------------------------- published formulas
# (warmup, rectification and ckp1 in published_schedule.py, shared with test_schedule.py)
def published_lr(name: str, group: dict, k: int) -> tuple[float, bool]:
    """The scheduled lr of step k and whether it is adaptive, as each published class computes it."""
    if name == "RAdam":
        rect, adaptive = published_rect(k, group["betas"][1], group["silent_sgd_phase"])
        return group["lr"] * rect, adaptive
    sched = published_warmup(k, group["warmup_steps"])
    if name == "AdamW-paper":  # adamw_schedulefree_paper.py: lr * sched * sqrt(1 - beta2^(k+1))
        return group["lr"] * sched * math.sqrt(1 - group["betas"][1] ** (k + 1)), True
    return group["lr"] * sched, True


def new_group(rule: rules.Rule, **hyper) -> dict:
    """A parameter group as an optimizer built on ``rule`` starts it: no parameters needed."""
    return {**SCHEDULE_DEFAULTS, **rule.defaults, **hyper}


# ----------------------------------------------------------------------------- schedules
CASES = [
    pytest.param(rules.SGD, dict(lr=0.5, momentum=0.8, weight_decay=0.01, warmup_steps=7, r=1.0), id="SGD"),
    pytest.param(rules.SGD, dict(lr=2.0, weight_lr_power=0.0), id="SGD-no-warmup"),
    pytest.param(rules.ADAMW, dict(lr=0.01, betas=(0.85, 0.99), eps=1e-6, weight_decay=0.1, warmup_steps=5, r=0.5),
                 id="AdamW"),
    pytest.param(rules.ADAMW, dict(lr=0.03, warmup_steps=3, inner_momentum=0.9, weight_lr_power=1.0),
                 id="AdamW-inner"),
    pytest.param(rules.RADAM, dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.01, r=1.0), id="RAdam-silent"),
    pytest.param(rules.RADAM, dict(lr=0.02, betas=(0.8, 0.9), silent_sgd_phase=False), id="RAdam-sgd-phase"),
    pytest.param(rules.ADAMW_PAPER, dict(lr=0.01, betas=(0.9, 0.99), warmup_steps=5, r=1.0), id="AdamW-paper"),
]


@pytest.mark.parametrize("rule, hyper", CASES)
def test_advance_gives_the_published_lr_ckp1_and_bias_corrections(rule, hyper):
    """Oracle: the published formulas above, fed the same group, over 40 steps; lr, bias corrections
    and adaptivity exact (RAdam's lr to 4 ulps), ckp1 to a relative 1e-12."""
    group = new_group(rule, **hyper)
    expected_lrs, got = [], []
    for k in range(STEPS):
        assert group["k"] == k
        lr, adaptive = published_lr(rule.name, group, k)
        expected_lrs.append(lr)
        scalars = rule.advance(group)
        got.append(scalars)
        if rule.name != "AdamW":  # RAdam: sqrt vs ** 0.5; paper: lr * (sched * sqrt(bc2)), another product order
            assert scalars["lr"] == pytest.approx(lr, rel=4 * 2.0**-52, abs=0.0), k
        else:
            assert scalars["lr"] == lr, k
        assert group["scheduled_lr"] == scalars["lr"]
        assert scalars["weight_decay"] == group["weight_decay"]
        if rule.mup_rule == "sgd":
            assert scalars.keys() == {"lr", "momentum", "weight_decay", "ckp1"}
            assert scalars["momentum"] == group["momentum"]
            continue
        beta1, beta2 = group["betas"]
        assert (scalars["beta1"], scalars["beta2"], scalars["eps"]) == (beta1, beta2, group["eps"])
        assert scalars["adaptive"] is adaptive, k
        # The paper's form folds sqrt(1 - beta2^(k+1)) into the lr and divides by sqrt(v) itself.
        assert scalars["bias_correction2"] == (1.0 if rule.name == "AdamW-paper" else 1 - beta2 ** (k + 1)), k
        mu = group.get("inner_momentum", 0.0)
        if mu:
            assert (scalars["inner_momentum"], scalars["bias_correction1"]) == (mu, 1 - mu ** (k + 1)), k
        else:
            assert "inner_momentum" not in scalars and "bias_correction1" not in scalars
    expected = published_ckp1s(expected_lrs, group["r"], group["weight_lr_power"])
    assert [s["ckp1"] for s in got] == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert group["k"] == STEPS


def test_radam_silent_phase_takes_no_step_and_gives_it_no_averaging_weight():
    """Oracle: for beta2 = 0.999, rho_inf = 1999 and rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t) is about
    t - (t - 1) t / 2000 (a Taylor expansion in 1 - beta2), so rho_t <= 4 at steps 1..4 and 4.996 at step
    5; lr and ckp1 are 0 in those four steps, and the first adaptive step gets ckp1 = 1 (its weight is
    the whole sum)."""
    group = new_group(rules.RADAM, lr=0.01)
    silent = [rules.RADAM.advance(group) for _ in range(4)]
    assert [(s["lr"], s["ckp1"], s["adaptive"]) for s in silent] == [(0.0, 0.0, False)] * 4
    first = rules.RADAM.advance(group)
    assert first["adaptive"] is True and first["lr"] > 0.0 and first["ckp1"] == 1.0


@pytest.mark.parametrize("rule, hyper", CASES)
def test_schedule_reads_the_group_and_writes_nothing(rule, hyper):
    """The schedule and scalars of a record are pure: the group is unchanged, and asking twice agrees."""
    group = new_group(rule, **hyper)
    for _ in range(3):
        rule.advance(group)
    before = dict(group)
    schedule = rule.schedule(group)
    assert rule.schedule(group) == schedule
    assert rule.scalars(group, group["k"], 0.1, 0.5, schedule.adaptive) == \
        rule.scalars(group, group["k"], 0.1, 0.5, schedule.adaptive)
    assert group == before


# ----------------------------------------------------------------------------- the rest of a record
@pytest.mark.parametrize("rule, beta, keys", [
    (rules.SGD, 0.8, ()),
    (rules.ADAMW, 0.85, ("exp_avg_sq",)),
    (rules.RADAM, 0.85, ("exp_avg_sq",)),
    (rules.ADAMW_PAPER, 0.85, ("exp_avg_sq",)),
], ids=lambda v: getattr(v, "name", None))
def test_beta_moment_keys_and_kernels_of_each_rule(rule, beta, keys):
    """Oracle: the method's definitions (SGD interpolates with momentum and keeps no moment; the Adam
    rules interpolate with beta1 and keep v); the kernel and native op exist under those names."""
    group = new_group(rule, momentum=0.8) if rule.mup_rule == "sgd" else new_group(rule, betas=(0.85, 0.99))
    assert rule.beta(group) == beta
    assert rule.moment_keys(group) == keys
    assert callable(getattr(kernels, rule.kernel))
    assert rule.native_op(group) in native.OPS


def test_inner_momentum_adds_its_moment_and_picks_its_native_op():
    group = new_group(rules.ADAMW, inner_momentum=0.9)
    assert rules.ADAMW.moment_keys(group) == ("exp_avg_sq", "exp_avg")
    assert rules.ADAMW.native_op(group) == "adam_sf_inner_step_" and "adam_sf_inner_step_" in native.OPS


@pytest.mark.parametrize("rule, hyper, message", [
    (rules.SGD, dict(momentum=0.0), r"Invalid momentum: 0.0 \(must lie in \(0.0, 1.0\)\)"),
    (rules.SGD, dict(lr=-1.0), r"Invalid lr: -1.0 \(must lie in \[0.0, inf\)\)"),
    (rules.ADAMW, dict(betas=(0.0, 0.999)), r"Invalid betas\[0\]: 0.0"),
    (rules.ADAMW, dict(inner_momentum=1.0), r"Invalid inner_momentum: 1.0"),
    (rules.RADAM, dict(betas=(0.9, 1.0)), r"Invalid betas\[1\]: 1.0"),
    (rules.ADAMW_PAPER, dict(eps=-1e-8), r"Invalid eps: -1e-08"),
], ids=lambda v: getattr(v, "name", None) if isinstance(v, rules.Rule) else None)
def test_validate_names_the_argument_and_the_allowed_range(rule, hyper, message):
    rule.validate(new_group(rule))
    with pytest.raises(ValueError, match=message):
        rule.validate(new_group(rule, **hyper))


# Every class built on each rule (the reference forms included).
CLASSES = {
    rules.SGD: ("SGDScheduleFree", "SGDScheduleFreeClosure", "SGDScheduleFreeReference"),
    rules.ADAMW: ("AdamWScheduleFree", "AdamWScheduleFreeClosure", "AdamWScheduleFreeReference"),
    rules.RADAM: ("RAdamScheduleFree", "RAdamScheduleFreeClosure", "RAdamScheduleFreeReference"),
    rules.ADAMW_PAPER: ("AdamWScheduleFreePaper", "AdamWScheduleFreePaperReference"),
}


@pytest.mark.parametrize("rule, name", [pytest.param(rule, name, id=name) for rule, names in CLASSES.items()
                                        for name in names])
def test_every_class_of_a_rule_declares_the_record_defaults(rule, name):
    """Oracle: the record's defaults; every class of the rule takes each of its hyperparameters with
    that default (the AdamW-paper form has no inner_momentum argument: its groups keep 0)."""
    parameters = inspect.signature(getattr(forms, name).__init__).parameters
    for key, default in rule.defaults.items():
        if rule is rules.ADAMW_PAPER and key == "inner_momentum":
            assert key not in parameters
            continue
        assert parameters[key].default == default, (name, key)


# ----------------------------------------------------------------------------- reference forms
# Each fast form against the reference form of its rule. Gradients are those of a weakly curved
# quadratic plus step noise, g = noise_k + 0.1 (p - target), taken at each optimizer's own y: the runs
# feed back through their gradients, but contractively, so float32 rounding differences do not grow.
# Tolerance: per tensor, max |fast - reference| <= 1e-5 * max |reference| + 1e-6 (as tests/test_properties.py).
RTOL, ATOL = 1e-5, 1e-6
TRAJECTORY_STEPS = 60
SWITCHES = (1, 4, 15, 30, 45)  # eval() then train() after these steps (1 and 4: inside RAdam's silent phase)
SHAPES = ((6, 4), (6,), (3, 6), (3,), ())
PATHS = {"fused": dict(fused=True, foreach=False), "foreach": dict(fused=False, foreach=True),
         "single": dict(fused=False, foreach=False)}


def _groups(params: list, lr: float, warmup: bool) -> list[dict]:
    """Three groups: [W1, b1] at lr, [W2] at lr / 3 with decay 0.05, [b2, scalar] at 2 lr with decay 0.01."""
    extra = dict(warmup_steps=7) if warmup else {}
    return [{"params": params[:2]}, {"params": params[2:3], "lr": lr / 3, "weight_decay": 0.05},
            {"params": params[3:], "lr": 2 * lr, "weight_decay": 0.01, **extra}]


def _assert_close(fast_params: list, ref_params: list, where: str) -> None:
    for i, (a, b) in enumerate(zip(fast_params, ref_params)):
        err = (a - b).abs().max().item()
        tol = RTOL * b.abs().max().item() + ATOL
        assert err <= tol, f"{where}, tensor {i}: {err:.3g} > {tol:.3g}"


REFERENCE_PAIRS = [
    pytest.param("RAdamScheduleFree", "RAdamScheduleFreeReference",
                 dict(lr=0.02, betas=(0.9, 0.999), weight_decay=0.01, r=1.0), id="RAdam-silent"),
    pytest.param("RAdamScheduleFree", "RAdamScheduleFreeReference",
                 dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, silent_sgd_phase=False, weight_lr_power=1.0),
                 id="RAdam-sgd-phase"),
    pytest.param("AdamWScheduleFreePaper", "AdamWScheduleFreePaperReference",
                 dict(lr=0.02, betas=(0.9, 0.99), weight_decay=0.01, warmup_steps=5, r=0.5), id="AdamW-paper"),
]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fast_name, ref_name, config", REFERENCE_PAIRS)
def test_fast_form_follows_the_reference_form_of_its_rule(fast_name, ref_name, config, path):
    """60 steps, three groups (lr factors 1, 1/3, 2; weight decay in two), eval()/train() switches
    (two inside RAdam's silent phase). Oracle: the reference form, at y after every switch and at
    the end, and at x at the end; tolerance in the comment above."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(shape, generator=gen) for shape in SHAPES]
    targets = [torch.randn(shape, generator=gen) for shape in SHAPES]
    fast_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    warmup = "warmup_steps" in config
    fast = getattr(forms, fast_name)(_groups(fast_params, config["lr"], warmup), **config, **PATHS[path])
    ref = getattr(forms, ref_name)(_groups(ref_params, config["lr"], warmup), **config)
    assert fast.rule is ref.rule
    for k in range(TRAJECTORY_STEPS):
        noise = [torch.randn(shape, generator=gen) for shape in SHAPES]
        for opt, params in ((fast, fast_params), (ref, ref_params)):
            for p, n, t in zip(params, noise, targets):
                p.grad = n + 0.1 * (p.detach() - t)
            opt.step()
        if k + 1 in SWITCHES:
            for opt in (fast, ref):
                opt.eval()
            _assert_close(fast_params, ref_params, f"x after step {k + 1}")
            for opt in (fast, ref):
                opt.train()
            _assert_close(fast_params, ref_params, f"y after step {k + 1}")
    _assert_close(fast_params, ref_params, "y at the end")
    assert [g["k"] for g in fast.param_groups] == [g["k"] for g in ref.param_groups] == [TRAJECTORY_STEPS] * 3
    fast.eval()
    ref.eval()
    _assert_close(fast_params, ref_params, "x at the end")
    assert max((a - b).abs().max().item() for a, b in zip(fast_params, init)) > 0.02, "precondition: the run moves x"


def test_mu_radam_reference_factory_builds_the_reference_with_the_fast_factory_groups():
    """Oracle: MuRAdam_ScheduleFree's groups on the same model (muP lr, decay and eps per group, every
    key but the parameters and the class's own flags), and 8 steps of each (4 of them un-normalised SGD
    steps) agree within the tolerance above at every parameter."""
    from mup_models import D_IN, mixed_net

    import mup_schedulefree as msf

    kwargs = dict(lr=0.01, weight_decay=0.1, scale_eps=True)
    fast_model, ref_model = mixed_net(24, 48), mixed_net(24, 48)
    fast = msf.MuRAdam_ScheduleFree(fast_model.named_parameters(), silent_sgd_phase=False, **kwargs)
    ref = msf.MuRAdam_ScheduleFreeReference(ref_model.named_parameters(), silent_sgd_phase=False, **kwargs)
    assert type(ref) is msf.RAdamScheduleFreeReference and ref.mup_rule == "adam"
    own = {"params", "foreach", "fused", "master_weights"}
    assert [{k: v for k, v in g.items() if k not in own} for g in ref.param_groups] == \
        [{k: v for k, v in g.items() if k not in own} for g in fast.param_groups]
    assert len({g["lr"] for g in ref.param_groups}) > 1, "precondition: muP gives the groups different lrs"
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        x = torch.randn(5, D_IN, generator=gen)
        for model, opt in ((fast_model, fast), (ref_model, ref)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        _assert_close(list(fast_model.parameters()), list(ref_model.parameters()), f"after step {step + 1}")


@pytest.mark.parametrize("ref_name, fast_name", [("RAdamScheduleFreeReference", "RAdamScheduleFree"),
                                                 ("AdamWScheduleFreePaperReference", "AdamWScheduleFreePaper")])
def test_new_reference_forms_take_the_fast_form_arguments_in_its_order(ref_name, fast_name):
    """Oracle: the fast class's signature (names, order, defaults), less ``master_weights``: a reference
    keeps its state in the parameter's dtype, as the other reference forms do (no published class)."""
    def parameters(name: str) -> list[tuple[str, object]]:
        return [(p.name, p.default) for p in inspect.signature(getattr(forms, name).__init__).parameters.values()]

    assert parameters(ref_name) == [(n, d) for n, d in parameters(fast_name) if n != "master_weights"]
