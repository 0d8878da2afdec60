"""ScheduleFree+ (``AdamCScheduleFreePlusPaper`` and the lean ``AdamCScheduleFreePlus``).

Oracle: upstream schedule_free HEAD's ``AdamCScheduleFreePlusPaper`` (``../shared/oracles``, loaded
as in tests/test_parity_head.py; those tests skip, saying so, without it), driven with the same
batches on an identically initialised copy of the tiny MLP, each optimizer on its own gradients.
Three groups: [W1, b1] at lr, [W2] at lr / 3 with its own weight decay, [b2] at 2 lr with its own
c_warmup; b2 gets no gradient for steps 25-34 (annealing is under way then, so the lean form must
recover x with the beta that built each parameter's y); eval()/train() at steps 20, 40, 60.

Tolerance: 1e-5 relative to each tensor's largest entry, at y after every step and at x after every
eval(), and 1e-5 relative for the logged scalars (1e-5 absolute for f + ip, which can nearly cancel).
Measured over the 60 steps: parameters 4.6e-7 (first config) and 1.5e-6 (second), logged scalars
6.4e-7, f + ip 9e-7 absolute. Float rounding is all that separates the forms: the Polyak sums are
accumulated in float64 here, in float32 upstream, and the lean form recovers x by extrapolation.
Each rule taken out in turn (the annealing, c_warmup, the lr floor, the lr^2 decay, the inner-product
term, the bias-corrected EMA carried between steps, the lean form's per-parameter beta) fails them.
"""
from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import tiny_batches, tiny_mlp
from optim_infos import assert_bitwise_equal, assert_rel_close, snapshot
from test_parity_head import head

import mup_schedulefree as ours
from mup_schedulefree.schedule import annealed_momentum, averaging_weight_c_warmup
from mup_schedulefree.scaling import infer_rule

FORMS = (ours.AdamCScheduleFreePlusPaper, ours.AdamCScheduleFreePlus)
RTOL = 1e-5
SWITCH_AT = (20, 40, 60)
FROZEN = range(25, 35)  # steps at which b2 has no gradient
CONFIGS = (
    dict(lr=0.5, weight_decay=5.0, c_warmup=5, sf_beta1_anneal_steps=30, polyak_beta=0.9, r=1.0),
    dict(lr=1.0, betas=(0.8, 0.99), sf_beta1=0.8, sf_beta1_max=0.95, eps=1e-6, polyak_beta=0.5,
         sf_beta1_anneal_steps=40, weight_lr_power=1.0, c_warmup=3),
)
LOGGED = ("scheduled_lr", "grad_l1_ema", "grad_l1_ema_corr", "lr_max", "weight_sum")


def groups(model: torch.nn.Module, config: dict, weights: tuple[float, ...] | None = None) -> list[dict]:
    """The three-group layout of the module docstring; ``weights``: each group's polyak_weight."""
    w1, b1, w2, b2 = model.parameters()
    lr = config.get("lr", 1.0)
    layout = [{"params": [w1, b1]}, {"params": [w2], "lr": lr / 3, "weight_decay": 1.0},
              {"params": [b2], "lr": 2 * lr, "c_warmup": 7}]
    if weights is not None:
        for group, weight in zip(layout, weights):
            group["polyak_weight"] = weight
    return layout


def backward(model: torch.nn.Module, opt: torch.optim.Optimizer, batch, step: int) -> torch.Tensor:
    """Zero the gradients, compute the loss and its gradients; b2's is dropped at the FROZEN steps."""
    opt.zero_grad(set_to_none=True)
    inputs, targets = batch
    loss = F.mse_loss(model(inputs), targets)
    loss.backward()
    if step in FROZEN:
        model[2].bias.grad = None
    return loss


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1234) -> None:
    for step, batch in enumerate(tiny_batches(steps, seed), start=1):
        opt.step_func(backward(model, opt, batch, step).item())


# ----------------------------------------------------------------------------- upstream HEAD
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_arguments_are_upstream_heads_names_order_and_defaults(form):
    theirs = list(inspect.signature(head().AdamCScheduleFreePlusPaper.__init__).parameters.values())
    mine = list(inspect.signature(form.__init__).parameters.values())
    assert [(p.name, p.default) for p in mine] == [(p.name, p.default) for p in theirs]


@pytest.mark.parametrize("config", CONFIGS, ids=("anneal-decay-cwarmup", "betas-eps-power"))
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_trajectory_and_logged_values_match_upstream_head(form, config):
    """60 steps, 3 groups, AdamC decay, c_warmup, sf_beta1 annealing, polyak_beta > 0, a frozen
    stretch, eval()/train() switches: y after every step, x at every switch, the logged scalars."""
    model_ours, model_head = tiny_mlp(0), tiny_mlp(0)
    mine = form(groups(model_ours, config), **config)
    theirs = head().AdamCScheduleFreePlusPaper(groups(model_head, config), **config)
    theirs.train()  # upstream starts in eval mode
    for step, batch in enumerate(tiny_batches(60), start=1):
        mine.step_func(backward(model_ours, mine, batch, step).item())
        theirs.step_func(backward(model_head, theirs, batch, step).item())
        where = f"{form.__name__} {config}, step {step}"
        assert_rel_close(snapshot(model_ours.parameters()), snapshot(model_head.parameters()), RTOL, f"y ({where})")
        for index, (a, b) in enumerate(zip(mine.param_groups, theirs.param_groups)):
            for key in LOGGED:
                assert a[key] == pytest.approx(b[key], rel=RTOL), f"{key} of group {index} ({where})"
            assert a["function_value_ema"] == pytest.approx(b["function_value_ema"], rel=RTOL, abs=RTOL)
            assert a["k"] == b["k"]
        if step in SWITCH_AT:
            mine.eval()
            theirs.eval()
            assert_rel_close(snapshot(model_ours.parameters()), snapshot(model_head.parameters()), RTOL,
                             f"x ({where})")
            mine.train()
            theirs.train()


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_logged_scalars_read_zero_before_a_groups_first_step(form):
    """Upstream HEAD writes them in the step only, so reading one first raised KeyError; ours start at 0.0."""
    model = tiny_mlp(0)
    opt = form(list(model[0].parameters()), lr=1.0)
    opt.add_param_group({"params": list(model[2].parameters())})
    keys = ("polyak_lr", "ip_term", "function_value_ema", "grad_l1_ema", "grad_l1_ema_corr", "scheduled_lr")
    for group in opt.param_groups:
        assert {key: group[key] for key in keys} == dict.fromkeys(keys, 0.0)


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_an_lr_of_zero_is_floored_at_eps_as_upstream(form):
    """Upstream steps with max(lr, eps): a group at lr = 0 still moves, by eps * polyak_lr."""
    config = dict(eps=1e-3, weight_decay=1.0)
    model_ours, model_head = tiny_mlp(0), tiny_mlp(0)
    layout = lambda model: [{"params": list(model.parameters())[:2], "lr": 0.0},
                            {"params": list(model.parameters())[2:]}]
    mine = form(layout(model_ours), **config)
    theirs = head().AdamCScheduleFreePlusPaper(layout(model_head), **config)
    theirs.train()
    start = snapshot(model_ours.parameters())
    for step, batch in enumerate(tiny_batches(20), start=1):
        mine.step_func(backward(model_ours, mine, batch, 0).item())
        theirs.step_func(backward(model_head, theirs, batch, 0).item())
        assert_rel_close(snapshot(model_ours.parameters()), snapshot(model_head.parameters()), RTOL, f"step {step}")
    assert not torch.equal(model_ours[0].weight, start[0])


def test_paper_form_state_dicts_load_across_upstream_and_ours():
    """Upstream's state dict continues in ours and ours in upstream's, within 1e-5 over 10 steps."""
    config = CONFIGS[0]
    for saver, loader in ((head().AdamCScheduleFreePlusPaper, ours.AdamCScheduleFreePlusPaper),
                          (ours.AdamCScheduleFreePlusPaper, head().AdamCScheduleFreePlusPaper)):
        model_saver, model_loader = tiny_mlp(0), tiny_mlp(1)
        first = saver(groups(model_saver, config), **config)
        first.train()
        train(model_saver, first, 12)
        model_loader.load_state_dict(model_saver.state_dict())
        second = loader(groups(model_loader, config), **config)
        second.load_state_dict(copy.deepcopy(first.state_dict()))
        train(model_saver, first, 10, seed=5)
        train(model_loader, second, 10, seed=5)
        assert_rel_close(snapshot(model_loader.parameters()), snapshot(model_saver.parameters()), RTOL,
                         f"{saver.__module__} -> {loader.__module__}")


# ----------------------------------------------------------------------------- lean vs paper
def test_lean_form_matches_paper_form_over_100_steps():
    """Both configs, 100 steps each, with the frozen stretch and switches: within 1e-5 at y and x,
    though the lean form keeps only z and the moments."""
    for config in CONFIGS:
        model_paper, model_lean = tiny_mlp(0), tiny_mlp(0)
        paper = ours.AdamCScheduleFreePlusPaper(groups(model_paper, config), **config)
        lean = ours.AdamCScheduleFreePlus(groups(model_lean, config), **config)
        for step, batch in enumerate(tiny_batches(100), start=1):
            for model, opt in ((model_paper, paper), (model_lean, lean)):
                opt.step_func(backward(model, opt, batch, step).item())
            assert_rel_close(snapshot(model_lean.parameters()), snapshot(model_paper.parameters()), RTOL,
                             f"y at step {step}")
            if step % 25 == 0:
                paper.eval()
                lean.eval()
                assert_rel_close(snapshot(model_lean.parameters()), snapshot(model_paper.parameters()), RTOL,
                                 f"x at step {step}")
                paper.train()
                lean.train()


def test_lean_form_stores_z_and_the_moments_only():
    model_paper, model_lean = tiny_mlp(0), tiny_mlp(0)
    paper, lean = ours.AdamCScheduleFreePlusPaper(model_paper.parameters()), ours.AdamCScheduleFreePlus(
        model_lean.parameters())
    train(model_paper, paper, 3)
    train(model_lean, lean, 3)
    for p in model_lean.parameters():
        tensors = {key for key, value in lean.state[p].items() if isinstance(value, torch.Tensor)}
        assert tensors == {"z", "exp_avg", "exp_avg_sq"}
    for p in model_paper.parameters():
        assert set(paper.state[p]) == {"x", "y", "z", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_points_at_x_are_what_eval_writes_and_train_returns_to_y(form):
    model = tiny_mlp(0)
    opt = form(groups(model, CONFIGS[0]), **CONFIGS[0])
    train(model, opt, 12)
    at_y = snapshot(model.parameters())
    points = opt.points_at_x()
    opt.eval()
    assert not opt.train_mode
    for p in model.parameters():
        assert torch.equal(points[p], p)
    opt.train()
    assert_rel_close(snapshot(model.parameters()), at_y, 1e-6, "y after eval(), train()")


# ----------------------------------------------------------------------------- polyak_weight
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_polyak_weights_of_one_equal_no_weights_bit_for_bit(form):
    model_plain, model_weighted = tiny_mlp(0), tiny_mlp(0)
    plain = form(groups(model_plain, CONFIGS[0]), **CONFIGS[0])
    weighted = form(groups(model_weighted, CONFIGS[0], weights=(1.0, 1.0, 1.0)), **CONFIGS[0])
    train(model_plain, plain, 20)
    train(model_weighted, weighted, 20)
    for a, b in zip(model_plain.parameters(), model_weighted.parameters()):
        assert torch.equal(a, b)
    assert_bitwise_equal(weighted.state_dict()["state"], plain.state_dict()["state"])
    for a, b in zip(plain.param_groups, weighted.param_groups):
        assert {k: v for k, v in b.items() if k not in ("params", "polyak_weight")} == \
            {k: v for k, v in a.items() if k != "params"}


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_polyak_weights_scale_each_groups_l1_norm_in_the_denominator(form):
    """Three steps worked by hand: D = sqrt(pi/2) * sum_G w_G |g_G|_1, polyak_lr = max(0, f + ip) / D
    with ip = beta * <g, z - x> (0 until x and z part, at the third step), and every group's lr is its
    lr * polyak_lr."""
    weights = (1.0, 4.0, 0.25)
    config = dict(lr=0.5, sf_beta1=0.9)
    model = tiny_mlp(0)
    opt = form(groups(model, config, weights), **config)
    for step, batch in enumerate(tiny_batches(3), start=1):
        inputs, targets = batch
        opt.zero_grad()
        loss = F.mse_loss(model(inputs), targets)
        loss.backward()
        l1 = [sum(p.grad.abs().sum().item() for p in group["params"]) for group in opt.param_groups]
        denominator = math.sqrt(math.pi / 2) * sum(w * n for w, n in zip(weights, l1))
        assert denominator != pytest.approx(math.sqrt(math.pi / 2) * sum(l1), rel=1e-3)  # the weights matter
        ip = 0.0
        if step == 3:
            at_x = opt.points_at_x()
            ip = 0.9 * sum((p.grad.double() * (opt.state[p]["z"].double() - at_x[p].double())).sum().item()
                           for p in model.parameters())
            assert abs(ip) > 1e-6
        opt.step_func(loss.item())
        expected = max(0.0, loss.item() + ip) / denominator
        for group in opt.param_groups:
            assert group["grad_l1_ema_corr"] == pytest.approx(denominator, rel=1e-6)
            assert group["function_value_ema"] == pytest.approx(loss.item() + ip, rel=1e-6)
            assert group["polyak_lr"] == pytest.approx(expected, rel=1e-6)
            assert group["scheduled_lr"] == pytest.approx(group["lr"] * expected, rel=1e-6)


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_all_zero_gradients_give_a_zero_step_size_not_a_division_by_zero(form):
    model = tiny_mlp(0)
    opt = form(model.parameters(), weight_decay=1.0)
    train(model, opt, 3)
    z_before = [opt.state[p]["z"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step_func(1.0)
    assert opt.param_groups[0]["polyak_lr"] == 0.0 and opt.param_groups[0]["k"] == 4
    for p, z in zip(model.parameters(), z_before):  # z stays; x keeps averaging it in, y follows
        assert torch.equal(opt.state[p]["z"], z) and torch.isfinite(p).all()


# ----------------------------------------------------------------------------- step interface
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_step_with_a_closure_or_a_value_equals_step_func(form):
    """step(closure) (called under no_grad: the closure still gets gradients) and
    step(function_value=<tensor>) take the same steps as step_func(loss.item())."""
    models = [tiny_mlp(0) for _ in range(3)]
    opts = [form(groups(model, CONFIGS[0]), **CONFIGS[0]) for model in models]
    for batch in tiny_batches(10):
        inputs, targets = batch

        def closure():
            opts[0].zero_grad()
            loss = F.mse_loss(models[0](inputs), targets)
            loss.backward()
            return loss

        with torch.no_grad():
            returned = opts[0].step(closure)
        assert isinstance(returned, torch.Tensor) and returned.requires_grad
        for model, opt, how in zip(models[1:], opts[1:], ("value", "func")):
            opt.zero_grad()
            loss = F.mse_loss(model(inputs), targets)
            loss.backward()
            if how == "value":
                assert opt.step(function_value=loss) is loss
            else:
                assert opt.step_func(loss.item()) == loss.item()
    for model in models[1:]:
        for a, b in zip(models[0].parameters(), model.parameters()):
            assert torch.equal(a, b)


def _stepped(form):
    model = tiny_mlp(0)
    opt = form(groups(model, CONFIGS[0]), **CONFIGS[0])
    train(model, opt, 3)
    inputs, targets = tiny_batches(1, seed=7)[0]
    opt.zero_grad()
    F.mse_loss(model(inputs), targets).backward()
    return model, opt


@pytest.mark.parametrize("call, error, match", [
    (lambda opt: opt.step(), ValueError, "Invalid function_value: None"),
    (lambda opt: opt.step_func(), ValueError, "Invalid function_value: None"),
    (lambda opt: opt.step(lambda: 1.0, function_value=1.0), ValueError, "function_value.*not both"),
    (lambda opt: opt.step(function_value=float("nan")), ValueError, "Invalid function_value: nan"),
    (lambda opt: opt.step_func(float("inf")), ValueError, "Invalid function_value: inf"),
    (lambda opt: opt.step_func("0.5"), TypeError, "Invalid function_value: '0.5'"),
    (lambda opt: opt.step(lambda: None), ValueError, "Invalid function_value: None"),
])
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_a_step_without_a_usable_loss_raises_naming_function_value_and_changes_nothing(form, call, error, match):
    model, opt = _stepped(form)
    before, params = copy.deepcopy(opt.state_dict()), snapshot(model.parameters())
    with pytest.raises(error, match=match):
        call(opt)
    assert_bitwise_equal(opt.state_dict(), before)
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_a_step_after_an_invalid_group_edit_or_in_eval_mode_raises_and_changes_nothing(form):
    model, opt = _stepped(form)
    before, params = copy.deepcopy(opt.state_dict()), snapshot(model.parameters())
    opt.param_groups[2]["polyak_weight"] = -1.0
    with pytest.raises(ValueError, match=r"Invalid polyak_weight: -1.0 .* in param_groups\[2\]"):
        opt.step_func(1.0)
    del opt.param_groups[2]["polyak_weight"]
    model[0].weight.grad = model[0].weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step_func(1.0)
    assert_bitwise_equal(opt.state_dict(), before)
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)
    opt.eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step(function_value=1.0)


# ----------------------------------------------------------------------------- hyperparameters
INVALID = [
    (dict(lr=-1.0), "lr", ValueError),
    (dict(lr="1"), "lr", TypeError),
    (dict(betas=(1.0, 0.95)), "betas[0]", ValueError),
    (dict(betas=(0.9, -0.5)), "betas[1]", ValueError),
    (dict(betas=0.9), "betas", ValueError),
    (dict(sf_beta1=0.0), "sf_beta1", ValueError),
    (dict(sf_beta1=1.0), "sf_beta1", ValueError),
    (dict(eps=-1e-8), "eps", ValueError),
    (dict(weight_decay=-1.0), "weight_decay", ValueError),
    (dict(weight_decay=None), "weight_decay", TypeError),
    (dict(r=-1.0), "r", ValueError),
    (dict(polyak_beta=1.0), "polyak_beta", ValueError),
    (dict(polyak_beta=-0.1), "polyak_beta", ValueError),
    (dict(c_warmup=-1), "c_warmup", ValueError),
    (dict(c_warmup=2.0), "c_warmup", TypeError),
    (dict(sf_beta1_anneal_steps=True), "sf_beta1_anneal_steps", TypeError),
    (dict(sf_beta1_anneal_steps=-5), "sf_beta1_anneal_steps", ValueError),
    (dict(sf_beta1_max=1.0), "sf_beta1_max", ValueError),
    (dict(weight_lr_power=-2.0), "weight_lr_power", ValueError),
]


@pytest.mark.parametrize("kwargs, name, error", INVALID, ids=[name + "-" + str(list(kw.values())[0])
                                                              for kw, name, _ in INVALID])
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_invalid_hyperparameters_raise_naming_the_argument(form, kwargs, name, error):
    model = tiny_mlp(0)
    with pytest.raises(error, match=r"^Invalid " + name.replace("[", r"\[").replace("]", r"\]") + ": "):
        form(model.parameters(), **kwargs)
    opt = form(list(model.parameters())[:2])
    with pytest.raises(error, match=r"^Invalid " + name.replace("[", r"\[").replace("]", r"\]") + ": "):
        opt.add_param_group({"params": list(model.parameters())[2:], **kwargs})
    assert len(opt.param_groups) == 1


def test_a_negative_polyak_weight_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"^Invalid polyak_weight: -0.5 "):
        ours.AdamCScheduleFreePlus([{"params": list(tiny_mlp(0).parameters()), "polyak_weight": -0.5}])


def test_both_forms_declare_the_adam_rule_and_decay_coupled_to_lr_squared():
    for form in FORMS:
        assert form.decay_lr_power == 2
        assert infer_rule(form) == "adam"


# ----------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_state_dict_round_trip_continues_the_run_in_a_fresh_optimizer(form):
    """Save after 15 steps (during the annealing), load into a new optimizer on a copy of the model,
    and 15 more steps on each are bitwise identical; the saved mode comes back."""
    config = CONFIGS[0]
    model = tiny_mlp(0)
    opt = form(groups(model, config, weights=(1.0, 2.0, 0.5)), **config)
    train(model, opt, 15)
    saved, model_copy = copy.deepcopy(opt.state_dict()), copy.deepcopy(model)
    fresh = form(groups(model_copy, config, weights=(1.0, 2.0, 0.5)), **config)
    fresh.load_state_dict(saved)
    assert_bitwise_equal(fresh.state_dict(), opt.state_dict())
    train(model, opt, 15, seed=99)
    train(model_copy, fresh, 15, seed=99)
    for a, b in zip(model.parameters(), model_copy.parameters()):
        assert torch.equal(a, b)
    assert_bitwise_equal(fresh.state_dict(), opt.state_dict())
    opt.eval()
    fresh.load_state_dict(opt.state_dict())
    assert not fresh.train_mode


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_load_state_dict_refuses_another_models_state_and_invalid_groups(form):
    model = tiny_mlp(0)
    opt = form(model.parameters())
    train(model, opt, 2)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    other = form(wider.parameters())
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict(opt.state_dict())
    saved = opt.state_dict()
    saved["param_groups"][0]["sf_beta1"] = 1.5
    with pytest.raises(ValueError, match=r"Invalid state_dict: Invalid sf_beta1: 1.5"):
        form(tiny_mlp(0).parameters()).load_state_dict(saved)


# ----------------------------------------------------------------------------- schedules
def test_annealed_momentum_is_geometric_in_one_minus_beta():
    assert annealed_momentum(0, 0.9, 0.99, 0) == 0.9
    assert annealed_momentum(50, 0.9, 0.99, 0) == 0.9
    assert annealed_momentum(0, 0.9, 0.99, 10) == pytest.approx(0.9, abs=1e-15)
    assert 1 - annealed_momentum(5, 0.9, 0.99, 10) == pytest.approx(math.sqrt(0.1 * 0.01), rel=1e-12)
    assert annealed_momentum(10, 0.9, 0.99, 10) == pytest.approx(0.99, abs=1e-15)
    assert annealed_momentum(30, 0.9, 0.99, 10) == annealed_momentum(10, 0.9, 0.99, 10)


def test_c_warmup_sets_ckp1_to_one_and_adds_no_weight_while_lr_max_tracks():
    warm = averaging_weight_c_warmup(2, 0.5, 0.25, 0.0, 1.0, 2.0, c_warmup=3)
    assert warm == (1.0, 0.5, 0.0)
    after = averaging_weight_c_warmup(3, 0.1, 0.5, 0.0, 1.0, 2.0, c_warmup=3)
    assert after.ckp1 == 1.0 and after.weight_sum == pytest.approx(4 * 0.25) and after.lr_max == 0.5
    later = averaging_weight_c_warmup(4, 0.1, 0.5, after.weight_sum, 1.0, 2.0, c_warmup=3)
    assert later.ckp1 == pytest.approx(5 / 9)


# ----------------------------------------------------------------------------- distributed
@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process (torn down after)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_sharded_gradients_are_reduced_in_one_all_reduce_and_plain_ones_not(form, one_rank_group, monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.clone())
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting_all_reduce)
    gen = torch.Generator().manual_seed(3)
    start, grads = torch.randn(4, 3, generator=gen), [torch.randn(4, 3, generator=gen) for _ in range(4)]
    plain = torch.nn.Parameter(start.clone())
    sharded = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
    opt_plain, opt_sharded = form([plain], polyak_beta=0.5), form([sharded], polyak_beta=0.5)
    for grad in grads:
        plain.grad = grad.clone()
        opt_plain.step_func(1.0)
    assert calls == []
    for grad in grads:
        sharded.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
        opt_sharded.step_func(1.0)
    assert len(calls) == len(grads)
    assert torch.allclose(sharded.full_tensor(), plain, rtol=1e-6, atol=1e-7)
    assert calls[-1][2].item() == 1.0  # the loss travels with the sums
