"""Adam's eps across width (mup_schedulefree.scaling.EPS_RULE, ``scale_eps=``).

Under muP the gradient entries, and Adam's sqrt(v), shrink like 1/width_mult (derivation in
scaling.py's docstring), so a fixed base-width eps swamps sqrt(v) in wide models and their updates
shrink. ``scale_eps=True`` multiplies each group's eps by width_mult ** exponent.

Oracles:
  * the rule written out here as literal arithmetic on the infshape (below), independently of
    scaling.py: eps / (fan-out multiplier) when dim 0 is infinite, eps / (infinite fan-in
    multiplier) when only a later dim is, eps unchanged without an infinite dim;
  * mup 1.0.0's MuAdam (default groups, eps included, float for float);
  * the coordinate-check verdict (``coord_checks.verdict.judge``) with the symmetric bound of
    tests/test_coord_mup_vs_sp.py: a judged module whose statistic shrinks with a width slope
    below -0.25 (outside the zero-initialised attention query and its logits) has vanishing
    updates, which fails as surely as growth;
  * measured gradient exponents against the rule's.
"""
from __future__ import annotations

import copy
from functools import partial

import mup
import numpy as np
import pytest
import torch
from mup.infshape import InfDim, InfShape
from mup_models import mixed_net
from torch.nn import functional as F

import mup_schedulefree as msf
from coord_checks import gradient_scales
from coord_checks.verdict import judge
from mup_schedulefree import mu_param_groups
from mup_schedulefree.factories import mu_optimizer
from mup_schedulefree.scaling import eps_scaling

pytestmark = pytest.mark.usefixtures("one_thread")

LR, EPS = 1e-2, 1e-3


def infshape(*dims: tuple[int | None, int]) -> InfShape:
    """InfShape from (base_dim, dim) pairs; base_dim None marks a finite dimension."""
    return InfShape([InfDim(base, dim) for base, dim in dims])


# (shape, dims, key, exponent): fan-out mult 6 vs fan-in mult 3 etc., none powers of two.
RULE = [
    pytest.param(infshape((8, 48), (8, 24)), ("inf", "inf"), 6.0, -1, id="matrix-fan-out-6-fan-in-3"),
    pytest.param(infshape((8, 24), (8, 72)), ("inf", "inf"), 3.0, -1, id="matrix-fan-out-3-fan-in-9"),
    pytest.param(infshape((8, 24), (None, 5)), ("inf", "fin"), 3.0, -1, id="input-weight"),
    pytest.param(infshape((8, 40)), ("inf", "fin"), 5.0, -1, id="bias-or-gain"),
    pytest.param(infshape((None, 3), (8, 40)), ("fin", "inf"), 5.0, -1, id="readout-or-embedding"),
    pytest.param(infshape((8, 48), (8, 24), (None, 3), (None, 3)), ("inf", "inf"), 6.0, -1, id="conv"),
    pytest.param(infshape((None, 3)), ("fin", "fin"), 1.0, 0, id="readout-bias"),
    pytest.param(infshape((None, 3), (None, 5)), ("fin", "fin"), 1.0, 0, id="fixed-matrix"),
]


def expected_eps(p: torch.Tensor, eps: float) -> float:
    """The rule as arithmetic on ``p.infshape``: divide by the multiplier of the dimension the
    backward signal lives in (dim 0 if infinite, else the last infinite one), if any."""
    dims = list(p.infshape)
    if dims[0].isinf():
        return eps / dims[0].width_mult()
    infinite = [d for d in dims if d.isinf()]
    return eps / infinite[-1].width_mult() if infinite else eps


def eps_by_name(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{parameter name: eps of its group}, through a wrapper's base optimizer where there is one."""
    groups = getattr(optimizer, "base", optimizer).param_groups
    return {name: g["eps"] for g in groups for name in g["param_names"]}


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("shape, dims, key, exponent", RULE)
def test_eps_exponent_and_key_follow_which_dims_are_infinite(shape, dims, key, exponent):
    """Oracle: the table above (the derivation in scaling.py); the multiplier is key ** exponent exactly."""
    scaling = eps_scaling(shape)
    assert (scaling.dims, scaling.key, scaling.exponent) == (dims, key, exponent)
    assert scaling.scale_eps(EPS) == (EPS / key if exponent else EPS)


def test_every_parameter_of_a_mixed_model_gets_the_rule_eps_and_its_mup_lr_and_decay_unchanged():
    """Oracle: expected_eps (exact floats); lr and weight decay equal those of the unscaled groups,
    and each group records its eps multiplier."""
    model = mixed_net(24, 48)
    scaled = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=LR, weight_decay=0.1, eps=EPS, scale_eps=True)
    plain = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=LR, weight_decay=0.1, eps=EPS)
    params = dict(model.named_parameters())
    assert eps_by_name(scaled) == {name: expected_eps(p, EPS) for name, p in params.items()}
    assert len(set(eps_by_name(scaled).values())) == 3, "precondition: multipliers 1, 1/3 and 1/6 all occur"

    def lr_wd(optimizer):
        return {name: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for name in g["param_names"]}

    assert lr_wd(scaled) == lr_wd(plain)
    for group in scaled.param_groups:
        assert group["mup_eps_mult"] == pytest.approx(group["eps"] / EPS, rel=1e-15)


def test_user_group_eps_is_scaled_and_groups_without_one_take_the_argument():
    """Oracle: expected_eps applied to each user group's own eps (or the argument's)."""
    model = mixed_net(24, 48)
    norms = [(n, p) for n, p in model.named_parameters() if n.startswith("norm.")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("norm.")]
    groups = mu_param_groups([{"params": norms, "eps": 1e-5}, {"params": rest}], "adam", lr=LR,
                             decay_keys={"weight_decay": 0.0}, scale_eps=True, eps=EPS)
    params = dict(model.named_parameters())
    for group in groups:
        for name, _ in group["params"]:
            assert group["eps"] == expected_eps(params[name], 1e-5 if name.startswith("norm.") else EPS), name


ADAM_FACTORIES = [
    pytest.param(partial(msf.MuAdamW_ScheduleFree), id="AdamW"),
    pytest.param(partial(msf.MuRAdam_ScheduleFree), id="RAdam"),
    pytest.param(partial(msf.MuAdamW_ScheduleFreeClosure), id="AdamW-closure"),
    pytest.param(partial(msf.MuRAdam_ScheduleFreeClosure), id="RAdam-closure"),
    pytest.param(partial(msf.MuAdamW_ScheduleFreeReference), id="AdamW-reference"),
    pytest.param(partial(msf.MuAdamW_ScheduleFreePaper), id="AdamW-paper"),
    pytest.param(partial(msf.MuAdamW_ScheduleFree, impl=torch.optim.AdamW), id="torch-AdamW"),
    pytest.param(partial(mu_optimizer, impl=torch.optim.Adam, rule="adam"), id="mu_optimizer-Adam"),
    pytest.param(partial(msf.MuScheduleFreeWrapper, base_impl=torch.optim.Adam, betas=(0.0, 0.999)), id="wrapper"),
    pytest.param(partial(msf.MuScheduleFreeWrapperReference, base_impl=torch.optim.Adam), id="wrapper-reference"),
]


@pytest.mark.parametrize("factory", ADAM_FACTORIES)
def test_every_adam_rule_factory_scales_eps_and_leaves_it_alone_by_default(factory):
    """Oracle: expected_eps with scale_eps=True; the base eps in every group without it."""
    model = mixed_net(24, 48)
    params = dict(model.named_parameters())
    scaled = factory(model.named_parameters(), lr=LR, eps=EPS, scale_eps=True)
    assert eps_by_name(scaled) == {name: expected_eps(p, EPS) for name, p in params.items()}
    plain = factory(model.named_parameters(), lr=LR, eps=EPS)
    assert set(eps_by_name(plain).values()) == {EPS}
    assert {g["mup_eps_mult"] for g in plain.param_groups} == {None}


@pytest.mark.parametrize("factory", ADAM_FACTORIES[:6])
def test_the_impl_default_eps_is_scaled_when_none_is_given(factory):
    """Oracle: the class's own default eps (1e-8), divided per expected_eps."""
    model = mixed_net(24, 48)
    optimizer = factory(model.named_parameters(), lr=LR, scale_eps=True)
    assert eps_by_name(optimizer) == {name: expected_eps(p, 1e-8) for name, p in model.named_parameters()}


@pytest.mark.parametrize("impl", [torch.optim.Adam, msf.AdamWScheduleFree, msf.AdamWScheduleFreePaper])
def test_default_groups_equal_mup_muadam_with_eps_float_for_float(impl):
    """Oracle: mup 1.0.0's MuAdam on the same model and eps: same non-empty groups, same lr,
    weight decay and eps (exact float equality)."""
    model = mixed_net(24, 48)
    ours = msf.MuAdamW_ScheduleFree(list(model.parameters()), impl=impl, lr=LR, weight_decay=0.1, eps=EPS)
    theirs = mup.MuAdam(list(model.parameters()), impl=impl, lr=LR, weight_decay=0.1, eps=EPS)

    def describe(optimizer):
        return [([id(p) for p in g["params"]], g["lr"], g["weight_decay"], g["eps"])
                for g in optimizer.param_groups if g["params"]]

    assert describe(ours) == describe(theirs)


# ---------------------------------------------------------------- errors and the saved grouping


SGD_BUILDS = [
    pytest.param(partial(msf.MuSGD_ScheduleFree), id="SGD"),
    pytest.param(partial(msf.MuSGD_ScheduleFreeClosure), id="SGD-closure"),
    pytest.param(partial(msf.MuSGD_ScheduleFreeReference), id="SGD-reference"),
    pytest.param(partial(mu_optimizer, impl=torch.optim.SGD, rule="sgd"), id="mu_optimizer-SGD"),
    pytest.param(partial(msf.MuScheduleFreeWrapper, base_impl=torch.optim.SGD), id="wrapper-SGD"),
    pytest.param(partial(msf.MuScheduleFreeWrapperReference, base_impl=torch.optim.SGD), id="wrapper-reference-SGD"),
]


def unread_params():
    """A params argument that fails the test if anything reads it."""
    def generator():
        pytest.fail("params were read before the arguments were checked")
        yield

    return generator()


@pytest.mark.parametrize("factory", SGD_BUILDS)
def test_sgd_rule_refuses_scale_eps_with_one_line_naming_it_before_reading_params(factory):
    """Oracle: SGD has no eps; the error names scale_eps on one line. scale_eps=False is accepted."""
    with pytest.raises(ValueError, match=r"^Invalid scale_eps: True \(the 'sgd' rule") as error:
        factory(unread_params(), lr=0.1, scale_eps=True)
    assert "\n" not in str(error.value)
    factory(mixed_net().parameters(), lr=0.1, scale_eps=False)


def test_scale_eps_of_the_wrong_kind_or_an_impl_without_eps_is_named():
    """Oracle: scale_eps must be a bool; an Adam-rule class without an eps argument has nothing to scale."""
    with pytest.raises(TypeError, match=r"^Invalid scale_eps: 1 \(must be True or False"):
        msf.MuAdamW_ScheduleFree(unread_params(), lr=LR, scale_eps=1)
    with pytest.raises(ValueError, match=r"^Invalid scale_eps: True \(SGD has no eps argument"):
        mu_optimizer(unread_params(), torch.optim.SGD, rule="adam", lr=LR, scale_eps=True)
    with pytest.raises(TypeError, match=r"^Invalid eps: '1e-3'"):
        msf.MuAdamW_ScheduleFree(unread_params(), lr=LR, eps="1e-3", scale_eps=True)
    with pytest.raises(ValueError, match=r"^Invalid eps: None"):
        mu_param_groups(unread_params(), "adam", lr=LR, decay_keys={}, scale_eps=True)


def stepped(scale_eps: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A mixed model and its AdamW-SF after one step."""
    model = mixed_net(24, 48)
    optimizer = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=LR, eps=EPS, scale_eps=scale_eps)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    F.mse_loss(model(x), torch.zeros(8, 3)).backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("saved, loading", [(True, False), (False, True)])
def test_state_dict_saved_with_other_scale_eps_is_refused_naming_it(saved, loading):
    """Oracle: the guard compares whether eps was scaled before anything else; the state stays as it was."""
    _, source = stepped(saved)
    _, target = stepped(loading)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=f"saved with scale_eps={saved} but this muP optimizer has "
                                         f"scale_eps={loading}"):
        target.load_state_dict(source.state_dict())
    assert [g["eps"] for g in target.state_dict()["param_groups"]] == [g["eps"] for g in before["param_groups"]]


@pytest.mark.parametrize("scale_eps", [False, True])
def test_state_dict_saved_with_the_same_scale_eps_loads(scale_eps):
    """Oracle: an identical build loads it and holds the saved groups' eps."""
    _, source = stepped(scale_eps)
    _, target = stepped(scale_eps)
    target.load_state_dict(source.state_dict())
    assert [g["eps"] for g in target.param_groups] == [g["eps"] for g in source.param_groups]


def test_a_state_dict_saved_before_groups_recorded_eps_loads_without_scale_eps_only():
    """Oracle: a group without ``mup_eps_mult`` (saved by an earlier version) was saved without eps scaling."""
    _, source = stepped(False)
    old = source.state_dict()
    for group in old["param_groups"]:
        del group["mup_eps_mult"]
    stepped(False)[1].load_state_dict(copy.deepcopy(old))
    with pytest.raises(ValueError, match="saved with scale_eps=False"):
        stepped(True)[1].load_state_dict(old)


# ---------------------------------------------------------------- evidence: measurement and coordinate check


def test_measured_gradient_and_sqrt_v_exponents_match_the_rule_on_the_mlp():
    """Oracle: EPS_RULE's exponent of each role's parameters (-1 on the MLP); measured slope of
    log2 RMS against log2 width over 16x width at the last of 4 steps, within 0.15."""
    frame = gradient_scales.record_gradient_scales("mlp", widths=(64, 256, 1024), steps=4, seeds=(0,))
    summary = gradient_scales.summarize_exponents(gradient_scales.fit_exponents(frame))
    assert set(summary["role"]) == {"input", "hidden", "readout"}
    for row in summary.itertuples():
        assert row.rule == "-1", row
        assert abs(row.grad + 1) < 0.15 and abs(row.sqrt_v + 1) < 0.15, summary.to_string()


class TwoWidths(torch.nn.Module):
    """x -> first (a x d) -> ReLU -> second (b x a) -> ReLU -> MuReadout(b): second's fan-in and
    fan-out widths vary independently."""

    def __init__(self, a: int, b: int, d: int = 16, d_out: int = 10) -> None:
        super().__init__()
        self.first = torch.nn.Linear(d, a, bias=False)
        self.second = torch.nn.Linear(a, b, bias=False)
        self.readout = mup.MuReadout(b, d_out, bias=False, readout_zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.relu(self.second(torch.relu(self.first(x)))))


def second_layer_gradient_rms(a: int, b: int, steps: int = 6) -> float:
    """RMS of the second layer's gradient at the last of ``steps`` AdamW-SF steps (base widths 32)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=generator)
    y = (x @ torch.randn(16, 10, generator=generator)).argmax(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mup.set_base_shapes(TwoWidths(a, b), TwoWidths(32, 32), delta=TwoWidths(64, 64))
    optimizer = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=LR)
    optimizer.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rms = float(model.second.weight.grad.square().mean().sqrt())
        optimizer.step()
    return rms


def test_a_matrix_gradient_shrinks_with_its_fan_out_not_its_fan_in():
    """Oracle: the derivation's step 2 (g_ij = dL/dh_out_i * h_in_j, dL/dh_out = Theta(1/fan-out)),
    measured: over 16x of the second layer's fan-out its gradient RMS falls with slope -1 (within
    0.2), over 16x of its fan-in it stays (|slope| < 0.2). So the eps key of a matrix-like
    parameter is its fan-out multiplier, not mup's width_mult (its fan-in's)."""
    widths = np.array([32, 128, 512])
    fan_out = [second_layer_gradient_rms(32, b) for b in widths]
    fan_in = [second_layer_gradient_rms(a, 32) for a in widths]
    assert abs(np.polyfit(np.log2(widths), np.log2(fan_out), 1)[0] + 1) < 0.2, fan_out
    assert abs(np.polyfit(np.log2(widths), np.log2(fan_in), 1)[0]) < 0.2, fan_in


@pytest.mark.parametrize("model, widths, seeds", [
    ("mlp", (64, 128, 256, 512, 1024), (0, 1)),  # 16x
    ("transformer", (32, 64, 128, 256), (0,)),    # 8x
])
def test_fixed_large_eps_shrinks_updates_with_width_and_scaled_eps_passes(model, widths, seeds):
    """Oracle: the verdict and the symmetric bound (module docstring), base eps 1e-3 (about a
    tenth of sqrt(v) at the MLP's base width). Fixed eps: the readout (and on the MLP the hidden
    layers) shrink with width, slope below -0.25. scale_eps=True: the verdict passes and nothing
    shrinks past the bound."""
    frame = gradient_scales.eps_coord_check(model, eps=EPS, widths=widths, steps=4, seeds=seeds)
    verdict = judge(frame)
    shrunk = gradient_scales.shrinking(verdict)
    fixed = shrunk[shrunk["parametrization"] == "eps fixed"]
    assert "readout" in set(fixed["module"]), verdict.format()
    if model == "mlp":
        assert {"hidden.0", "hidden.1"} <= set(fixed["module"]), verdict.format()
    assert verdict.passed("eps scaled"), verdict.format()
    assert shrunk[shrunk["parametrization"] == "eps scaled"].empty, verdict.format()


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("argv, flag", [
    (["--widths", "64"], "--widths"),
    (["--widths", "64", "x"], "--widths"),
    (["--steps", "1"], "--steps"),
    (["check", "--eps", "-1"], "--eps"),
    (["transfer", "--lrs", "0.01", "0.02"], "--lrs"),
    (["--model", "cnn"], "--model"),
    (["--model", "transformer", "--widths", "30", "60"], "--widths"),
    (["--device", "meta"], "--device"),
])
def test_command_line_errors_are_one_line_naming_the_flag(argv, flag, capsys, tmp_path):
    """Oracle: exit status 2 and one ``prog: error: argument FLAG ...`` line, before any compute."""
    with pytest.raises(SystemExit) as exit_info:
        gradient_scales.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(gradient_scales.PROG) and flag in err, err


def test_command_line_refuses_an_out_that_is_a_file(capsys, tmp_path):
    """Oracle: an --out that is an existing file is named before any compute."""
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        gradient_scales.main(["--out", str(target)])
    assert exit_info.value.code == 2
    assert "argument --out: not a folder" in capsys.readouterr().err


def test_with_a_large_eps_the_lr_tuned_at_width_64_transfers_to_1024_only_when_eps_is_scaled():
    # Measured once (MLP, 40 steps, seed 0, eps 1e-3): at width 1024 and the lr best at width 64,
    # held-out loss 2.800 with eps fixed against 2.692 with eps scaled. Without the eps rule both
    # ways are the same optimizer and the gap is exactly 0.
    from coord_checks.gradient_scales import eps_transfer, transfer_report

    sweep = eps_transfer("mlp", eps=1e-3, widths=(64, 1024), lrs=[0.0025, 0.005, 0.01, 0.02, 0.04], steps=40)
    _, drift = transfer_report(sweep)
    transferred = drift.set_index("parametrization")["transferred_loss"]
    assert transferred["eps fixed"] - transferred["eps scaled"] > 0.05
