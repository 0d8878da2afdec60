"""Parity with the published ``schedulefree`` 1.4.1 package on the semantics it gets right.

Oracle: the published class with the same configuration, run on an identically initialised copy of
the model with the same batches. Each model computes its own gradients every step (the published
step overwrites ``p.grad``, so gradients cannot be shared). The published primal, reference and
wrapper forms start in eval mode and are put in train mode first; its closure forms create state
for every parameter on the first step, which is the same trajectory here because every parameter
gets a gradient every step.

Tolerance: float32 runs agree elementwise to ``rtol=1e-5`` with ``atol=1e-6`` (parameters are
O(0.1-1); entries near zero carry the cancellation of O(1) terms, about 1e-7 each step, so the
atol is ~10 float32 ulp at 1), at every step, at y and at x.
"""
from __future__ import annotations

import pytest
import torch

from optim_infos import INFOS, OptimInfo, param_groups, to_eval, to_train, train_step

STEPS = 60
SWITCH_AT = (20, 40)
RTOL, ATOL = 1e-5, 1e-6

CASES = [pytest.param(info, impl, id=f"{info.name}-{impl}")
         for info in INFOS if info.published_factory is not None
         for impl in (("eager", "fused") if "fused" in info.flags else ("default",))]


def _assert_params_close(ours: list[torch.Tensor], theirs: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, tensor {i}: {m}")


def _state_tensors(opt, params: list[torch.Tensor], keys: tuple[str, ...]) -> list[torch.Tensor]:
    return [opt.state[p][key] for p in params for key in keys]


@pytest.mark.parametrize("info, impl", CASES)
def test_trajectory_matches_published_at_y_x_and_z(info: OptimInfo, impl: str, make_model, make_batches):
    """60 steps, 3 groups (lr, lr/3 with decay, 2 lr with warmup), r > 0, eval()/train() at steps 20 and 40.

    Oracle: schedulefree 1.4.1. Checked every step: parameters (y in train mode, x for closure
    forms) and z; at each switch and at the end also x (eval mode) and, for reference forms, the
    stored x and y.
    """
    if impl == "fused":
        from mup_schedulefree import native

        if not native.available():
            pytest.skip("mup_schedulefree.native could not be built here")
    flags = dict(fused=impl == "fused", foreach=False) if "fused" in info.flags else {}
    state_keys = ("z", "x", "y") if "Reference" in info.name else ("z",)
    batches = make_batches(STEPS)
    for config in info.published_configs:
        model_ours, model_pub = make_model(0), make_model(0)
        p_ours, p_pub = list(model_ours.parameters()), list(model_pub.parameters())
        group_decay = info.published_reads_group_decay
        opt_ours = info.make(param_groups(info, p_ours, config, group_decay=group_decay), config, **flags)
        opt_pub = info.make_published(param_groups(info, p_pub, config, group_decay=group_decay), config)
        for step, batch in enumerate(batches, start=1):
            train_step(info, opt_ours, model_ours, batch)
            train_step(info, opt_pub, model_pub, batch)
            where = f"{config}, step {step}"
            _assert_params_close(p_ours, p_pub, f"parameters ({where})")
            _assert_params_close(_state_tensors(opt_ours, p_ours, state_keys),
                                 _state_tensors(opt_pub, p_pub, state_keys), f"state {state_keys} ({where})")
            if info.has_modes and (step in SWITCH_AT or step == STEPS):
                to_eval(info, opt_ours)
                to_eval(info, opt_pub)
                _assert_params_close(p_ours, p_pub, f"x after eval() ({where})")
                to_train(info, opt_ours)
                to_train(info, opt_pub)
                _assert_params_close(p_ours, p_pub, f"y after train() ({where})")
