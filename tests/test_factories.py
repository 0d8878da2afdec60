"""The muP factories (mup_schedulefree.factories): groups, errors, state dicts, schedulers, training.

Every way of building a muP optimizer is described once in ``CASES`` (ours in primal, closure and
reference form, the wrapper, the published ``schedulefree`` classes, torch.optim classes) and
the generic tests run over all of them, as torch's optimizer suite does with its info records.

Oracles:
  * mup 1.0.0's own ``MuAdam`` / ``MuSGD`` on the same model (group-level parity);
  * ``mup_lr`` / ``mup_wd`` below: mup's rules written as arithmetic on ``p.infshape``;
  * the published schedule-free averaging formula, ckp1 = w / sum(w) with absolute lrs;
  * a second, identically built optimizer (state-dict round trips).
Models (tests/mup_models.py) use non-power-of-two width multipliers (3, 5, 6) and fan-in/fan-out
ratios other than 1 (0.5, 2), so the rules cannot agree by accident.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import mup
import numpy as np
import pytest
import schedulefree
import torch
from mup_models import MixedNet, mixed_net, mlp
from torch.nn import functional as F

import mup_schedulefree as msf
from mup_schedulefree import kernels
from mup_schedulefree.optimizers import wrapper as wrapper_module
from mup_schedulefree.schedule import warmup_multiplier

LR_ADAM, LR_RADAM, LR_SGD = 1e-2, 5e-2, 0.1
WD = 1e-2  # every case decays, so a step that touched gradient-less parameters would move them


# conftest's one_thread: on the shared 2-core machine torch's 2-thread pool waits on descheduled
# workers (observed: 3.4 s for this file with one thread, 38-73 s with two); results do not change.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- oracles and helpers


def mup_lr(p: torch.Tensor, rule: str, lr: float) -> float:
    """mup 1.0.0's learning rate for ``p`` (mup/optim.py), as arithmetic on its infshape."""
    shape = p.infshape
    if rule == "adam":
        return lr / shape.width_mult() if shape.ninf() == 2 else lr
    if shape.ninf() == 2:
        return lr / shape.fanin_fanout_mult_ratio()
    return lr * shape.width_mult() if shape.ninf() == 1 else lr


def mup_wd(p: torch.Tensor, rule: str, wd: float) -> float:
    """mup 1.0.0's weight decay for ``p`` (decay multiplied by lr: the inverse of the lr scaling)."""
    shape = p.infshape
    if rule == "adam":
        return wd * shape.width_mult() if shape.ninf() == 2 else wd
    if shape.ninf() == 2:
        return wd * shape.fanin_fanout_mult_ratio()
    return wd / shape.width_mult() if shape.ninf() == 1 else wd


def regression_data(d_in: int, d_out: int, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random regression data: y = tanh(x W) + 0.1 noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    teacher = torch.randn(d_in, d_out, generator=g)
    return x, torch.tanh(x @ teacher) + 0.1 * torch.randn(n, d_out, generator=g)


def split_norms(model: torch.nn.Module, named: bool = True) -> tuple[list[Any], list[Any]]:
    """(LayerNorm parameters and biases, everything else), as (name, p) pairs or tensors."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.startswith("norm.") or name.endswith("bias") else decay).append((name, p) if named else p)
    return no_decay, decay


def signature(optimizer: torch.optim.Optimizer) -> list[tuple]:
    """What defines each group, without parameter identity: muP keys, lr, decay, names, shapes."""
    return [(g["mup_rule"], g["mup_role"], g["mup_lr_mult"], g["mup_wd_mult"], g["lr"], g["weight_decay"],
             tuple(g.get("param_names", ())), tuple(tuple(p.shape) for p in g["params"]))
            for g in optimizer.param_groups]


@dataclass(frozen=True)
class Case:
    """One way of building a muP optimizer.

    Attributes:
        factory: called as ``factory(params, lr=lr, weight_decay=WD)``.
        rule: the muP rule it must follow.
        form: "primal" (train()/eval(), parameters hold y while training), "closure" (step(closure),
            parameters always hold x) or "plain" (torch.optim: no averaging).
        lr: its base learning rate.
    """

    factory: Callable[..., torch.optim.Optimizer]
    rule: str
    form: str
    lr: float


CASES = {
    "ours-AdamW": Case(partial(msf.MuAdamW_ScheduleFree, impl=msf.AdamWScheduleFree), "adam", "primal", LR_ADAM),
    "ours-RAdam": Case(partial(msf.MuRAdam_ScheduleFree, impl=msf.RAdamScheduleFree), "adam", "primal", LR_RADAM),
    "ours-SGD": Case(partial(msf.MuSGD_ScheduleFree, impl=msf.SGDScheduleFree), "sgd", "primal", LR_SGD),
    "ours-AdamW-closure": Case(msf.MuAdamW_ScheduleFreeClosure, "adam", "closure", LR_ADAM),
    "ours-RAdam-closure": Case(msf.MuRAdam_ScheduleFreeClosure, "adam", "closure", LR_RADAM),
    "ours-SGD-closure": Case(msf.MuSGD_ScheduleFreeClosure, "sgd", "closure", LR_SGD),
    "ours-AdamW-reference": Case(msf.MuAdamW_ScheduleFreeReference, "adam", "primal", LR_ADAM),
    "ours-SGD-reference": Case(msf.MuSGD_ScheduleFreeReference, "sgd", "primal", LR_SGD),
    "ours-AdamW-paper": Case(msf.MuAdamW_ScheduleFreePaper, "adam", "primal", LR_ADAM),
    "wrapper-Adam": Case(partial(msf.MuScheduleFreeWrapper, base_impl=torch.optim.Adam, betas=(0.0, 0.999)), "adam",
                         "primal", LR_ADAM),
    "wrapper-SGD": Case(partial(msf.MuScheduleFreeWrapper, base_impl=torch.optim.SGD), "sgd", "primal", LR_SGD),
    "wrapper-reference-Adam": Case(partial(msf.MuScheduleFreeWrapperReference, base_impl=torch.optim.Adam,
                                           betas=(0.0, 0.999)), "adam", "primal", LR_ADAM),
    "wrapper-reference-SGD": Case(partial(msf.MuScheduleFreeWrapperReference, base_impl=torch.optim.SGD), "sgd",
                                  "primal", LR_SGD),
    "published-AdamW": Case(partial(msf.MuAdamW_ScheduleFree, impl=schedulefree.AdamWScheduleFree), "adam", "primal",
                            LR_ADAM),
    "published-RAdam": Case(partial(msf.MuRAdam_ScheduleFree, impl=schedulefree.RAdamScheduleFree), "adam", "primal",
                            LR_RADAM),
    "published-AdamW-paper": Case(partial(msf.MuAdamW_ScheduleFreePaper, impl=schedulefree.AdamWScheduleFreePaper),
                                  "adam", "primal", LR_ADAM),
    "published-SGD": Case(partial(msf.MuSGD_ScheduleFree, impl=schedulefree.SGDScheduleFree), "sgd", "primal", LR_SGD),
    "torch-Adam": Case(partial(msf.MuAdamW_ScheduleFree, impl=torch.optim.Adam), "adam", "plain", LR_ADAM),
    "torch-AdamW": Case(partial(msf.MuAdamW_ScheduleFree, impl=torch.optim.AdamW), "adam", "plain", LR_ADAM),
    "torch-SGD": Case(partial(msf.MuSGD_ScheduleFree, impl=torch.optim.SGD), "sgd", "plain", LR_SGD),
}
CASE_PARAMS = [pytest.param(case, id=name) for name, case in CASES.items()]


def build(case: Case, params: Any) -> torch.optim.Optimizer:
    """Build with the case's lr and weight decay WD, in training mode (the published classes start in eval)."""
    optimizer = case.factory(params, lr=case.lr, weight_decay=WD)
    if case.form == "primal":
        optimizer.train()
    return optimizer


def train(case: Case, optimizer: torch.optim.Optimizer, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
          steps: int, scheduler: Any = None) -> None:
    """``steps`` full-batch MSE steps, each followed by ``scheduler.step()`` if given."""
    for _ in range(steps):
        if case.form == "closure":
            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss

            optimizer.step(closure)
        else:
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()


def to_x(case: Case, optimizer: torch.optim.Optimizer) -> None:
    """Put the parameters at the averaged point x (closure forms are always there)."""
    if case.form == "primal":
        optimizer.eval()


# ---------------------------------------------------------------- parity with mup 1.0.0


def user_params(model: torch.nn.Module, grouped: bool) -> Any:
    """Fresh params argument (mup edits group dicts in place): plain list, or two user groups."""
    if not grouped:
        return list(model.parameters())
    no_decay, decay = split_norms(model, named=False)
    return [{"params": decay, "lr": 0.03, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0, "name": "norms"}]


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "user-groups"])
@pytest.mark.parametrize("width, ff", [(24, 24), (24, 48), (48, 40)])
@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_groups_equal_those_of_mup_muadam_and_musgd(rule, width, ff, grouped):
    """Oracle: mup 1.0.0's MuAdam / MuSGD with the same torch impl on the same model; the
    non-empty groups (mup may emit an empty vector-like group) have the same parameters in the
    same order, the same lr and weight_decay (exact float equality) and the same user keys."""
    ours_factory, impl, reference = {"adam": (msf.MuAdamW_ScheduleFree, torch.optim.Adam, mup.MuAdam),
                                     "sgd": (msf.MuSGD_ScheduleFree, torch.optim.SGD, mup.MuSGD)}[rule]
    model = mixed_net(width, ff)
    ours = ours_factory(user_params(model, grouped), impl=impl, decoupled_wd=False, lr=0.01, weight_decay=0.1)
    theirs = reference(user_params(model, grouped), impl=impl, lr=0.01, weight_decay=0.1)

    def describe(optimizer):
        return [([id(p) for p in g["params"]], g["lr"], g["weight_decay"], g.get("name"))
                for g in optimizer.param_groups if g["params"]]

    assert describe(ours) == describe(theirs)
    assert len({g["lr"] for g in theirs.param_groups}) > 1, "precondition: the model has several muP lrs"


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "user-groups"])
@pytest.mark.parametrize("width, ff", [(24, 48), (48, 40)])
def test_paper_groups_equal_those_of_mup_muadam_with_the_paper_class(width, ff, grouped):
    """Oracle: mup 1.0.0's MuAdam with impl=AdamWScheduleFreePaper on the same model: the same
    non-empty groups, lrs and weight decays (exact float equality) as MuAdamW_ScheduleFreePaper's."""
    model = mixed_net(width, ff)
    ours = msf.MuAdamW_ScheduleFreePaper(user_params(model, grouped), lr=0.01, weight_decay=0.1)
    theirs = mup.MuAdam(user_params(model, grouped), impl=msf.AdamWScheduleFreePaper, lr=0.01, weight_decay=0.1)

    def describe(optimizer):
        return [([id(p) for p in g["params"]], g["lr"], g["weight_decay"], g.get("name"))
                for g in optimizer.param_groups if g["params"]]

    assert type(ours) is msf.AdamWScheduleFreePaper
    assert describe(ours) == describe(theirs)
    assert len({g["lr"] for g in theirs.param_groups}) > 1, "precondition: the model has several muP lrs"


# ---------------------------------------------------------------- generic tests over every case


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_every_parameter_gets_its_mup_lr_exactly_once(case):
    """Oracle: mup_lr / mup_wd (mup's rules on p.infshape), exact equality; every parameter of the
    model is in exactly one group and every group records its muP rule, role and multipliers."""
    model = mixed_net(24, 48)
    optimizer = build(case, model.named_parameters())
    seen = [p for g in optimizer.param_groups for p in g["params"]]
    assert sorted(map(id, seen)) == sorted(id(p) for p in model.parameters())
    for group in optimizer.param_groups:
        assert group["mup_rule"] == case.rule
        assert group["mup_role"] in ("matrix-like", "vector-like", "fixed")
        assert group["mup_lr_mult"] == pytest.approx(group["lr"] / case.lr, rel=1e-15)
        assert group["mup_wd_mult"] == pytest.approx(1.0 / group["mup_lr_mult"], rel=1e-15)
        for p in group["params"]:
            assert (group["lr"], group["weight_decay"]) == (mup_lr(p, case.rule, case.lr), mup_wd(p, case.rule, WD))


@pytest.mark.parametrize("width", [32, 128])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_twenty_steps_decrease_the_loss_at_x(case, width):
    """Oracle: the initial loss. An MLP (base width 16) at widths 32 and 128 trained 20 full-batch
    steps on fixed random regression data ends, evaluated at x, below 0.85 x its initial loss
    (observed ratios: 0.09-0.40 for Adam-like, 0.28-0.76 for SGD-like and RAdam)."""
    model = mlp(width)
    x, y = regression_data(8, 1, n=64)
    optimizer = build(case, model.named_parameters())
    with torch.no_grad():
        initial = F.mse_loss(model(x), y).item()
    train(case, optimizer, model, x, y, steps=20)
    to_x(case, optimizer)
    with torch.no_grad():
        final = F.mse_loss(model(x), y).item()
    assert final < 0.85 * initial


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_frozen_parameters_are_accepted_and_never_moved(case):
    """Oracle: the frozen parameters' initial values, bit for bit, after steps, eval and train."""
    model = mixed_net(24, 48)
    frozen = {"norm.weight": model.norm.weight, "readout.bias": model.readout.bias}
    for p in frozen.values():
        p.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in frozen.items()}
    x, y = regression_data(5, 3)
    optimizer = build(case, model.named_parameters())
    grouped = {name for g in optimizer.param_groups for name in g["param_names"]}
    assert set(frozen) <= grouped
    train(case, optimizer, model, x, y, steps=4)
    to_x(case, optimizer)
    for name, p in frozen.items():
        assert torch.equal(p, before[name]), name
    if case.form == "primal":
        optimizer.train()
        for name, p in frozen.items():
            assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_state_dict_round_trip_into_an_identical_build_continues_bit_identically(case):
    """Oracle: the uninterrupted run. Save model and optimizer after 3 steps, load both into a
    freshly built (differently initialised) model and optimizer, take 3 more steps on each:
    the parameters at x are equal bit for bit."""
    x, y = regression_data(5, 3)
    model = mixed_net(24, 48, seed=0)
    optimizer = build(case, model.named_parameters())
    train(case, optimizer, model, x, y, steps=3)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    resumed = mixed_net(24, 48, seed=1)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = build(case, resumed.named_parameters())
    resumed_optimizer.load_state_dict(saved_optimizer)

    train(case, optimizer, model, x, y, steps=3)
    train(case, resumed_optimizer, resumed, x, y, steps=3)
    to_x(case, optimizer)
    to_x(case, resumed_optimizer)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


GUARD_MESSAGE = r"state_dict (has \d+ parameter groups|group \d+)"  # the muP guard's, not torch's own


def reversed_names(case: Case) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    """Same model, named parameters in reverse order: same group signatures, other names."""
    model = mixed_net(24, 24)
    return (model, build(case, list(model.named_parameters())),
            build(case, list(mixed_net(24, 24).named_parameters())[::-1]))


def moved_parameter(case: Case) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    """Unnamed user groups where norm.weight moved from the norms group to the other one."""
    def groups(model, moved):
        no_decay, decay = split_norms(model, named=False)
        if moved:
            decay.append(no_decay.pop([p is model.norm.weight for p in no_decay].index(True)))
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    model = mixed_net(24, 48)
    return model, build(case, groups(model, False)), build(case, groups(mixed_net(24, 48), True))


def other_widths(case: Case) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    """ff width 48 vs 24: down.weight's multiplier (6 vs 3) moves it to another muP group."""
    model = mixed_net(24, 48)
    return model, build(case, model.named_parameters()), build(case, mixed_net(24, 24).named_parameters())


@pytest.mark.parametrize("variant", [reversed_names, moved_parameter, other_widths])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_state_dict_of_a_different_grouping_is_refused_with_a_clear_error(case, variant):
    """Oracle: the saved optimizer's grouping differs (names, membership, or muP groups), so
    loading must raise the muP guard's ValueError (not torch's generic one, not silently load)."""
    model, source, target = variant(case)
    x, y = regression_data(5, 3)
    train(case, source, model, x, y, steps=1)
    with pytest.raises(ValueError, match=GUARD_MESSAGE):
        target.load_state_dict(source.state_dict())


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_lambdalr_keeps_the_mup_lr_ratios_between_groups(case):
    """Oracle: LambdaLR multiplies every group's initial (muP) lr by the same factor, so after 4
    scheduler steps each group's lr is mup_lr x 0.8^4 and the ratios between groups are the muP
    ratios (rel. tolerance 1e-12); the wrapper's base optimizer sees the same lrs."""
    model = mixed_net(24, 48)
    x, y = regression_data(5, 3)
    optimizer = build(case, model.named_parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8**step)
    train(case, optimizer, model, x, y, steps=4, scheduler=scheduler)
    first = optimizer.param_groups[0]
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(mup_lr(group["params"][0], case.rule, case.lr) * 0.8**4, rel=1e-12)
        assert group["lr"] / first["lr"] == pytest.approx(group["mup_lr_mult"] / first["mup_lr_mult"], rel=1e-12)
    if isinstance(optimizer, msf.ScheduleFreeWrapper):
        assert [g["lr"] for g in optimizer.base.param_groups] == [g["lr"] for g in optimizer.param_groups]


# ---------------------------------------------------------------- ckp1: one averaging weight for all groups


def published_ckp1(lrs: list[float], r: float = 0.0, weight_lr_power: float = 2.0) -> list[float]:
    """The published schedulefree formula: ckp1 = w_k / sum(w), w_k = (k+1)^r lr_max^power, absolute lrs."""
    lr_max, weight_sum, out = -1.0, 0.0, []
    for k, lr in enumerate(lrs):
        lr_max = max(lr, lr_max)
        weight = ((k + 1) ** r) * (lr_max**weight_lr_power)
        weight_sum += weight
        out.append(weight / weight_sum)
    return out


class Ckp1Spy:
    """Records the ckp1 of every call of a function, per optimizer step."""

    def __init__(self, function: Callable[..., Any], from_result: bool) -> None:
        self.function, self.from_result, self.steps = function, from_result, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.function(*args, **kwargs)
        self.steps[-1].append(result[1] if self.from_result else kwargs["ckp1"])
        return result


def spy_on_ckp1(monkeypatch: pytest.MonkeyPatch, optimizer: torch.optim.Optimizer, rule: str) -> Ckp1Spy:
    """Ours: the ``ckp1`` argument of kernels.adam_step_/sgd_step_; wrapper: advance_schedule's result."""
    if isinstance(optimizer, msf.ScheduleFreeWrapper):
        spy = Ckp1Spy(wrapper_module.advance_schedule, from_result=True)
        monkeypatch.setattr(wrapper_module, "advance_schedule", spy)
    else:
        name = "adam_step_" if rule == "adam" else "sgd_step_"
        spy = Ckp1Spy(getattr(kernels, name), from_result=False)
        monkeypatch.setattr(kernels, name, spy)
    return spy


def assert_one_ckp1_per_step(spy: Ckp1Spy, optimizer: torch.optim.Optimizer, prefix: str) -> None:
    n_groups = len(optimizer.param_groups)
    assert n_groups >= 3, "precondition: several muP groups"
    for step, values in enumerate(spy.steps):
        assert len(values) >= n_groups, f"step {step}: some group never reached the update"
        assert len(set(values)) == 1, f"step {step}: ckp1 differs between groups: {values}"
    assert len({g[prefix + "k"] for g in optimizer.param_groups}) == 1, "k"
    for key in ("weight_sum", "lr_max"):
        assert len({g[prefix + "averaging"][key] for g in optimizer.param_groups}) == 1, key


WARMUP_FACTORIES = {
    "MuAdamW_ScheduleFree": (msf.MuAdamW_ScheduleFree, "adam", LR_ADAM),
    "MuSGD_ScheduleFree": (msf.MuSGD_ScheduleFree, "sgd", LR_SGD),
    "MuAdamW_ScheduleFreeClosure": (msf.MuAdamW_ScheduleFreeClosure, "adam", LR_ADAM),
}


@pytest.mark.parametrize("name", list(WARMUP_FACTORIES))
def test_ckp1_is_bit_identical_in_every_group_with_builtin_warmup(monkeypatch, name):
    """Oracle: exact equality across groups of the ckp1 passed to the update kernel at each of 10
    steps (warmup_steps=5, width 24 / ff 48: lr multipliers 1/3, 1/6, 0.5, 2, 3, 6), and of the
    bookkeeping that determines it. The published formula, fed the same absolute group lrs, is
    NOT bit-identical across groups for these numbers (checked here), and our ckp1 equals it
    to rel. 1e-12 (same quantity, computed scale-free)."""
    factory, rule, lr = WARMUP_FACTORIES[name]
    case = Case(partial(factory, warmup_steps=5), rule, "closure" if name.endswith("Closure") else "primal", lr)
    model = mixed_net(24, 48)
    x, y = regression_data(5, 3)
    optimizer = build(case, model.named_parameters())
    spy = spy_on_ckp1(monkeypatch, optimizer, rule)
    for _ in range(10):
        spy.steps.append([])
        train(case, optimizer, model, x, y, steps=1)
    assert_one_ckp1_per_step(spy, optimizer, prefix="")

    schedules = [[g["lr"] * warmup_multiplier(k, 5) for k in range(10)] for g in optimizer.param_groups]
    published = [published_ckp1(lrs) for lrs in schedules]
    assert any(len(set(column)) > 1 for column in zip(*published)), "published formula agrees bitwise here"
    assert [values[0] for values in spy.steps] == pytest.approx(published[0], rel=1e-12)


LAMBDALR_CASES = ["ours-AdamW", "ours-SGD", "wrapper-Adam", "wrapper-SGD"]


@pytest.mark.parametrize("name", LAMBDALR_CASES)
def test_ckp1_is_bit_identical_in_every_group_under_a_lambdalr_warmup(monkeypatch, name):
    """Oracle: exact equality across groups of ckp1 at each of 10 steps when the warmup comes from
    torch's LambdaLR (factor min(1, (step + 1) / 5)), the only way to warm up the wrapper. The
    groups' lrs still differ by constant muP factors, so the averaging weight must not differ."""
    case = CASES[name]
    model = mixed_net(24, 48)
    x, y = regression_data(5, 3)
    optimizer = build(case, model.named_parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    spy = spy_on_ckp1(monkeypatch, optimizer, case.rule)
    for _ in range(10):
        spy.steps.append([])
        train(case, optimizer, model, x, y, steps=1, scheduler=scheduler)
    prefix = "sf_" if isinstance(optimizer, msf.ScheduleFreeWrapper) else ""
    assert_one_ckp1_per_step(spy, optimizer, prefix=prefix)


# ---------------------------------------------------------------- the inputs users have


@pytest.mark.parametrize("rule, factory", [("adam", msf.MuAdamW_ScheduleFree), ("sgd", msf.MuSGD_ScheduleFree)])
def test_plain_parameter_iterator_is_grouped_by_mup_role(rule, factory):
    """Oracle: mup_lr / mup_wd on each parameter; a generator of bare tensors works (no names)."""
    model = mixed_net(24, 48)
    optimizer = factory(model.parameters(), lr=0.01, weight_decay=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    for group in optimizer.param_groups:
        assert "param_names" not in group
        for p in group["params"]:
            assert (group["lr"], group["weight_decay"]) == (mup_lr(p, rule, 0.01), mup_wd(p, rule, 0.1))


@pytest.mark.parametrize("rule, factory", [("adam", msf.MuAdamW_ScheduleFree), ("sgd", msf.MuSGD_ScheduleFree)])
def test_group_dicts_keep_user_keys_and_a_zero_decay_stays_zero(rule, factory):
    """Oracle: the user's groups. Every sub-group of the norms group keeps weight_decay 0 and
    name 'norms'; the other group keeps its own lr (muP-scaled) and name, its decay is scaled."""
    model = mixed_net(24, 48)
    no_decay, decay = split_norms(model)
    groups = [{"params": decay, "lr": 0.03, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "norms", "betas_note": (1, 2)}]
    optimizer = factory(groups, lr=0.01, weight_decay=0.1)
    names = {"decay": {n for n, _ in decay}, "norms": {n for n, _ in no_decay}}
    for group in optimizer.param_groups:
        assert set(group["param_names"]) <= names[group["name"]]
        for p in group["params"]:
            if group["name"] == "norms":
                assert (group["weight_decay"], group["betas_note"]) == (0.0, (1, 2))
                assert group["lr"] == mup_lr(p, rule, 0.01)
            else:
                assert (group["lr"], group["weight_decay"]) == (mup_lr(p, rule, 0.03), mup_wd(p, rule, 0.1))
    assert {g["name"] for g in optimizer.param_groups} == {"decay", "norms"}


def test_named_parameters_give_groups_torch_param_names():
    """Oracle: model.named_parameters(); each group's param_names align with its params."""
    model = mixed_net(24, 48)
    by_name = dict(model.named_parameters())
    optimizer = msf.MuSGD_ScheduleFree(model.named_parameters(), lr=0.1)
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(by_name)
    for group in optimizer.param_groups:
        assert all(by_name[n] is p for n, p in zip(group["param_names"], group["params"], strict=True))


# ---------------------------------------------------------------- stable groups


@pytest.mark.parametrize("factory", [msf.MuAdamW_ScheduleFree, msf.MuSGD_ScheduleFree, msf.MuScheduleFreeWrapper])
def test_the_same_model_built_twice_gives_the_same_group_signatures(factory):
    """Oracle: a second build from another seed; group order, muP keys, lrs, decays, names and
    shapes all equal (grouping depends on shapes, never on values or ids)."""
    first = factory(mixed_net(24, 48, seed=0).named_parameters(), lr=0.01, weight_decay=0.1)
    second = factory(mixed_net(24, 48, seed=3).named_parameters(), lr=0.01, weight_decay=0.1)
    assert signature(first) == signature(second)
    assert len(first.param_groups) >= 3


def test_sgd_rule_state_dict_is_refused_by_an_adam_rule_optimizer():
    """Oracle: MuSGD_ScheduleFree and MuAdamW_ScheduleFree group the same model differently
    (6 vs 3 groups here), so the muP guard must refuse the cross load."""
    model = mixed_net(24, 48)
    sgd = msf.MuSGD_ScheduleFree(model.named_parameters(), lr=0.1)
    adam = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=0.01)
    with pytest.raises(ValueError, match="muP grouping"):
        adam.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="muP grouping"):
        sgd.load_state_dict(adam.state_dict())


def test_state_dict_of_a_plain_torch_optimizer_is_refused():
    """Oracle: a torch.optim.Adam state dict has no muP signature, even with matching group count."""
    model = mixed_net(24, 24)
    mu = msf.MuAdamW_ScheduleFree(model.parameters(), impl=torch.optim.Adam, lr=0.01)
    plain = torch.optim.Adam([{"params": g["params"]} for g in mu.param_groups], lr=0.01)
    with pytest.raises(ValueError, match="no muP signature"):
        mu.load_state_dict(plain.state_dict())


# ---------------------------------------------------------------- weight-decay coupling


def test_weight_decay_follows_the_decay_lr_power():
    """Oracle: mup_wd (q = 1, exact), its square relative to the base decay (q = 2, explicit or
    a class attribute ``decay_lr_power = 2``, rel. 1e-14), and no scaling (decoupled_wd=True)."""
    class AdamC(torch.optim.AdamW):
        decay_lr_power = 2

    model = mixed_net(24, 48)
    builds = {
        1: msf.MuAdamW_ScheduleFree(model.parameters(), impl=torch.optim.AdamW, lr=0.01, weight_decay=0.1),
        2: msf.MuAdamW_ScheduleFree(model.parameters(), impl=torch.optim.AdamW, lr=0.01, weight_decay=0.1,
                                    decay_lr_power=2),
        "class": msf.MuAdamW_ScheduleFree(model.parameters(), impl=AdamC, lr=0.01, weight_decay=0.1),
        0: msf.MuAdamW_ScheduleFree(model.parameters(), impl=torch.optim.AdamW, lr=0.01, weight_decay=0.1,
                                    decoupled_wd=True),
    }
    for q, optimizer in builds.items():
        for group in optimizer.param_groups:
            coupled = mup_wd(group["params"][0], "adam", 0.1)
            squared = pytest.approx(0.1 * (coupled / 0.1) ** 2, rel=1e-14)
            assert group["weight_decay"] == {1: coupled, 2: squared, "class": squared, 0: 0.1}[q], q
            assert group["lr"] == mup_lr(group["params"][0], "adam", 0.01)
    assert {g["weight_decay"] for g in builds[1].param_groups} == {0.1 * 3.0, 0.1 * 6.0, 0.1}


@pytest.mark.parametrize("width, ff", [(24, 48), (48, 40)])
@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_reference_wrapper_groups_equal_those_of_mup_muadam_and_musgd(rule, width, ff):
    """Oracle: mup 1.0.0's MuAdam / MuSGD with the same torch impl on the same model. The reference
    wrapper's groups (shared with its base) have the same parameters, lrs and weight decays (exact
    float equality), and weight_decay_at_y scales as weight_decay does, as in MuScheduleFreeWrapper."""
    impl, reference = {"adam": (torch.optim.Adam, mup.MuAdam), "sgd": (torch.optim.SGD, mup.MuSGD)}[rule]
    model = mixed_net(width, ff)
    ours = msf.MuScheduleFreeWrapperReference(model.parameters(), impl, lr=0.01, weight_decay=0.1,
                                              weight_decay_at_y=0.2, momentum=0.8)
    fast = msf.MuScheduleFreeWrapper(model.parameters(), impl, lr=0.01, weight_decay=0.1, weight_decay_at_y=0.2)
    theirs = reference(model.parameters(), impl=impl, lr=0.01, weight_decay=0.1)

    def describe(optimizer, key="weight_decay"):
        return [([id(p) for p in g["params"]], g["lr"], g[key]) for g in optimizer.param_groups if g["params"]]

    assert type(ours) is msf.ScheduleFreeWrapperReference and ours.param_groups is not ours.base.param_groups
    assert all(a is b for a, b in zip(ours.param_groups, ours.base.param_groups))
    assert describe(ours) == describe(theirs)
    assert describe(ours, "weight_decay_at_y") == describe(fast, "weight_decay_at_y")
    assert {g["sf_momentum"] for g in ours.param_groups} == {0.8}
    assert len({g["lr"] for g in theirs.param_groups}) > 1, "precondition: the model has several muP lrs"


def test_wrapper_scales_both_decays_like_coupled_decay():
    """Oracle: mup_wd for the base optimizer's weight_decay and for weight_decay_at_y (both are
    multiplied by lr), and neither scaled with decoupled_wd=True."""
    model = mixed_net(24, 48)
    coupled = msf.MuScheduleFreeWrapper(model.parameters(), torch.optim.SGD, lr=0.1, weight_decay=0.01,
                                        weight_decay_at_y=0.2)
    decoupled = msf.MuScheduleFreeWrapper(model.parameters(), torch.optim.SGD, lr=0.1, weight_decay=0.01,
                                          weight_decay_at_y=0.2, decoupled_wd=True)
    for group in coupled.param_groups:
        p = group["params"][0]
        assert (group["weight_decay"], group["weight_decay_at_y"]) == (mup_wd(p, "sgd", 0.01), mup_wd(p, "sgd", 0.2))
    assert {(g["weight_decay"], g["weight_decay_at_y"]) for g in decoupled.param_groups} == {(0.01, 0.2)}


@pytest.mark.parametrize("factory", [msf.MuAdamW_ScheduleFree, msf.MuScheduleFreeWrapper])
def test_decoupled_decay_with_lr_squared_decay_raises_naming_both(factory):
    """Oracle: decoupled_wd=True means q = 0, which contradicts decay_lr_power=2."""
    with pytest.raises(ValueError, match=r"decoupled_wd.*decay_lr_power"):
        factory(mixed_net().parameters(), lr=0.01, decoupled_wd=True, decay_lr_power=2)


# ---------------------------------------------------------------- errors


FACTORIES = [msf.MuAdamW_ScheduleFree, msf.MuRAdam_ScheduleFree, msf.MuSGD_ScheduleFree,
             msf.MuAdamW_ScheduleFreeClosure, msf.MuRAdam_ScheduleFreeClosure, msf.MuSGD_ScheduleFreeClosure,
             msf.MuAdamW_ScheduleFreeReference, msf.MuSGD_ScheduleFreeReference, msf.MuScheduleFreeWrapper,
             msf.MuAdamC_ScheduleFreePlus, msf.MuRAdam_ScheduleFreeReference, msf.MuAdamW_ScheduleFreePaper,
             msf.MuAdamW_ScheduleFreePaperReference]
FACTORY_PARAMS = [pytest.param(f, id=f.__name__) for f in FACTORIES]


@pytest.mark.parametrize("factory", FACTORY_PARAMS)
def test_parameter_without_infshape_is_named_and_points_to_set_base_shapes(factory):
    """Oracle: copy.deepcopy drops p.infshape; the error names the first parameter (by name when
    named, by index and shape otherwise) and says to call mup.set_base_shapes."""
    clone = copy.deepcopy(mixed_net())
    assert not hasattr(clone.inp.weight, "infshape"), "precondition: deepcopy drops infshape"
    with pytest.raises(ValueError, match=r"'inp\.weight'.*mup\.set_base_shapes"):
        factory(clone.named_parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"#0 \(shape \(24, 5\)\).*mup\.set_base_shapes"):
        factory(clone.parameters(), lr=0.01)


@pytest.mark.parametrize("factory", [msf.MuAdamW_ScheduleFree, msf.MuSGD_ScheduleFree, msf.MuScheduleFreeWrapper])
def test_infshapes_mapping_gives_the_original_groups_after_deepcopy(factory):
    """Oracle: the optimizer built on the original model (same signature list)."""
    model = mixed_net(24, 48)
    shapes = mup.get_infshapes(model)
    clone = copy.deepcopy(model)
    original = factory(model.named_parameters(), lr=0.01, weight_decay=0.1)
    restored = factory(clone.named_parameters(), lr=0.01, weight_decay=0.1, infshapes=shapes)
    assert signature(restored) == signature(original)


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "pathlib"])
@pytest.mark.parametrize("factory", [msf.MuAdamW_ScheduleFree, msf.MuSGD_ScheduleFree])
def test_base_shape_file_gives_the_original_groups_after_deepcopy(tmp_path, factory, as_path):
    """Oracle: the optimizer built on the original model. The file is written by
    mup.make_base_shapes(base, delta, savefile=tmp_path / ...) and passed as str or pathlib.Path."""
    model = mixed_net(24, 48)
    path = tmp_path / "mixed.bsh"
    mup.make_base_shapes(MixedNet(8, 8), MixedNet(16, 16), savefile=path)
    clone = copy.deepcopy(model)
    original = factory(model.named_parameters(), lr=0.01, weight_decay=0.1)
    restored = factory(clone.named_parameters(), lr=0.01, weight_decay=0.1,
                       infshapes=path if as_path else str(path))
    assert signature(restored) == signature(original)


def test_infshapes_need_named_parameters_and_every_name():
    """Oracle: infshapes is looked up by name: unnamed parameters raise, a missing name is named."""
    model = mixed_net()
    shapes = mup.get_infshapes(model)
    clone = copy.deepcopy(model)
    with pytest.raises(ValueError, match="named_parameters"):
        msf.MuAdamW_ScheduleFree(clone.parameters(), lr=0.01, infshapes=shapes)
    del shapes["up.bias"]
    with pytest.raises(ValueError, match=r"'up\.bias' is missing from infshapes"):
        msf.MuAdamW_ScheduleFree(clone.named_parameters(), lr=0.01, infshapes=shapes)


def test_wrapper_needs_a_rule_for_an_unknown_base_class():
    """Oracle: only torch.optim's Adam-like and SGD-like classes have a known rule; Adadelta has
    none, so the error asks for ``rule``; with rule given it builds."""
    with pytest.raises(ValueError, match="rule"):
        msf.MuScheduleFreeWrapper(mixed_net().parameters(), torch.optim.Adadelta, lr=1.0)
    wrapper = msf.MuScheduleFreeWrapper(mixed_net().parameters(), torch.optim.Adadelta, rule="adam", lr=1.0)
    assert {g["mup_rule"] for g in wrapper.param_groups} == {"adam"}


def test_empty_or_bare_tensor_params_are_rejected():
    """Oracle: torch.optim's own contract (an iterable of tensors, non-empty)."""
    with pytest.raises(ValueError, match="empty"):
        msf.MuAdamW_ScheduleFree([], lr=0.01)
    with pytest.raises(TypeError, match="Tensor"):
        msf.MuAdamW_ScheduleFree(mixed_net().inp.weight, lr=0.01)


# ---------------------------------------------------------------- bad arguments: named, refused before any build


def mu_optimizer_adam(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """mu_optimizer with the Adam rule and our AdamW, called like a factory."""
    return msf.mu_optimizer(params, kwargs.pop("impl", msf.AdamWScheduleFree), "adam", **kwargs)


ALL_FACTORIES = [*FACTORY_PARAMS, pytest.param(mu_optimizer_adam, id="mu_optimizer")]
IMPL_ARGUMENT = {msf.MuScheduleFreeWrapper: "base_impl"}  # every other factory calls it impl


def not_an_optimizer(groups: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """A function that builds an optimizer: callable like a class, but not one."""
    return torch.optim.Adam(groups, **kwargs)


NON_NUMBERS = [pytest.param(None, id="None"), pytest.param("1e-2", id="str"), pytest.param(True, id="bool"),
               pytest.param([0.01], id="list")]
NON_CLASSES = [pytest.param(torch.nn.Linear, id="nn.Linear"), pytest.param(42, id="int"),
               pytest.param(not_an_optimizer, id="function"), pytest.param("Adam", id="str")]


def assert_names(message: str, name: str, value: Any) -> None:
    """The project's dialect: one line, ``Invalid <name>: <repr(value)> (...)``."""
    assert "\n" not in message
    assert message.startswith(f"Invalid {name}: {value!r} ("), message


@pytest.mark.parametrize("value", NON_NUMBERS)
@pytest.mark.parametrize("name", ["lr", "weight_decay"])
@pytest.mark.parametrize("factory", ALL_FACTORIES)
def test_non_number_lr_or_weight_decay_raises_type_error_naming_it_before_params_are_read(factory, name, value):
    """Oracle: the value given. TypeError whose one-line message names the argument and repeats
    the value (a bool is not a number); the params generator is still unread afterwards, so the
    check came before any group was built."""
    model = mixed_net()
    params = model.parameters()
    with pytest.raises(TypeError) as error:
        factory(params, **{"lr": 0.01, "weight_decay": 0.0, name: value})
    assert_names(str(error.value), name, value)
    assert len(list(params)) == len(list(model.parameters()))


@pytest.mark.parametrize("value", NON_CLASSES)
@pytest.mark.parametrize("factory", ALL_FACTORIES)
def test_impl_that_is_not_an_optimizer_class_raises_type_error_naming_it(factory, value):
    """Oracle: the value given. nn.Linear is a class but not a torch.optim.Optimizer; 42 and a
    function are not classes. TypeError naming ``impl`` (``base_impl`` for the wrapper)."""
    name = IMPL_ARGUMENT.get(factory, "impl")
    params = mixed_net().parameters()
    with pytest.raises(TypeError) as error:
        factory(params, lr=0.01, **{name: value})
    assert_names(str(error.value), name, value)
    assert "torch.optim.Optimizer" in str(error.value)
    assert len(list(params)) > 0


@pytest.mark.parametrize("value", NON_NUMBERS)
@pytest.mark.parametrize("name", ["weight_decay_at_y", "momentum", "weight_lr_power", "r"])
def test_wrapper_refuses_a_non_number_for_its_own_arguments(name, value):
    """Oracle: the value given; the wrapper factory's numeric arguments are checked like lr."""
    params = mixed_net().parameters()
    with pytest.raises(TypeError) as error:
        msf.MuScheduleFreeWrapper(params, torch.optim.SGD, lr=0.1, **{name: value})
    assert_names(str(error.value), name, value)
    assert len(list(params)) > 0


@pytest.mark.parametrize("factory", ALL_FACTORIES)
def test_decoupled_wd_and_decay_lr_power_of_the_wrong_kind_are_named(factory):
    """Oracle: decoupled_wd is a bool, decay_lr_power the int 0, 1 or 2 (True and 1.0 are not)."""
    for kwargs, name, value, kind in [({"decoupled_wd": "yes"}, "decoupled_wd", "yes", TypeError),
                                      ({"decay_lr_power": True}, "decay_lr_power", True, ValueError),
                                      ({"decay_lr_power": 1.0}, "decay_lr_power", 1.0, ValueError)]:
        with pytest.raises(kind) as error:
            factory(mixed_net().parameters(), lr=0.01, **kwargs)
        assert_names(str(error.value), name, value)


@pytest.mark.parametrize("factory", ALL_FACTORIES)
def test_tensor_numpy_and_int_hyperparameters_give_the_groups_of_the_float(factory):
    """Oracle: the same factory with lr=0.5, weight_decay=0.25 as Python floats (both exact in
    float32). A 0-dim or 1-element tensor lr (torch.optim accepts one) and a numpy lr give equal
    group lrs (exact: the base lr becomes a float before scaling) and an int lr the float's. A
    tensor decay is scaled as a float32 tensor (rel. 1e-7 of the float's)."""
    def groups(lr: Any, weight_decay: Any) -> list[tuple[float, float]]:
        optimizer = factory(mixed_net(24, 48).parameters(), lr=lr, weight_decay=weight_decay)
        return [(float(g["lr"]), float(g["weight_decay"])) for g in optimizer.param_groups]

    expected = groups(0.5, 0.25)
    for lr in (torch.tensor(0.5), torch.tensor([0.5]), np.float64(0.5), np.float32(0.5)):
        assert groups(lr, np.float64(0.25)) == expected, repr(lr)
    assert groups(1, 0) == groups(1.0, 0.0)
    tensor_decay = groups(0.5, torch.tensor(0.25))
    assert [lr for lr, _ in tensor_decay] == [lr for lr, _ in expected]
    assert [wd for _, wd in tensor_decay] == pytest.approx([wd for _, wd in expected], rel=1e-7)


# Which factory follows which package class (each factory's default impl), and its rule: the oracle
# for the suggestion in the rule-contradiction error.
FACTORY_OF = {
    msf.AdamWScheduleFree: ("MuAdamW_ScheduleFree", "adam"),
    msf.RAdamScheduleFree: ("MuRAdam_ScheduleFree", "adam"),
    msf.SGDScheduleFree: ("MuSGD_ScheduleFree", "sgd"),
    msf.AdamWScheduleFreeClosure: ("MuAdamW_ScheduleFreeClosure", "adam"),
    msf.RAdamScheduleFreeClosure: ("MuRAdam_ScheduleFreeClosure", "adam"),
    msf.SGDScheduleFreeClosure: ("MuSGD_ScheduleFreeClosure", "sgd"),
    msf.AdamWScheduleFreeReference: ("MuAdamW_ScheduleFreeReference", "adam"),
    msf.SGDScheduleFreeReference: ("MuSGD_ScheduleFreeReference", "sgd"),
    msf.AdamWScheduleFreePaper: ("MuAdamW_ScheduleFreePaper", "adam"),
    msf.RAdamScheduleFreeReference: ("MuRAdam_ScheduleFreeReference", "adam"),
    msf.AdamWScheduleFreePaperReference: ("MuAdamW_ScheduleFreePaperReference", "adam"),
}
# MuAdamC_ScheduleFreePlus is a factory of the Adam rule but no entry above: the other factories
# refuse ScheduleFree+ with their own error (tests/test_adamc_plus_mup.py), not a rule contradiction.
RULE_OF_FACTORY = {name: rule for name, rule in FACTORY_OF.values()} | {"MuAdamC_ScheduleFreePlus": "adam"}
CONTRADICTIONS = [pytest.param(getattr(msf, factory), impl, FACTORY_OF[impl][0], id=f"{factory}-{impl.__name__}")
                  for factory, rule in RULE_OF_FACTORY.items() for impl, (_, impl_rule) in FACTORY_OF.items()
                  if impl_rule != rule]
# torch's and the published classes: the suggestion is the other rule's factory in the same form.
CONTRADICTIONS += [
    pytest.param(msf.MuAdamW_ScheduleFree, torch.optim.SGD, "MuSGD_ScheduleFree", id="MuAdamW-torch.SGD"),
    pytest.param(msf.MuSGD_ScheduleFreeClosure, torch.optim.AdamW, "MuAdamW_ScheduleFreeClosure",
                 id="MuSGD_Closure-torch.AdamW"),
    pytest.param(msf.MuRAdam_ScheduleFree, schedulefree.SGDScheduleFree, "MuSGD_ScheduleFree",
                 id="MuRAdam-published.SGD"),
    pytest.param(msf.MuSGD_ScheduleFreeReference, schedulefree.AdamWScheduleFreeReference,
                 "MuAdamW_ScheduleFreeReference", id="MuSGD_Reference-published.AdamWReference"),
    pytest.param(msf.MuAdamW_ScheduleFreePaper, torch.optim.SGD, "MuSGD_ScheduleFree", id="MuAdamW_Paper-torch.SGD"),
]


@pytest.mark.parametrize("factory, impl, suggested", CONTRADICTIONS)
def test_impl_following_the_other_rule_raises_naming_both_rules_and_the_right_factory(factory, impl, suggested):
    """Oracle: FACTORY_OF (each factory's rule and the factory built for each package class).
    ValueError, one line, naming the factory, impl, both rules and the factory to use instead
    and the mu_optimizer override; the params generator is still unread."""
    rule = RULE_OF_FACTORY[factory.__name__]
    other = {"adam": "sgd", "sgd": "adam"}[rule]
    params = mixed_net().parameters()
    with pytest.raises(ValueError) as error:
        factory(params, impl=impl, lr=0.01)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{factory.__name__} uses the {rule!r} rule but impl={impl.__name__} follows the "
                              f"{other!r} rule: use {suggested}, or "), message
    assert f"mu_optimizer(params, impl, rule={rule!r})" in message
    assert len(list(params)) > 0


@pytest.mark.parametrize("impl, forced", [(msf.SGDScheduleFree, "adam"), (msf.AdamWScheduleFreeClosure, "sgd"),
                                          (torch.optim.Adam, "sgd")])
def test_mu_optimizer_rule_overrides_the_rule_of_impl(impl, forced):
    """Oracle: mup_lr / mup_wd under the forced rule (exact); the explicit rule is obeyed."""
    model = mixed_net(24, 48)
    optimizer = msf.mu_optimizer(model.parameters(), impl, forced, lr=0.01, weight_decay=0.1)
    for group in optimizer.param_groups:
        assert group["mup_rule"] == forced
        for p in group["params"]:
            assert (group["lr"], group["weight_decay"]) == (mup_lr(p, forced, 0.01), mup_wd(p, forced, 0.1))


@pytest.mark.parametrize("rule, factory", [("adam", msf.MuAdamW_ScheduleFree), ("sgd", msf.MuSGD_ScheduleFree)])
def test_impl_of_unknown_rule_takes_the_factory_rule_as_before(rule, factory):
    """Oracle: mup_lr under the factory's rule. torch.optim.Adadelta has no known muP rule, so
    either factory builds with its own rule (no contradiction can be detected)."""
    model = mixed_net(24, 48)
    optimizer = factory(model.parameters(), impl=torch.optim.Adadelta, lr=1.0)
    for group in optimizer.param_groups:
        assert group["mup_rule"] == rule
        assert all(group["lr"] == mup_lr(p, rule, 1.0) for p in group["params"])


@pytest.mark.parametrize("base_impl, rule", [(torch.optim.SGD, "sgd"), (torch.optim.Adam, "adam")],
                         ids=["torch.SGD", "torch.Adam"])
def test_wrapper_infers_its_rule_from_the_base_class(base_impl, rule):
    """Oracle: the base class's known rule (torch's classes by kind); an explicit rule still
    overrides it."""
    wrapper = msf.MuScheduleFreeWrapper(mixed_net(24, 48).parameters(), base_impl, lr=0.01)
    assert {g["mup_rule"] for g in wrapper.param_groups} == {rule}
    other = {"adam": "sgd", "sgd": "adam"}[rule]
    forced = msf.MuScheduleFreeWrapper(mixed_net(24, 48).parameters(), base_impl, rule=other, lr=0.01)
    assert {g["mup_rule"] for g in forced.param_groups} == {other}


@pytest.mark.parametrize("base_impl", [msf.SGDScheduleFree, msf.RAdamScheduleFree], ids=lambda c: c.__name__)
def test_wrapper_refuses_a_base_class_that_is_already_schedule_free(base_impl):
    """The two would keep their averaging under the same group keys; the error names the base."""
    with pytest.raises(TypeError, match=rf"base is already schedule-free \({base_impl.__name__}\)"):
        msf.MuScheduleFreeWrapper(mixed_net(24, 48).parameters(), base_impl, lr=0.01)
