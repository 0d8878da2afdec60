"""A step that cannot complete changes nothing, and says which parameter is at fault.

Every claim is checked on every optimizer form that owns its step (the wrapper's base owns its
own gradients' handling): the optimizer's ``state_dict`` and the parameters after the failed
step are bitwise those before it, so a retry follows the same schedule.
"""
from __future__ import annotations

import copy

import pytest
import torch

from optim_infos import INFOS, assert_bitwise_equal, param_groups, run, snapshot, train_step

OWN_STEP = [info for info in INFOS if not info.name.startswith("ScheduleFreeWrapper") and not info.composed]
# A composition's groups and load order are its parts' (see OptimInfo.composed): the claims below
# name the suite's three-group layout, so they run on single optimizers.
SINGLE = [info for info in INFOS if not info.composed]
CLOSURE_FORMS = [info for info in INFOS if info.closure_form]


def _trained(info, make_model, make_batches, steps: int = 5):
    config = info.configs[0]
    model = make_model(0)
    opt = info.make(param_groups(info, list(model.parameters()), config), config)
    run(info, opt, model, make_batches(steps))
    return model, opt


def _step_with_sparse_gradient_on_the_last_parameter(info, opt, model, batch) -> None:
    last = list(model.parameters())[-1]

    def sparsify() -> None:
        last.grad = last.grad.to_sparse()

    train_step(info, opt, model, batch, after_backward=sparsify)


@pytest.mark.parametrize("info", OWN_STEP, ids=str)
def test_sparse_gradient_raises_naming_the_parameter_and_changes_nothing(info, make_model, make_batches):
    """The sparse gradient sits in the last group, so every earlier group would have stepped."""
    model, opt = _trained(info, make_model, make_batches)
    before_state, before_params = copy.deepcopy(opt.state_dict()), snapshot(model.parameters())
    with pytest.raises(RuntimeError, match=rf"{type(opt).__name__} does not support sparse gradients "
                                           r"\(parameter 0 of its group \(shape \(3,\)\)"):
        _step_with_sparse_gradient_on_the_last_parameter(info, opt, model, make_batches(1, seed=7)[0])
    assert_bitwise_equal(opt.state_dict(), before_state)
    for after, before in zip(model.parameters(), before_params):
        if info.closure_form:  # back from y, where the closure ran: float rounding of the round trip
            torch.testing.assert_close(after, before, rtol=0, atol=1e-6 * before.abs().max().item())
        else:
            assert torch.equal(after, before)


@pytest.mark.parametrize("info", [i for i in OWN_STEP if not i.closure_form], ids=str)
def test_a_retry_after_a_failed_step_follows_the_uninterrupted_schedule(info, make_model, make_batches):
    """Oracle: the same run without the failed step; both must be bitwise equal afterwards."""
    batches = make_batches(3, seed=9)
    model_a, opt_a = _trained(info, make_model, make_batches)
    model_b, opt_b = _trained(info, make_model, make_batches)
    with pytest.raises(RuntimeError):
        _step_with_sparse_gradient_on_the_last_parameter(info, opt_b, model_b, batches[0])
    for batch in batches:
        train_step(info, opt_a, model_a, batch)
        train_step(info, opt_b, model_b, batch)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert_bitwise_equal(opt_b.state_dict(), opt_a.state_dict())


@pytest.mark.parametrize("info", OWN_STEP, ids=str)
def test_state_of_another_shape_fails_before_the_update_naming_the_parameter(info, make_model, make_batches):
    """A state tensor that no longer fits its parameter (a state dict of another width) raises
    a ValueError at the step, before any group has moved."""
    model, opt = _trained(info, make_model, make_batches)
    last = list(model.parameters())[-1]
    opt.state[last]["z"] = torch.zeros(5)
    before_params = snapshot(model.parameters())
    before_k = [group["k"] for group in opt.param_groups]
    with pytest.raises(ValueError, match=r"optimizer state of parameter 0 of its group \(shape \(3,\)\) has shape \(5,\)"):
        train_step(info, opt, model, make_batches(1, seed=7)[0])
    assert [group["k"] for group in opt.param_groups] == before_k
    for after, before in zip(model.parameters(), before_params):
        assert torch.equal(after, before)


@pytest.mark.parametrize("info", CLOSURE_FORMS, ids=str)
def test_closure_that_raises_leaves_the_parameters_at_x(info, make_model, make_batches):
    """Parameters are moved to y for the closure; if it raises they come back to x. The round trip
    y -> x costs at most float rounding: 1e-6 relative to each tensor's largest entry."""
    model, opt = _trained(info, make_model, make_batches, steps=12)  # past RAdam's silent phase, y != x
    x_before = snapshot(model.parameters())
    before_k = [group["k"] for group in opt.param_groups]

    def failing_closure():
        raise KeyError("data loader ran dry")

    with pytest.raises(KeyError, match="data loader ran dry"):
        opt.step(failing_closure)
    assert [group["k"] for group in opt.param_groups] == before_k
    for after, before in zip(model.parameters(), x_before):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6 * before.abs().max().item())


# torch's Adam (the wrappers' base) and torch's Muon (the Muon part) keep their own state in the old
# dtype and fail on their own: not our state.
TORCH_KEEPS_STATE = {"ScheduleFreeWrapper-Adam", "ScheduleFreeWrapperReference-Adam", "MuMuon_ScheduleFree"}


@pytest.mark.parametrize("info", [i for i in INFOS if i.name not in TORCH_KEEPS_STATE], ids=str)
def test_a_model_moved_to_float64_after_loading_state_keeps_training(info, make_model, make_batches):
    """``model.to(torch.float64)`` after ``load_state_dict``: train()/eval() and step() convert the
    state to the parameters' dtype instead of failing on mismatched tensors."""
    model, opt = _trained(info, make_model, make_batches)
    config = info.configs[0]
    fresh_model = copy.deepcopy(model)
    fresh = info.make(param_groups(info, list(fresh_model.parameters()), config), config)
    fresh.load_state_dict(opt.state_dict())
    fresh_model.to(torch.float64)
    batch = tuple(t.double() for t in make_batches(1, seed=3)[0])
    train_step(info, fresh, fresh_model, batch)
    if info.has_modes:
        fresh.eval()
        fresh.train()
    z_dtypes = {fresh.state[p]["z"].dtype for p in fresh_model.parameters()}
    assert z_dtypes == {torch.float64}


def _wider_model(seed: int = 0) -> torch.nn.Module:
    """The tiny MLP's layout at hidden width 7 instead of 6 (another muP width)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


@pytest.mark.parametrize("info", SINGLE, ids=str)
def test_state_dict_of_another_width_is_refused_at_load_naming_the_parameter(info, make_model, make_batches):
    """Loading raises ValueError naming the first parameter whose saved state has another shape,
    and the optimizer's own state is untouched (torch would attach the tensors and fail later)."""
    config = info.configs[0]
    wide = _wider_model()
    wide_opt = info.make(param_groups(info, list(wide.parameters()), config), config)
    run(info, wide_opt, wide, make_batches(3))
    model, opt = _trained(info, make_model, make_batches)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"'[xz]' for parameter 0 of its group \(shape \(6, 4\)\) has shape \(7, 4\)"):
        opt.load_state_dict(wide_opt.state_dict())
    assert_bitwise_equal(opt.state_dict(), before)


@pytest.mark.parametrize("info", INFOS, ids=str)
@pytest.mark.parametrize("bad", [None, {"foo": 1}, {"state": {}}], ids=repr)
def test_something_that_is_not_a_state_dict_is_refused_naming_the_argument(info, bad, make_model):
    model = make_model(0)
    opt = info.make(param_groups(info, list(model.parameters()), info.configs[0]), info.configs[0])
    with pytest.raises(ValueError, match="Invalid state_dict"):
        opt.load_state_dict(bad)


BAD_GROUP_VALUES = [("lr", None, TypeError), ("lr", float("nan"), ValueError), ("weight_decay", "0.1", TypeError)]


@pytest.mark.parametrize("info", SINGLE, ids=str)
@pytest.mark.parametrize("key, value, error", BAD_GROUP_VALUES, ids=lambda v: repr(v))
def test_a_group_edited_to_an_invalid_value_fails_the_step_before_any_group_moves(info, key, value, error,
                                                                                  make_model, make_batches):
    """The last group is edited between steps (as a scheduler or user code may); the step raises,
    naming the value and the group, and the optimizer and parameters are exactly as before (the
    first groups would otherwise have stepped already)."""
    model, opt = _trained(info, make_model, make_batches)
    group = opt.param_groups[-1]
    if key == "weight_decay":
        key = info.decay_key  # the wrapper's own decay is weight_decay_at_y; its base checks its own
    before_state, before_params = copy.deepcopy(opt.state_dict()), snapshot(model.parameters())
    group[key] = value
    with pytest.raises(error, match=rf"Invalid {key}: .* in param_groups\[2\]"):
        train_step(info, opt, model, make_batches(1, seed=7)[0])
    group[key] = before_state["param_groups"][-1][key]
    assert_bitwise_equal(opt.state_dict(), before_state)
    for after, before in zip(model.parameters(), before_params):
        if info.closure_form:
            torch.testing.assert_close(after, before, rtol=0, atol=1e-6 * before.abs().max().item())
        else:
            assert torch.equal(after, before)


@pytest.mark.parametrize("info", [i for i in SINGLE if not i.name.startswith("ScheduleFreeWrapper")], ids=str)
def test_a_state_dict_with_an_invalid_group_is_refused_at_load(info, make_model, make_batches):
    model, opt = _trained(info, make_model, make_batches)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][1]["lr"] = None
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError, match=r"Invalid state_dict: Invalid lr: None .* in its param_groups\[1\]"):
        opt.load_state_dict(saved)
    assert_bitwise_equal(opt.state_dict(), before)


@pytest.mark.parametrize("outer", ["ScheduleFreeWrapper", "ScheduleFreeWrapperReference"])
@pytest.mark.parametrize("inner", ["wrapper", "reference", "AdamWScheduleFree", "AdamWScheduleFreeClosure",
                                   "published"])
def test_a_wrapper_refuses_a_base_that_is_already_schedule_free(inner, outer, make_model):
    """Two schedule-free averages stacked: with our wrapper inside, both keep their averaging under
    the same group keys (x ended 100x worse in a probe); with another schedule-free optimizer,
    z would be averaged twice."""
    import schedulefree

    import mup_schedulefree as msf

    params = list(make_model(0).parameters())
    base = {"wrapper": lambda: msf.ScheduleFreeWrapper(torch.optim.SGD(params, lr=0.1)),
            "reference": lambda: msf.ScheduleFreeWrapperReference(torch.optim.SGD(params, lr=0.1)),
            "AdamWScheduleFree": lambda: msf.AdamWScheduleFree(params),
            "AdamWScheduleFreeClosure": lambda: msf.AdamWScheduleFreeClosure(params),
            "published": lambda: schedulefree.AdamWScheduleFree(params)}[inner]()
    with pytest.raises(TypeError, match="base is already schedule-free"):
        getattr(msf, outer)(base)


def test_the_reference_wrapper_refuses_a_base_whose_groups_hold_its_averaging_keys(make_model):
    """The reference wrapper keeps k, lr_max and weight_sum in the shared groups under the published
    names; a base that already uses one of them (D-adaptation keeps a step count ``k``) would have
    it overwritten every step, so construction raises, naming the key, and changes nothing."""
    import mup_schedulefree as msf

    base = torch.optim.SGD([{"params": list(make_model(0).parameters()), "k": 0}], lr=0.1)
    before = copy.deepcopy(base.param_groups[0])
    with pytest.raises(TypeError, match="keeps 'k' in its parameter groups"):
        msf.ScheduleFreeWrapperReference(base)
    assert base.param_groups[0].keys() == before.keys()


@pytest.mark.parametrize("info", OWN_STEP, ids=str)
def test_a_refused_first_step_leaves_a_new_optimizer_exactly_new(info, make_model, make_batches):
    """No empty per-parameter state entries appear from looking for state that does not exist."""
    model = make_model(0)
    opt = info.make(param_groups(info, list(model.parameters()), info.configs[0]), info.configs[0])
    fresh = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        _step_with_sparse_gradient_on_the_last_parameter(info, opt, model, make_batches(1)[0])
    assert_bitwise_equal(opt.state_dict(), fresh)
