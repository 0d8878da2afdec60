"""State dicts move between this package and the published ``schedulefree`` 1.4.1 without loss.

A user switching packages has live checkpoints. Each test trains with one package, saves its
``state_dict``, loads it into the other package's class of the same name, and continues; the
oracle is the saving package's own run continued without interruption (same batches, same
initial weights). Tolerance: 1e-6 relative to each tensor's largest entry, at y after every
step and at x at the end; the two packages agree to a few float32 ulp per step on these runs
(see test_parity_published.py), so 1e-6 leaves room for 12 steps and fails on any change of
schedule (a wrong averaging weight moves x by about 1e-2 here).

The averaging state is kept in the published units (``k``, ``lr_max``, ``weight_sum``) with this
package's relative record beside it, so either side continues from the other's state. State dicts
written by version 0.1 of this package (``weight_sum`` in relative units) still load:
``tests/data/state_v0_1.pt`` was written by that version (see tests/data/README.md).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from optim_infos import INFOS, assert_rel_close, param_groups, snapshot, to_eval, train_step

BEFORE, AFTER = 6, 12
RTOL = 1e-6
# The published ScheduleFreeWrapper saves only its base's state (see README); its reference form
# saves x, y and z with it, so that one switches.
SWITCHABLE = [info for info in INFOS
              if info.name.split("-")[0] != "ScheduleFreeWrapper" and info.published_factory is not None]
OLD_STATE = Path(__file__).parent / "data" / "state_v0_1.pt"


def _run_and_hand_over(info, make_model, batches, first: str):
    """Train BEFORE steps with package ``first``, then continue AFTER steps twice: uninterrupted,
    and with the state dict loaded into the other package. Returns both continued trajectories."""
    config = info.configs[0]
    builders = {"ours": info.make, "published": lambda params, cfg: info.make_published(params, cfg)}
    second = "published" if first == "ours" else "ours"
    model = make_model(0)
    opt = builders[first](param_groups(info, list(model.parameters()), config), config)
    for batch in batches[:BEFORE]:
        train_step(info, opt, model, batch)
    other_model = copy.deepcopy(model)
    other = builders[second](param_groups(info, list(other_model.parameters()), config), config)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    trajectories = []
    for this_model, this_opt in ((model, opt), (other_model, other)):
        ys = []
        for batch in batches[BEFORE:BEFORE + AFTER]:
            train_step(info, this_opt, this_model, batch)
            ys.append(snapshot(this_model.parameters()))
        to_eval(info, this_opt)
        trajectories.append((ys, snapshot(this_model.parameters())))
    return trajectories


@pytest.mark.parametrize("info", SWITCHABLE, ids=str)
@pytest.mark.parametrize("first", ["published", "ours"])
def test_a_state_dict_continues_the_same_run_in_the_other_package(info, first, make_model, make_batches):
    """Published -> ours continues the published trajectory; ours -> published continues ours."""
    (ys_ref, x_ref), (ys, x) = _run_and_hand_over(info, make_model, make_batches(BEFORE + AFTER), first)
    for step, (actual, expected) in enumerate(zip(ys, ys_ref), start=BEFORE + 1):
        assert_rel_close(actual, expected, RTOL, f"{info.name} from {first}, y at step {step}")
    assert_rel_close(x, x_ref, RTOL, f"{info.name} from {first}, x at the end")


def test_published_units_are_what_the_published_package_keeps(make_model, make_batches):
    """After the same steps, ``k``, ``lr_max`` and ``weight_sum`` equal the published optimizer's."""
    info = next(i for i in INFOS if i.name == "AdamWScheduleFree")
    config = info.configs[0]
    groups = {}
    for name, build in (("ours", info.make), ("published", info.make_published)):
        model = make_model(0)
        opt = build(param_groups(info, list(model.parameters()), config), config)
        for batch in make_batches(BEFORE):
            train_step(info, opt, model, batch)
        groups[name] = opt.param_groups
    for ours, theirs in zip(groups["ours"], groups["published"]):
        assert ours["k"] == theirs["k"]
        assert ours["lr_max"] == theirs["lr_max"]
        assert ours["weight_sum"] == pytest.approx(theirs["weight_sum"], rel=1e-12)


def _v0_1_run(name: str):
    """Model and optimizer of the run that wrote tests/data/state_v0_1.pt, built with this version."""
    import mup_schedulefree as msf

    makers = {
        "AdamWScheduleFree": lambda p: msf.AdamWScheduleFree(p, lr=0.02, warmup_steps=3, weight_decay=0.01),
        "SGDScheduleFree": lambda p: msf.SGDScheduleFree(p, lr=0.3, warmup_steps=3, weight_decay=0.01),
        "ScheduleFreeWrapper": lambda p: msf.ScheduleFreeWrapper(torch.optim.SGD(p, lr=0.3), weight_decay_at_y=0.01),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
    adam = "Adam" in name
    opt = makers[name]([{"params": [model.weight], "lr": 0.02 if adam else 0.3},
                        {"params": [model.bias], "lr": 0.01 if adam else 0.1}])
    return model, opt


def _v0_1_step(model, opt, inputs) -> None:
    opt.zero_grad()
    model(inputs).square().sum().backward()
    opt.step()


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree", "ScheduleFreeWrapper"])
def test_state_dicts_of_version_0_1_still_load_and_continue_bit_identically(name):
    """The fixture holds 5 steps on Linear(3, 2) with two groups; the oracle is the same run
    replayed with this version from scratch (same seeds, same inputs), then both go on 5 steps."""
    saved = torch.load(OLD_STATE, weights_only=True)[name]
    assert any("relative_lr_max" in key for key in saved["optimizer"]["param_groups"][0]), \
        "precondition: the fixture is in the old format"
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 3, generator=gen) for _ in range(10)]
    replay_model, replay_opt = _v0_1_run(name)
    for batch in inputs[:5]:
        _v0_1_step(replay_model, replay_opt, batch)
    loaded_model, loaded_opt = _v0_1_run(name)
    loaded_model.load_state_dict(saved["model"])
    loaded_opt.load_state_dict(saved["optimizer"])
    for step, batch in enumerate(inputs[5:], start=6):
        _v0_1_step(replay_model, replay_opt, batch)
        _v0_1_step(loaded_model, loaded_opt, batch)
        for a, b in zip(loaded_model.parameters(), replay_model.parameters()):
            assert torch.equal(a, b), f"{name}: y differs at step {step}"
    loaded_opt.eval()
    replay_opt.eval()
    for a, b in zip(loaded_model.parameters(), replay_model.parameters()):
        assert torch.equal(a, b), f"{name}: x differs"
