"""Complex parameters are updated as their real view, torch's convention for complex parameters.

torch.optim treats a complex parameter as ``torch.view_as_real`` of it: Adam's second moment then
tracks the squares of the real and imaginary parts, not ``g * g`` (a complex number whose square
can cancel) nor ``|g|^2``. The oracle for each form is the same optimizer on a real parameter
holding the real view, fed the real view of every gradient: the two must agree bit for bit at
every step and at x. The first test pins the convention on torch's own AdamW. The loss each step
reports is a constant 1 (ScheduleFree+'s Polyak step size reads it; with 0 it would never move).
"""
from __future__ import annotations

import pytest
import torch

from optim_infos import INFOS, OptimInfo, take_step

STEPS = 8
OWN_STEP = [info for info in INFOS if not info.name.startswith("ScheduleFreeWrapper") and not info.composed]


def _gradients() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.complex(torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)) for _ in range(STEPS)]


def _start() -> torch.Tensor:
    gen = torch.Generator().manual_seed(6)
    return torch.complex(torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen))


TORCH_ADAMW = OptimInfo("torch.optim.AdamW", torch.optim.AdamW, (dict(lr=0.1, foreach=False),), has_modes=False)


def _drive(info: OptimInfo, opt, param: torch.Tensor, grad: torch.Tensor) -> None:
    def closure() -> torch.Tensor:
        param.grad = grad.clone()
        return torch.ones(())

    take_step(info, opt, closure)


def test_torch_adamw_updates_a_complex_parameter_as_its_real_view():
    complex_param = torch.nn.Parameter(_start())
    real_param = torch.nn.Parameter(torch.view_as_real(_start()).clone())
    opts = [TORCH_ADAMW.make([p], TORCH_ADAMW.configs[0]) for p in (complex_param, real_param)]
    for grad in _gradients():
        _drive(TORCH_ADAMW, opts[0], complex_param, grad)
        _drive(TORCH_ADAMW, opts[1], real_param, torch.view_as_real(grad))
    assert torch.equal(torch.view_as_real(complex_param.detach()), real_param.detach())


@pytest.mark.parametrize("info", OWN_STEP, ids=str)
def test_complex_parameter_moves_as_its_real_view_would(info):
    config = {key: value for key, value in info.configs[0].items()}
    complex_param = torch.nn.Parameter(_start())
    real_param = torch.nn.Parameter(torch.view_as_real(_start()).clone())
    complex_opt = info.make([complex_param], config)
    real_opt = info.make([real_param], config)
    for step, grad in enumerate(_gradients(), start=1):
        _drive(info, complex_opt, complex_param, grad)
        _drive(info, real_opt, real_param, torch.view_as_real(grad))
        assert torch.equal(torch.view_as_real(complex_param.detach()), real_param.detach()), f"step {step}"
    assert not torch.equal(complex_param.detach(), _start()), "the parameter never moved"
    if info.has_modes:
        complex_opt.eval()
        real_opt.eval()
        assert torch.equal(torch.view_as_real(complex_param.detach()), real_param.detach()), "at x"
