"""Every class takes the published ``schedulefree`` 1.4.1 class's arguments: names, order, defaults.

Code written for the published package passes hyperparameters positionally as often as by
keyword, so the check is mechanical: for each class of ours that the published package also
has, the published parameters are the first parameters of ours, in the same order, with the
same defaults; anything of ours comes after them. The one intended difference is ``foreach``,
whose default here is None (the native kernel on CPU, ``_foreach`` operations elsewhere), where
the published classes fix True (False for the reference form). Arguments upstream added after
1.4.1 (``UPSTREAM_ADDITIONS``, from its HEAD source) sit where upstream put them, so positional
calls written for upstream HEAD mean the same here too (tests/test_inner_momentum.py checks the
HEAD signatures themselves where the oracle is present).
"""
from __future__ import annotations

import inspect

import pytest
import schedulefree as published

import mup_schedulefree as ours

INTENDED_DEFAULTS = {"foreach": None}
# class -> (argument upstream added after 1.4.1, the published argument it follows)
UPSTREAM_ADDITIONS = {"AdamWScheduleFree": ("inner_momentum", "weight_lr_power"),
                      "AdamWScheduleFreeReference": ("inner_momentum", "decay_at_z")}
SHARED = sorted(name for name in ours.__all__ if inspect.isclass(getattr(ours, name)) and hasattr(published, name))


def _parameters(cls: type) -> list[inspect.Parameter]:
    return list(inspect.signature(cls.__init__).parameters.values())[1:]


def test_every_published_class_of_the_same_name_is_compared():
    assert len(SHARED) == 11, SHARED


@pytest.mark.parametrize("name", SHARED)
def test_published_arguments_come_first_in_the_same_order(name):
    ours_names = [p.name for p in _parameters(getattr(ours, name))]
    published_names = [p.name for p in _parameters(getattr(published, name))]
    if name in UPSTREAM_ADDITIONS:
        added, after = UPSTREAM_ADDITIONS[name]
        published_names.insert(published_names.index(after) + 1, added)
    assert ours_names[:len(published_names)] == published_names, \
        f"{name}: ours {ours_names} does not start with the published {published_names}"


@pytest.mark.parametrize("name", SHARED)
def test_published_arguments_have_the_published_defaults(name):
    ours_params = {p.name: p for p in _parameters(getattr(ours, name))}
    for theirs in _parameters(getattr(published, name)):
        expected = INTENDED_DEFAULTS.get(theirs.name, theirs.default)
        assert ours_params[theirs.name].default == expected, \
            f"{name}({theirs.name}=...): default {ours_params[theirs.name].default!r}, published {theirs.default!r}"


def test_positional_sgd_closure_arguments_mean_what_they_mean_in_the_published_class():
    import torch

    param = torch.nn.Parameter(torch.zeros(2))
    group = ours.SGDScheduleFreeClosure([param], 0.5, 0.01, 0.8).param_groups[0]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.5, 0.01, 0.8)
