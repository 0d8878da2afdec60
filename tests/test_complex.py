"""Complex parameters are updated as their real view, torch's convention for complex parameters.

torch.optim treats a complex parameter as ``torch.view_as_real`` of it: Adam's second moment then
tracks the squares of the real and imaginary parts, not ``g * g`` (a complex number whose square
can cancel) nor ``|g|^2``. The oracle for each form is the same optimizer on a real parameter
holding the real view, fed the real view of every gradient: the two must agree bit for bit at
every step and at x. The first test pins the convention on torch's own AdamW.
"""
from __future__ import annotations

import pytest
import torch

from optim_infos import INFOS

STEPS = 8
OWN_STEP = [info for info in INFOS if not info.name.startswith("ScheduleFreeWrapper") and not info.composed]


def _gradients() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.complex(torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)) for _ in range(STEPS)]


def _start() -> torch.Tensor:
    gen = torch.Generator().manual_seed(6)
    return torch.complex(torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen))


def _drive(opt, param: torch.Tensor, grad: torch.Tensor, closure_form: bool) -> None:
    def closure() -> torch.Tensor:
        param.grad = grad.clone()
        return torch.zeros(())

    if closure_form:
        opt.step(closure)
    else:
        closure()
        opt.step()


def test_torch_adamw_updates_a_complex_parameter_as_its_real_view():
    complex_param = torch.nn.Parameter(_start())
    real_param = torch.nn.Parameter(torch.view_as_real(_start()).clone())
    opts = [torch.optim.AdamW([p], lr=0.1, foreach=False) for p in (complex_param, real_param)]
    for grad in _gradients():
        _drive(opts[0], complex_param, grad, False)
        _drive(opts[1], real_param, torch.view_as_real(grad), False)
    assert torch.equal(torch.view_as_real(complex_param.detach()), real_param.detach())


@pytest.mark.parametrize("info", OWN_STEP, ids=str)
def test_complex_parameter_moves_as_its_real_view_would(info):
    config = {key: value for key, value in info.configs[0].items()}
    complex_param = torch.nn.Parameter(_start())
    real_param = torch.nn.Parameter(torch.view_as_real(_start()).clone())
    complex_opt = info.make([complex_param], config)
    real_opt = info.make([real_param], config)
    for step, grad in enumerate(_gradients(), start=1):
        _drive(complex_opt, complex_param, grad, info.closure_form)
        _drive(real_opt, real_param, torch.view_as_real(grad), info.closure_form)
        assert torch.equal(torch.view_as_real(complex_param.detach()), real_param.detach()), f"step {step}"
    if info.has_modes:
        complex_opt.eval()
        real_opt.eval()
        assert torch.equal(torch.view_as_real(complex_param.detach()), real_param.detach()), "at x"
