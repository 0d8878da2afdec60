"""Parity with upstream schedule_free at HEAD (``../shared/oracles/schedulefree_head``).

Upstream HEAD is newer than the 1.4.1 release on the package index and is not installable from it;
the shared oracle folder holds its source (see ``../shared/oracles/README.md``). It is imported
under its own name, so the installed 1.4.1 stays ``schedulefree``. A user's clone has no
``../shared``: every test here then skips, saying so.

Oracle: the upstream class of the same name with the same configuration, on an identically
initialised copy of the model with the same batches, each computing its own gradients (upstream
steps write ``p.grad``). 60 steps over three groups (lr, lr / 3 with its own weight decay where
upstream reads it per group, 2 lr with a 7-step warmup; the wrappers get a LambdaLR warmup on
their base instead), eval()/train() at steps 20, 40 and 60.

Tolerance: within 1e-5 relative to each tensor's largest entry, at y after every step and at x
after every eval(): measured 0 (eager paths, both wrapper reference configs) to 3.3e-7 (native kernel),
and a wrong schedule (ckp1, the bias correction in the lr) moves x by 1e-3 or more.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import torch

from optim_infos import (INFOS, wrapper_factory, assert_rel_close, param_groups, snapshot, to_eval, to_train,
                         train_step)

HEAD = Path(__file__).resolve().parents[1].parent / "shared" / "oracles" / "schedulefree_head" / "schedulefree"
STEPS = 60
SWITCH_AT = (20, 40, 60)
RTOL = 1e-5


def head() -> ModuleType:
    """The upstream HEAD package, imported as ``schedulefree_head`` (skips when it is absent)."""
    if "schedulefree_head" in sys.modules:
        return sys.modules["schedulefree_head"]
    if not (HEAD / "__init__.py").is_file():
        pytest.skip(f"upstream HEAD oracle not found at {HEAD} (it lives in ../shared, which a user's clone lacks)")
    spec = importlib.util.spec_from_file_location("schedulefree_head", HEAD / "__init__.py",
                                                  submodule_search_locations=[str(HEAD)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["schedulefree_head"] = module
    spec.loader.exec_module(module)
    return module


# Records compared with the HEAD class of the same name (the record's name up to its first "-").
HEAD_CLASSES = ("AdamWScheduleFreePaper", "ScheduleFreeWrapperReference")
HEAD_INFOS = [info for info in INFOS if info.name.split("-")[0] in HEAD_CLASSES]
WARMUP = 7  # steps of the LambdaLR warmup given to classes without their own warmup_steps


def _head_factory(info, module: ModuleType):
    """Build the HEAD class as the record builds the 1.4.1 one (a wrapper: the same base optimizer)."""
    name, _, base = info.name.partition("-")
    if base:
        return wrapper_factory(getattr(module, name), base.lower(), published_form=True)
    return getattr(module, name)


def _warmup(opt):
    """A linear LambdaLR warmup on the optimizer whose ``param_groups`` hold the lr (a wrapper's base)."""
    return torch.optim.lr_scheduler.LambdaLR(getattr(opt, "base", opt), lambda k: min(1.0, (k + 1) / WARMUP))


def test_the_oracle_is_upstream_head_not_the_installed_release():
    """The loaded module is the shared source, and it is not the installed ``schedulefree``."""
    module = head()
    import schedulefree

    assert Path(module.__file__).resolve() == (HEAD / "__init__.py").resolve()
    assert module is not schedulefree
    assert hasattr(module, "AdamCScheduleFreePlusPaper"), "HEAD has ScheduleFree+, the 1.4.1 release does not"


@pytest.mark.parametrize("info", HEAD_INFOS, ids=str)
def test_trajectory_matches_upstream_head_at_y_and_x(info, make_model, make_batches):
    """60 steps, 3 groups, weight decay, r > 0 in the first config, eval()/train() at 20, 40, 60;
    warmup through ``warmup_steps``, or a LambdaLR on the base for the wrapper."""
    build_head = _head_factory(info, head())
    batches = make_batches(STEPS)
    decay = info.published_reads_group_decay  # upstream's wrapper sets every group's decay at construction
    for config in info.configs:
        model_ours, model_head = make_model(0), make_model(0)
        ours = info.make(param_groups(info, list(model_ours.parameters()), config, group_decay=decay), config)
        theirs = build_head(param_groups(info, list(model_head.parameters()), config, group_decay=decay), **config)
        theirs.train()  # upstream starts in eval mode
        schedulers = [] if info.has_warmup else [_warmup(ours), _warmup(theirs)]
        for step, batch in enumerate(batches, start=1):
            train_step(info, ours, model_ours, batch)
            train_step(info, theirs, model_head, batch)
            for scheduler in schedulers:
                scheduler.step()
            where = f"{info.name} {config}, step {step}"
            assert_rel_close(snapshot(model_ours.parameters()), snapshot(model_head.parameters()), RTOL, f"y ({where})")
            if step in SWITCH_AT:
                to_eval(info, ours)
                theirs.eval()
                assert_rel_close(snapshot(model_ours.parameters()), snapshot(model_head.parameters()), RTOL,
                                 f"x ({where})")
                to_train(info, ours)
                theirs.train()
