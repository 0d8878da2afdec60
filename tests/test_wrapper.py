"""ScheduleFreeWrapper's own passes: no parameter-sized temporaries, every dtype, and no lost state
(and ScheduleFreeWrapperReference's failed base step).

The generic suite (test_optimizers_generic.py) already holds the wrapper to the published wrapper's
trajectory and its fused path to its eager one; these are the claims specific to the passes it
runs around an opaque base step.
"""
from __future__ import annotations

import copy

import pytest
import torch

from memory_probe import largest_allocation_bytes
from mup_schedulefree import ScheduleFreeWrapper, ScheduleFreeWrapperReference, native
from optim_infos import assert_bitwise_equal

SHAPES = [(256, 512), (512,), (64, 256)]


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape in SHAPES]


def _give_grads(params: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.skipif(not native.available(), reason="native kernels could not be built here")
@pytest.mark.parametrize("base_name", ["sgd", "adam"])
def test_fused_wrapper_step_allocates_no_parameter_sized_buffer(base_name):
    """No allocation of a warm step of the wrapper around a fused base reaches the smallest parameter
    (2 KiB, the (512,) bias). Control, showing the probe sees such buffers: the eager passes
    allocate at least one buffer the size of the largest parameter (512 KiB)."""
    largest = {}
    for fused in (True, False):
        params = _params()
        base = (torch.optim.SGD(params, lr=0.1, fused=True) if base_name == "sgd"
                else torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.999), fused=True))
        opt = ScheduleFreeWrapper(base, weight_decay_at_y=0.01, fused=fused)
        _give_grads(params, seed=1)
        opt.step()  # state creation happens here, outside the probe
        _give_grads(params, seed=2)
        largest[fused] = largest_allocation_bytes(opt.step)
    smallest_param = min(torch.Size(s).numel() for s in SHAPES) * 4
    largest_param = max(torch.Size(s).numel() for s in SHAPES) * 4
    assert largest[True] < smallest_param, f"fused step allocated {largest[True]} bytes"
    assert largest[False] >= largest_param, f"eager control allocated only {largest[False]} bytes"


def _trajectory(dtype: torch.dtype, fused: bool, steps: int = 20) -> list[torch.Tensor]:
    params = _params(dtype)
    opt = ScheduleFreeWrapper(torch.optim.Adam(params, lr=1e-2, betas=(0.0, 0.999)), weight_decay_at_y=0.05,
                              fused=fused)
    for k in range(steps):
        _give_grads(params, seed=10 + k)
        opt.step()
    opt.eval()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_without_native_support_take_the_eager_passes_and_match_them(dtype):
    """fused=True on float64 or bfloat16 parameters runs the eager passes (the native kernels take float32
    only) and gives exactly the fused=False trajectory; float32 runs natively within 1e-6 of eager."""
    for a, b in zip(_trajectory(dtype, fused=True), _trajectory(dtype, fused=False)):
        assert torch.equal(a, b)
    for a, b in zip(_trajectory(torch.float32, fused=True), _trajectory(torch.float32, fused=False)):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


class _FailingSGD(torch.optim.SGD):
    """SGD whose step raises on its third call, before touching any parameter."""

    calls = 0

    def step(self, closure=None):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("base optimizer failed")
        return super().step(closure)


def test_base_step_that_raises_leaves_y_z_and_schedule_in_place():
    """If the base step raises, the wrapper puts y back in the parameters (to float32 rounding of the
    round trip through x, 1e-6 relative) and z back in its slot (exactly), leaves its averaging
    schedule where it was, re-raises, and the next step trains on as usual."""
    params = _params()
    opt = ScheduleFreeWrapper(_FailingSGD(params, lr=0.1), momentum=0.9)
    for k in range(2):
        _give_grads(params, seed=20 + k)
        opt.step()
    y_before = [p.detach().clone() for p in params]
    z_before = [opt.state[p]["z"].clone() for p in params]
    schedule_before = {key: value for key, value in opt.param_groups[0].items() if key.startswith("sf_")}
    _give_grads(params, seed=22)
    with pytest.raises(RuntimeError, match="base optimizer failed"):
        opt.step()
    for p, y, z in zip(params, y_before, z_before):
        assert (p.detach() - y).abs().max() <= 1e-6 * y.abs().max()
        assert torch.equal(opt.state[p]["z"], z)
    assert {key: value for key, value in opt.param_groups[0].items() if key.startswith("sf_")} == schedule_before
    assert opt.train_mode
    opt.step()
    assert all(not torch.equal(opt.state[p]["z"], z) for p, z in zip(params, z_before)), "z did not move"


@pytest.mark.parametrize("failing_step", [1, 3])
def test_reference_base_step_that_raises_changes_nothing(failing_step):
    """ScheduleFreeWrapperReference whose base raises at its first or a later step, with a decay at
    y (which the published form subtracts from z before the base step): the parameters hold y
    again and the wrapper's state_dict is bitwise what it was (no state left from a first step that
    failed, z not decayed, schedule not advanced); the next step trains on.
    Oracle: copies taken before the failing step (torch.equal)."""
    params = _params()
    base = _FailingSGD(params, lr=0.1)
    opt = ScheduleFreeWrapperReference(base, momentum=0.9, weight_decay_at_y=0.1)
    for k in range(failing_step - 1):
        _give_grads(params, seed=20 + k)
        opt.step()
    y_before = [p.detach().clone() for p in params]
    saved_before = copy.deepcopy(opt.state_dict())
    _give_grads(params, seed=30)
    base.calls = 2  # the next base step is its third: it raises
    with pytest.raises(RuntimeError, match="base optimizer failed"):
        opt.step()
    for p, y in zip(params, y_before):
        assert torch.equal(p.detach(), y)
    assert_bitwise_equal(opt.state_dict(), saved_before)
    opt.step()
    assert all(not torch.equal(p.detach(), y) for p, y in zip(params, y_before)), "the next step did not train"
