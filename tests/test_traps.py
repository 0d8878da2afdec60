"""The traps of the published ``schedulefree`` 1.4.1 package, each fixed here.

Every claim is a *probe*: a function that drives an optimizer through a scenario and returns what it
observed (violations, an exception, a drift). The test of our class asserts the fixed behaviour;
where cheap, a second test runs the same probe on the published counterpart (the records in
``optim_infos`` declare which traps it exhibits) and asserts that it does exhibit the trap, proving
the probe can fail.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Callable

import pytest
import torch
from torch import nn

from optim_infos import (
    ACCEPTS_INVALID,
    DRIFTS_WHEN_FROZEN,
    INFOS,
    MODAL_INFOS,
    MODE_NOT_SAVED,
    NEW_GROUP_WRONG_MODE,
    STARTS_IN_EVAL,
    TOUCHES_GRADLESS,
    WRITES_GRAD,
    WRONG_EVAL_ERROR,
    ErrorInput,
    OptimInfo,
    assert_bitwise_equal,
    assert_same_run,
    loss_of,
    max_rel_err,
    param_groups,
    published_with,
    run,
    same_value,
    skip_if_global_step_size,
    snapshot,
    to_eval,
    to_train,
    train_step,
)

import mup_schedulefree as ours
import schedulefree as published

EPS32 = torch.finfo(torch.float32).eps
Factory = Callable[..., Any]  # factory(groups, config) -> optimizer, ready to train


def _ids(infos):
    return [info.name for info in infos]


def _ours(info: OptimInfo, **flags: Any) -> Factory:
    return lambda groups, config: info.make(groups, config, **flags)


def _theirs(info: OptimInfo, ready: bool = True) -> Factory:
    return lambda groups, config: info.make_published(groups, config, ready=ready)


def _flag_variants(info: OptimInfo) -> list[dict[str, Any]]:
    """Our class with its default flags, and with the eager path forced where it has flags."""
    return [{}, {"fused": False}] if "fused" in info.flags else [{}]


def _groups(info: OptimInfo, params, config, *, published_form: bool = False):
    group_decay = info.published_reads_group_decay or not published_form
    return param_groups(info, list(params), config, group_decay=group_decay)


# ============================================================================ step() and p.grad
def probe_grad_writes(info: OptimInfo, make: Factory, make_model, batches, published_form=False) -> list[str]:
    """Steps over ``batches`` (first config: weight decay on); returns the gradients step() changed."""
    config = info.configs[0]
    model = make_model(0)
    opt = make(_groups(info, model.parameters(), config, published_form=published_form), config)
    written = []
    for i, batch in enumerate(batches):
        saved: dict[str, torch.Tensor] = {}

        def keep() -> None:
            saved.update({name: p.grad.clone() for name, p in model.named_parameters()})

        train_step(info, opt, model, batch, after_backward=keep)
        written += [f"step {i}: {name}.grad" for name, p in model.named_parameters()
                    if not torch.equal(p.grad, saved[name])]
    return written


@pytest.mark.parametrize("info", INFOS, ids=_ids(INFOS))
def test_step_leaves_grad_bitwise_as_backward_wrote_it(info, make_model, make_batches):
    """After every one of 10 steps (weight decay on) each p.grad is bitwise what backward wrote
    (oracle: a clone taken right after backward)."""
    for flags in _flag_variants(info):
        assert probe_grad_writes(info, _ours(info, **flags), make_model, make_batches(10)) == [], flags


@pytest.mark.parametrize("info", published_with(WRITES_GRAD), ids=_ids(published_with(WRITES_GRAD)))
def test_published_step_writes_grad(info, make_model, make_batches):
    """The same probe on schedulefree 1.4.1 finds gradients overwritten (decay added / Adam-normalised)."""
    assert probe_grad_writes(info, _theirs(info), make_model, make_batches(3), published_form=True)


# ============================================================================ parameters without gradients
def probe_ema_teacher(info: OptimInfo, make: Factory, make_model, batches, published_form=False) -> list[str]:
    """A teacher MLP sits in the optimizer but never gets a gradient; after every step the user writes
    teacher <- 0.9 teacher + 0.1 student. Every 4 steps eval()/train(). Returns every point where the
    teacher did not hold exactly the last values written, and whether it got state."""
    config = info.configs[0]
    student, teacher = make_model(0), make_model(1)
    teacher.requires_grad_(False)
    groups = _groups(info, student.parameters(), config, published_form=published_form)
    groups[0]["params"] += list(teacher.parameters())
    opt = make(groups, config)
    violations = []

    def check(when: str) -> None:
        if any(not torch.equal(t, w) for t, w in zip(teacher.parameters(), written)):
            violations.append(when)

    written = snapshot(teacher.parameters())
    for i, batch in enumerate(batches, start=1):
        train_step(info, opt, student, batch)
        check(f"after step {i}")
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(0.9).add_(s, alpha=0.1)
        written = snapshot(teacher.parameters())
        if i % 4 == 0:
            to_eval(info, opt)
            check(f"after eval() at step {i}")
            to_train(info, opt)
            check(f"after train() at step {i}")
    if any(opt.state.get(t) for t in teacher.parameters()):
        violations.append("state created for the teacher")
    return violations


@pytest.mark.parametrize("info", INFOS, ids=_ids(INFOS))
def test_ema_teacher_without_gradients_keeps_exactly_what_was_written(info, make_model, make_batches):
    """EMA-teacher pattern over 24 steps with eval()/train() every 4: the teacher holds bitwise the
    values the user wrote (oracle: those values) and gets no optimizer state."""
    for flags in _flag_variants(info):
        assert probe_ema_teacher(info, _ours(info, **flags), make_model, make_batches(24)) == [], flags


@pytest.mark.parametrize("info", published_with(TOUCHES_GRADLESS), ids=_ids(published_with(TOUCHES_GRADLESS)))
def test_published_closure_forms_move_an_ema_teacher(info, make_model, make_batches):
    """schedulefree 1.4.1's closure forms create state for every parameter and move it to y each step."""
    assert probe_ema_teacher(info, _theirs(info), make_model, make_batches(8), published_form=True)


def _freezer(model: nn.Module, how: str) -> tuple[Callable[[bool], None], Callable[[], None] | None]:
    """(set_frozen(flag), after_backward) freezing ``model.aux`` by requires_grad or by dropping grads."""
    state = {"frozen": False}

    def set_frozen(flag: bool) -> None:
        state["frozen"] = flag
        if how == "requires_grad":
            model.aux.requires_grad_(not flag)

    def drop_grads() -> None:
        if state["frozen"]:
            for p in model.aux.parameters():
                p.grad = None

    return set_frozen, (drop_grads if how == "grad_none" else None)


def probe_frozen_after_training(info: OptimInfo, make: Factory, make_two_tower, batches, how: str,
                                published_form=False) -> dict[str, float]:
    """``aux`` trains 10 steps, is frozen 20 steps (eval()/train() every 4), then unfrozen 5 steps.

    Returns the largest change of ``aux`` across one frozen step (no switch), its total drift over
    the frozen period in float32 ulps of the tensor's largest entry, and how far it moved once unfrozen.
    """
    config = info.configs[0]
    model = make_two_tower(0)
    groups = _groups(info, model.mlp.parameters(), config, published_form=published_form)
    groups[0]["params"] += list(model.aux.parameters())
    opt = make(groups, config)
    set_frozen, after_backward = _freezer(model, how)
    for batch in batches[:10]:
        train_step(info, opt, model, batch)
    set_frozen(True)
    at_freeze = snapshot(model.aux.parameters())
    step_change = 0.0
    for i, batch in enumerate(batches[10:30], start=1):
        before = snapshot(model.aux.parameters())
        train_step(info, opt, model, batch, after_backward=after_backward)
        step_change = max(step_change, *((p - b).abs().max().item() for p, b in zip(model.aux.parameters(), before)))
        if i % 4 == 0:
            to_eval(info, opt)
            to_train(info, opt)
    drift_ulps = max(((p - v).abs().max() / (EPS32 * v.abs().max())).item()
                     for p, v in zip(model.aux.parameters(), at_freeze))
    set_frozen(False)
    at_unfreeze = snapshot(model.aux.parameters())
    for batch in batches[30:35]:
        train_step(info, opt, model, batch, after_backward=after_backward)
    moved = max(max_rel_err(p, v) for p, v in zip(model.aux.parameters(), at_unfreeze))
    return {"step_change": step_change, "drift_ulps": drift_ulps, "moved_after_unfreeze": moved}


@pytest.mark.parametrize("how", ["requires_grad", "grad_none"])
@pytest.mark.parametrize("info", INFOS, ids=_ids(INFOS))
def test_parameter_that_lost_its_gradient_does_not_drift(info, how, make_two_tower, make_batches):
    """A trained head frozen for 20 steps (requires_grad=False, or grad set to None after backward)
    with eval()/train() every 4 steps. Oracle: its values at freezing. Steps leave it bitwise
    unchanged (closure forms: within 2 float32 ulps of the tensor's largest entry per step, the
    y -> x round trip around the closure); over the whole frozen period, switches included, it stays
    within 2 ulps; unfrozen, it trains again."""
    for flags in _flag_variants(info):
        seen = probe_frozen_after_training(info, _ours(info, **flags), make_two_tower, make_batches(35), how)
        scale = max(p.abs().max().item() for p in make_two_tower(0).aux.parameters())
        step_tol = 2 * EPS32 * scale if info.closure_form else 0.0
        assert seen["step_change"] <= step_tol, (flags, seen)
        assert seen["drift_ulps"] <= 2.0, (flags, seen)
        assert seen["moved_after_unfreeze"] > 1e-4, (flags, seen)


@pytest.mark.parametrize("info", published_with(DRIFTS_WHEN_FROZEN), ids=_ids(published_with(DRIFTS_WHEN_FROZEN)))
def test_published_closure_forms_drift_a_frozen_parameter(info, make_two_tower, make_batches):
    """schedulefree 1.4.1's closure forms leave a frozen parameter at y every step: it drifts to z."""
    seen = probe_frozen_after_training(info, _theirs(info), make_two_tower, make_batches(35), "requires_grad",
                                       published_form=True)
    assert seen["drift_ulps"] > 100, seen


def probe_frozen_from_start(info: OptimInfo, make: Factory, make_two_tower, batches, how: str, rewrite_at: int,
                            published_form=False) -> tuple[nn.Module, list[str]]:
    """``aux`` is frozen for 20 steps (eval()/train() every 4); at step ``rewrite_at`` the user writes
    aux <- 0.5 aux (e.g. loads pretrained weights); then it is unfrozen for 10 steps.

    Returns the model and the points where ``aux`` did not hold exactly what was written while frozen.
    """
    config = info.configs[0]
    model = make_two_tower(0)
    groups = _groups(info, model.mlp.parameters(), config, published_form=published_form)
    groups[0]["params"] += list(model.aux.parameters())
    opt = make(groups, config)
    set_frozen, after_backward = _freezer(model, how)
    set_frozen(True)
    violations = []
    for i, batch in enumerate(batches[:20]):
        if i == rewrite_at:
            with torch.no_grad():
                for p in model.aux.parameters():
                    p.mul_(0.5)
        written = snapshot(model.aux.parameters())
        train_step(info, opt, model, batch, after_backward=after_backward)
        if (i + 1) % 4 == 0:
            to_eval(info, opt)
            to_train(info, opt)
        if any(not torch.equal(p, w) for p, w in zip(model.aux.parameters(), written)):
            violations.append(f"frozen aux changed at step {i}")
    set_frozen(False)
    for batch in batches[20:30]:
        train_step(info, opt, model, batch, after_backward=after_backward)
    return model, violations


@pytest.mark.parametrize("how", ["requires_grad", "grad_none"])
@pytest.mark.parametrize("info", INFOS, ids=_ids(INFOS))
def test_layer_frozen_from_start_trains_from_its_value_at_unfreezing(info, how, make_two_tower, make_batches):
    """A head frozen for 20 steps, rewritten by the user at step 10, then unfrozen for 10 steps: while
    frozen it holds exactly what was written, and afterwards the whole model is bitwise equal to the
    oracle run in which the head held the rewritten values from step 0 (so nothing of its
    pre-rewrite value survives in the optimizer)."""
    skip_if_global_step_size(info, "the frozen head's output enters the loss, so the run rewritten at step 0 "
                                   "has other losses in steps 0-9 and every group another step size")
    batches = make_batches(30)
    for flags in _flag_variants(info):
        model, violations = probe_frozen_from_start(info, _ours(info, **flags), make_two_tower, batches, how, 10)
        oracle, _ = probe_frozen_from_start(info, _ours(info, **flags), make_two_tower, batches, how, 0)
        assert violations == [], flags
        for (name, a), b in zip(model.named_parameters(), oracle.parameters()):
            assert torch.equal(a, b), f"{flags}: {name} differs from the run rewritten at step 0"


@pytest.mark.parametrize("info", published_with(TOUCHES_GRADLESS), ids=_ids(published_with(TOUCHES_GRADLESS)))
def test_published_closure_forms_pull_a_rewritten_frozen_layer_back(info, make_two_tower, make_batches):
    """schedulefree 1.4.1's closure forms keep the pre-rewrite value as z and pull the layer toward it."""
    batches = make_batches(30)
    model, violations = probe_frozen_from_start(info, _theirs(info), make_two_tower, batches, "requires_grad", 10,
                                                published_form=True)
    oracle, _ = probe_frozen_from_start(info, _theirs(info), make_two_tower, batches, "requires_grad", 0,
                                        published_form=True)
    assert violations or not torch.equal(model.aux.weight, oracle.aux.weight)


# ============================================================================ train / eval mode
def probe_step_before_train(info: OptimInfo, make: Factory, make_model, batches,
                            published_form=False) -> BaseException | None:
    """Build an optimizer and step without calling train(); returns what was raised, if anything."""
    config = info.configs[0]
    model = make_model(0)
    opt = make(_groups(info, model.parameters(), config, published_form=published_form), config)
    try:
        run(info, opt, model, batches)
    except Exception as error:  # noqa: BLE001 - the probe reports whatever the class raises
        return error
    return None


@pytest.mark.parametrize("info", MODAL_INFOS, ids=_ids(MODAL_INFOS))
def test_new_optimizer_is_ready_to_train_and_train_first_changes_nothing(info, make_model, make_batches):
    """A new optimizer reports train mode and steps without train(); calling train() on it first
    leaves parameters bitwise and state empty, and the 10-step run is bitwise the run without it
    (oracle: that run)."""
    batches = make_batches(10)
    assert probe_step_before_train(info, _ours(info), make_model, batches) is None
    config = info.configs[0]
    model_a, model_b = make_model(0), make_model(0)
    opt_a = info.make(param_groups(info, list(model_a.parameters()), config), config)
    opt_b = info.make(param_groups(info, list(model_b.parameters()), config), config)
    assert opt_a.train_mode is True
    before = snapshot(model_a.parameters())
    opt_a.train()
    assert opt_a.train_mode is True
    assert all(torch.equal(p, b) for p, b in zip(model_a.parameters(), before))
    assert not any(opt_a.state.values())
    run(info, opt_a, model_a, batches, switch_every=4)
    run(info, opt_b, model_b, batches, switch_every=4)
    assert_same_run(model_a, opt_a, model_b, opt_b)


@pytest.mark.parametrize("info", published_with(STARTS_IN_EVAL), ids=_ids(published_with(STARTS_IN_EVAL)))
def test_published_optimizer_refuses_to_step_before_train(info, make_model, make_batches):
    """schedulefree 1.4.1 starts in eval mode: a step before train() raises."""
    assert probe_step_before_train(info, _theirs(info, ready=False), make_model, make_batches(2),
                                   published_form=True) is not None


def probe_mode_round_trip(info: OptimInfo, make: Factory, make_model, batches, save_mode: str,
                          published_form=False) -> list[str]:
    """Train 8 steps, put the optimizer in ``save_mode``, save model + optimizer, load into a fresh
    model and optimizer (built ready to train), call train() on both and train 4 more steps.
    Returns the parameters where the resumed run differs (bitwise) from the original."""
    config = info.configs[0]
    model = make_model(0)
    opt = make(_groups(info, model.parameters(), config, published_form=published_form), config)
    run(info, opt, model, batches[:8])
    if save_mode == "eval":
        opt.eval()
    saved_model, saved_opt = copy.deepcopy((model.state_dict(), opt.state_dict()))  # as a checkpoint file would
    fresh_model = make_model(99)
    fresh_opt = make(_groups(info, fresh_model.parameters(), config, published_form=published_form), config)
    fresh_model.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    opt.train()
    fresh_opt.train()
    run(info, opt, model, batches[8:])
    run(info, fresh_opt, fresh_model, batches[8:])
    return [name for (name, a), b in zip(model.named_parameters(), fresh_model.parameters()) if not torch.equal(a, b)]


@pytest.mark.parametrize("save_mode", ["eval", "train"])
@pytest.mark.parametrize("info", MODAL_INFOS, ids=_ids(MODAL_INFOS))
def test_mode_is_saved_in_state_dict_and_restored(info, save_mode, make_model, make_batches):
    """load_state_dict restores the saved mode (train_mode property), so train() after loading puts
    the parameters where the original's train() does: the resumed run is bitwise the original."""
    config = info.configs[0]
    model = make_model(0)
    opt = info.make(param_groups(info, list(model.parameters()), config), config)
    run(info, opt, model, make_batches(3))
    if save_mode == "eval":
        opt.eval()
    fresh = info.make(param_groups(info, list(make_model(0).parameters()), config), config)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.train_mode is (save_mode == "train")
    assert probe_mode_round_trip(info, _ours(info), make_model, make_batches(12), save_mode) == []


@pytest.mark.parametrize("info", published_with(MODE_NOT_SAVED), ids=_ids(published_with(MODE_NOT_SAVED)))
def test_published_wrapper_loses_its_mode_in_state_dict(info, make_model, make_batches):
    """schedulefree 1.4.1's wrapper keeps its mode outside the state_dict: a checkpoint taken in eval
    mode and loaded into a wrapper in train mode is never moved back to y."""
    assert probe_mode_round_trip(info, _theirs(info), make_model, make_batches(12), "eval", published_form=True)


def probe_group_added_in_train_mode(info: OptimInfo, make: Factory, make_two_tower, batches,
                                    published_form=False) -> float:
    """Train the MLP 5 steps, add the ``aux`` head as a new group (train mode), train 10 steps (past
    RAdam's silent first steps), eval().

    Returns the largest relative distance of the added parameters from x = lerp(y, z, 1 - 1/beta)
    computed from their y before eval() and their z.
    """
    config = info.configs[0]
    model = make_two_tower(0)
    opt = make(_groups(info, model.mlp.parameters(), config, published_form=published_form), config)
    run(info, opt, model, batches[:5])
    opt.add_param_group({"params": list(model.aux.parameters())})
    run(info, opt, model, batches[5:15])
    beta = info.beta(config)
    expected = [y.detach().lerp(opt.state[y]["z"], 1.0 - 1.0 / beta) for y in model.aux.parameters()]
    opt.eval()
    return max(max_rel_err(p, x) for p, x in zip(model.aux.parameters(), expected))


@pytest.mark.parametrize("info", MODAL_INFOS, ids=_ids(MODAL_INFOS))
def test_group_added_after_train_joins_train_mode(info, make_two_tower, make_batches):
    """A group added mid-run in train mode trains and is moved to x by eval() like the others.
    Oracle: x = lerp(y, z, 1 - 1/beta) from its y and z before eval(), to a relative 1e-5."""
    assert probe_group_added_in_train_mode(info, _ours(info), make_two_tower, make_batches(15)) <= 1e-5


@pytest.mark.parametrize("info", published_with(NEW_GROUP_WRONG_MODE), ids=_ids(published_with(NEW_GROUP_WRONG_MODE)))
def test_published_group_added_after_train_is_left_at_y_by_eval(info, make_two_tower, make_batches):
    """schedulefree 1.4.1 gives a new group train_mode=False, so eval() skips it."""
    assert probe_group_added_in_train_mode(info, _theirs(info), make_two_tower, make_batches(15),
                                           published_form=True) > 1e-5


@pytest.mark.parametrize("info", MODAL_INFOS, ids=_ids(MODAL_INFOS))
def test_group_added_after_eval_joins_eval_mode(info, make_two_tower, make_batches):
    """add_param_group after eval(): the optimizer still reports eval mode and refuses to step;
    after train() the new group trains (10 steps, past RAdam's silent first steps)."""
    config = info.configs[0]
    batches = make_batches(13)
    model = make_two_tower(0)
    opt = info.make(param_groups(info, list(model.mlp.parameters()), config), config)
    run(info, opt, model, batches[:3])
    opt.eval()
    opt.add_param_group({"params": list(model.aux.parameters())})
    assert opt.train_mode is False
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        train_step(info, opt, model, batches[3])
    opt.train()
    before = snapshot(model.aux.parameters())
    run(info, opt, model, batches[3:])
    assert all(not torch.equal(p, b) for p, b in zip(model.aux.parameters(), before))


def probe_step_in_eval(info: OptimInfo, make: Factory, make_model, batches, published_form=False):
    """Train 3 steps, eval(), then try a step with fresh gradients.

    Returns (what step() raised, whether parameters or optimizer state changed).
    """
    config = info.configs[0]
    model = make_model(0)
    opt = make(_groups(info, model.parameters(), config, published_form=published_form), config)
    run(info, opt, model, batches[:3])
    opt.eval()
    params_before = snapshot(model.parameters())
    state_before = [snapshot(s.values()) for s in opt.state.values()]
    try:
        train_step(info, opt, model, batches[3])
        raised = None
    except Exception as error:  # noqa: BLE001 - the probe reports whatever the class raises
        raised = error
    changed = any(not torch.equal(p, b) for p, b in zip(model.parameters(), params_before)) or any(
        not same_value(t, b) for s, before in zip(opt.state.values(), state_before)
        for t, b in zip(s.values(), before))
    return raised, changed


@pytest.mark.parametrize("info", MODAL_INFOS, ids=_ids(MODAL_INFOS))
def test_step_in_eval_mode_raises_runtime_error_naming_train(info, make_model, make_batches):
    """step() in eval mode raises RuntimeError whose message mentions optimizer.train(), and changes
    neither parameters nor state."""
    raised, changed = probe_step_in_eval(info, _ours(info), make_model, make_batches(4))
    assert isinstance(raised, RuntimeError), repr(raised)
    assert "optimizer.train()" in str(raised)
    assert not changed


@pytest.mark.parametrize("info", published_with(WRONG_EVAL_ERROR), ids=_ids(published_with(WRONG_EVAL_ERROR)))
def test_published_step_in_eval_raises_bare_exception(info, make_model, make_batches):
    """schedulefree 1.4.1 raises a bare Exception, which ``except RuntimeError`` does not catch."""
    raised, _ = probe_step_in_eval(info, _theirs(info), make_model, make_batches(4), published_form=True)
    assert raised is not None and not isinstance(raised, RuntimeError)


@pytest.mark.parametrize("info", [i for i in INFOS if i.closure_form], ids=_ids(i for i in INFOS if i.closure_form))
def test_closure_form_step_requires_a_closure(info, make_model):
    """Closure forms raise TypeError naming the closure when step() is called without one."""
    model = make_model(0)
    opt = info.make(model.parameters(), info.configs[0])
    with pytest.raises(TypeError, match="closure"):
        opt.step()


# ============================================================================ ScheduleFreeWrapper
WRAPPERS = [ours.ScheduleFreeWrapper, published.ScheduleFreeWrapper]
# Each of our wrapper classes with its published counterpart.
WRAPPER_PAIRS = [pytest.param(ours.ScheduleFreeWrapper, published.ScheduleFreeWrapper, id="ScheduleFreeWrapper"),
                 pytest.param(ours.ScheduleFreeWrapperReference, published.ScheduleFreeWrapperReference,
                              id="ScheduleFreeWrapperReference")]


@pytest.mark.parametrize("ours_cls, published_cls", WRAPPER_PAIRS)
def test_wrapper_is_a_torch_optimizer(ours_cls, published_cls):
    """Our wrappers are torch.optim.Optimizers sharing their group dicts with the base;
    schedulefree 1.4.1's are not Optimizers at all."""
    p = nn.Parameter(torch.zeros(3))
    base = torch.optim.SGD([p], lr=0.1)
    wrapper = ours_cls(base)
    assert isinstance(wrapper, torch.optim.Optimizer)
    assert all(a is b for a, b in zip(wrapper.param_groups, base.param_groups))
    assert not isinstance(published_cls(torch.optim.SGD([p], lr=0.1)), torch.optim.Optimizer)


def _wrapper_over_two_tower(model, wrapper_cls=ours.ScheduleFreeWrapper, **kw):
    base = torch.optim.SGD([{"params": list(model.mlp.parameters()), "lr": 0.1},
                            {"params": list(model.aux.parameters()), "lr": 0.03}], lr=0.1)
    return wrapper_cls(base, **kw)


def test_wrapper_lr_scheduler_changes_reach_the_base(make_two_tower, make_batches):
    """LambdaLR over the wrapper sets the base's group lr; the run is bitwise the run that sets the
    same lr by hand each step (oracle). schedulefree 1.4.1's wrapper is rejected by LambdaLR."""
    info = next(i for i in INFOS if i.name == "ScheduleFreeWrapper-SGD")
    factor = lambda k: 1.0 / (1.0 + k)  # noqa: E731
    batches = make_batches(8)
    model, oracle = make_two_tower(0), make_two_tower(0)
    opt, opt_oracle = _wrapper_over_two_tower(model), _wrapper_over_two_tower(oracle)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for k, batch in enumerate(batches):
        for group, base_lr in zip(opt_oracle.param_groups, (0.1, 0.03)):
            group["lr"] = base_lr * factor(k)
        assert [g["lr"] for g in opt.base.param_groups] == [g["lr"] for g in opt_oracle.base.param_groups]
        train_step(info, opt, model, batch)
        train_step(info, opt_oracle, oracle, batch)
        scheduler.step()
    for (name, a), b in zip(model.named_parameters(), oracle.parameters()):
        assert torch.equal(a, b), f"{name} differs from the run with lr set by hand"
    saved, saved_oracle = opt.state_dict(), opt_oracle.state_dict()
    assert_bitwise_equal(saved["state"], saved_oracle["state"], "state")
    assert_bitwise_equal(saved["base"]["state"], saved_oracle["base"]["state"], "base state")
    with pytest.raises(TypeError):
        torch.optim.lr_scheduler.LambdaLR(_wrapper_over_two_tower(make_two_tower(0), published.ScheduleFreeWrapper),
                                          factor)


def test_wrapper_state_dict_keeps_mode_and_averaging_state(make_two_tower, make_batches):
    """The wrapper's state_dict carries, per group, sf_k (steps taken) and sf_train_mode, per
    parameter z, and the base's state under "base"; a fresh wrapper loading it reports eval mode and
    its groups are again the base's dicts."""
    info = next(i for i in INFOS if i.name == "ScheduleFreeWrapper-SGD")
    model = make_two_tower(0)
    opt = _wrapper_over_two_tower(model)
    run(info, opt, model, make_batches(5))
    opt.eval()
    saved = opt.state_dict()
    assert [g["sf_k"] for g in saved["param_groups"]] == [5, 5]
    assert all(g["sf_train_mode"] is False for g in saved["param_groups"])
    assert all(isinstance(s["z"], torch.Tensor) for s in saved["state"].values()) and len(saved["state"]) == 6
    assert "base" in saved and len(saved["base"]["param_groups"]) == 2
    fresh = _wrapper_over_two_tower(make_two_tower(0))
    fresh.load_state_dict(saved)
    assert fresh.train_mode is False
    assert all(a is b for a, b in zip(fresh.param_groups, fresh.base.param_groups))
    assert [g["sf_k"] for g in fresh.param_groups] == [5, 5]


def probe_group_weight_decay_at_y(wrapper_cls, make_two_tower, batches) -> list[str]:
    """One wrapper over [mlp (weight_decay_at_y=0.1), aux (no key)] with wrapper-wide 0.01, against
    two wrappers with wrapper-wide 0.1 and 0.01 over each tower. Returns the parameters that differ."""
    info = next(i for i in INFOS if i.name == "ScheduleFreeWrapper-SGD")
    model, oracle = make_two_tower(0), make_two_tower(0)
    base = torch.optim.SGD([{"params": list(model.mlp.parameters()), "weight_decay_at_y": 0.1},
                            {"params": list(model.aux.parameters())}], lr=0.1)
    opt = wrapper_cls(base, weight_decay_at_y=0.01)
    opt_mlp = wrapper_cls(torch.optim.SGD(oracle.mlp.parameters(), lr=0.1), weight_decay_at_y=0.1)
    opt_aux = wrapper_cls(torch.optim.SGD(oracle.aux.parameters(), lr=0.1), weight_decay_at_y=0.01)
    for o in (opt, opt_mlp, opt_aux):
        o.train()
    for batch in batches:
        train_step(info, opt, model, batch)
        oracle.zero_grad()
        loss_of(oracle, batch).backward()
        opt_mlp.step()
        opt_aux.step()
    return [name for (name, a), b in zip(model.named_parameters(), oracle.parameters()) if not torch.equal(a, b)]


@pytest.mark.parametrize("ours_cls, published_cls", WRAPPER_PAIRS)
def test_wrapper_reads_weight_decay_at_y_per_group_with_wrapper_default(ours_cls, published_cls, make_two_tower,
                                                                        make_batches):
    """Group key weight_decay_at_y overrides the wrapper-wide value, which is the default for groups
    without it. Oracle: separate wrappers with those wrapper-wide values (bitwise equal over 6 steps)."""
    assert probe_group_weight_decay_at_y(ours_cls, make_two_tower, make_batches(6)) == []


@pytest.mark.parametrize("ours_cls, published_cls", WRAPPER_PAIRS)
def test_published_wrapper_ignores_group_weight_decay_at_y(ours_cls, published_cls, make_two_tower, make_batches):
    """schedulefree 1.4.1 uses the wrapper-wide value for every group (its reference form writes it
    over every group's value at construction)."""
    assert probe_group_weight_decay_at_y(published_cls, make_two_tower, make_batches(6))


def probe_lr_zero(wrapper_cls, make_model, batches) -> tuple[BaseException | None, float, float]:
    """Wrapper over SGD(lr=0): 3 steps, then lr=0.1 for 3 steps.

    Returns (what was raised, max relative change over the lr=0 steps, max relative change after).
    """
    info = next(i for i in INFOS if i.name == "ScheduleFreeWrapper-SGD")
    model = make_model(0)
    opt = wrapper_cls(torch.optim.SGD(model.parameters(), lr=0.0))
    opt.train()
    start = snapshot(model.parameters())
    try:
        run(info, opt, model, batches[:3])
        at_zero = max(max_rel_err(p, s) for p, s in zip(model.parameters(), start))
        for group in opt.param_groups:
            group["lr"] = 0.1
        run(info, opt, model, batches[3:])
    except Exception as error:  # noqa: BLE001 - the probe reports whatever the class raises
        return error, float("nan"), float("nan")
    after = max(max_rel_err(p, s) for p, s in zip(model.parameters(), start))
    return None, at_zero, after


@pytest.mark.parametrize("ours_cls, published_cls", WRAPPER_PAIRS)
def test_wrapper_steps_at_lr_zero(ours_cls, published_cls, make_model, make_batches):
    """At lr=0 the wrapper steps without error and the parameters stay put (within 1e-6 relative,
    the y -> z -> y round trip); once lr > 0 they train."""
    raised, at_zero, after = probe_lr_zero(ours_cls, make_model, make_batches(6))
    assert raised is None
    assert at_zero <= 1e-6
    assert after > 1e-3


@pytest.mark.parametrize("ours_cls, published_cls", WRAPPER_PAIRS)
def test_published_wrapper_divides_by_zero_at_lr_zero(ours_cls, published_cls, make_model, make_batches):
    """schedulefree 1.4.1's wrappers compute ckp1 = 0 / 0 at lr=0."""
    raised, _, _ = probe_lr_zero(published_cls, make_model, make_batches(6))
    assert isinstance(raised, ZeroDivisionError)


@pytest.mark.parametrize("wrapper_cls", WRAPPERS + [ours.ScheduleFreeWrapperReference,
                                                    published.ScheduleFreeWrapperReference],
                         ids=["ours", "published", "ours-reference", "published-reference"])
def test_wrapper_runs_torch_adam_as_base(wrapper_cls, make_model, make_batches):
    """Our wrappers keep their points in their own state, so torch's Adam (lazy state: initialised
    when empty) works as a base; schedulefree 1.4.1 stores them in the base's state and Adam fails
    with KeyError."""
    info = next(i for i in INFOS if i.name == "ScheduleFreeWrapper-Adam")
    model = make_model(0)
    opt = wrapper_cls(torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.0, 0.999)))
    opt.train()
    if wrapper_cls in (published.ScheduleFreeWrapper, published.ScheduleFreeWrapperReference):
        with pytest.raises(KeyError):
            run(info, opt, model, make_batches(1))
    else:
        run(info, opt, model, make_batches(3))
        assert all(int(s["step"]) == 3 for s in opt.base.state.values())


# ============================================================================ hyperparameter validation
ERROR_CASES = [pytest.param(info, err, id=f"{info.name}-{err.id}") for info in INFOS for err in info.error_inputs]
GROUP_ERROR_CASES = [pytest.param(info, err, id=f"{info.name}-{err.id}")
                     for info in INFOS for err in info.error_inputs if err.in_group]


def _assert_names(error: BaseException, err: ErrorInput) -> None:
    """The message names the argument and shows the offending value right after it."""
    message = str(error)
    pattern = re.escape(err.name) + r".{0,20}?" + re.escape(repr(err.value))
    assert re.search(pattern, message), f"message {message!r} does not name {err.name} = {err.value!r}"


@pytest.mark.parametrize("info, err", ERROR_CASES)
def test_invalid_hyperparameter_raises_an_error_naming_it(info, err, make_model):
    """Constructor rejects the value with ValueError (out of range) or TypeError (not a number,
    not a flag) naming the argument and value."""
    config = {**info.configs[0], **err.kwargs}
    with pytest.raises(err.error) as caught:
        info.make(make_model(0).parameters(), config)
    _assert_names(caught.value, err)


@pytest.mark.parametrize("info, err", GROUP_ERROR_CASES)
def test_invalid_group_value_raises_and_leaves_optimizer_unchanged(info, err, make_model, make_batches):
    """add_param_group with an invalid per-group value raises the same ValueError; groups, state
    and (wrapper) base groups are unchanged, and the parameters can then be added with valid values.
    The same value in a group given to the constructor raises too."""
    config = info.configs[0]
    with pytest.raises(err.error) as caught:
        info.make([{"params": list(make_model(0).parameters()), **err.kwargs}], config)
    _assert_names(caught.value, err)
    model = make_model(0)
    opt = info.make(param_groups(info, list(model.parameters()), config), config)
    run(info, opt, model, make_batches(2))

    def layout():
        groups = [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
                  for g in opt.param_groups]
        base = getattr(opt, "base", None)
        return groups, {id(p): sorted(s) for p, s in opt.state.items()}, base and len(base.param_groups)

    before = layout()
    extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(err.error) as caught:
        opt.add_param_group({"params": [extra], **err.kwargs})
    _assert_names(caught.value, err)
    assert layout() == before
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[-1]["params"] == [extra]


PUBLISHED_ACCEPTING = published_with(ACCEPTS_INVALID)


@pytest.mark.parametrize("info", PUBLISHED_ACCEPTING, ids=_ids(PUBLISHED_ACCEPTING))
def test_published_accepts_negative_learning_rate(info, make_model):
    """schedulefree 1.4.1's Adam-family classes construct with lr=-1.0 without complaint."""
    info.published_factory(make_model(0).parameters(), **{**info.configs[0], "lr": -1.0})
