"""torch.compile around the optimizers: compiled once, no recompiles, the same numbers as eager.

Every optimizer's ``step``, ``train``, ``eval`` and ``points_at_x`` are excluded from tracing
(``kernels.compile_disabled``): a compiled function that calls them breaks its graph at the call and
runs the optimizer eagerly, so dynamo never guards on the optimizer's Python state (step counts,
lr warmup, ckp1, RAdam's rectification, lazily created state, the train/eval mode) and never
recompiles for it. Two ways of compiling are checked for every class: the whole training step
(zero_grad, forward, backward, ``opt.step()``), and the model alone under an eager training loop,
the way to compile with the closure forms (whose closure runs inside the excluded step).

Graphs are counted by dynamo's ``CompileCounter`` backend, which runs them eagerly (no C++ compiler,
fractions of a second). After the first steps ``error_on_recompile`` turns any recompile into an
error, so one that dynamo would otherwise absorb (by giving up on a frame at its recompile limit)
still fails the test. Runs are compared with an uncompiled twin bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from optim_infos import INFOS, MODAL_INFOS, OptimInfo, assert_bitwise_equal, assert_same_run, loss_of, \
    param_groups, run, to_eval, to_train, train_step

STEPS = 20
SWITCH_AT = 10   # eval() then train() after this step: the mode switch happens once mid-run
WARM_STEPS = 3   # steps allowed to compile; from then on a recompile is an error


def _model_and_optimizer(info: OptimInfo, make_model: Callable[..., torch.nn.Module]
                         ) -> tuple[torch.nn.Module, Any]:
    """The tiny MLP and ``info``'s first config over the three-group layout (warmup or rectification
    changes the schedule during the first steps of every class that has one)."""
    model = make_model()
    config = info.configs[0]
    return model, info.make(param_groups(info, list(model.parameters()), config), config)


def _steps(call: Callable[[int], None]) -> None:
    """Call ``call(i)`` for i < STEPS, with recompiles an error from step WARM_STEPS on."""
    for i in range(WARM_STEPS):
        call(i)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(WARM_STEPS, STEPS):
            call(i)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts and leaves with dynamo's caches empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("info", INFOS, ids=str)
def test_compiled_train_step_that_calls_step_compiles_once_and_matches_eager(info: OptimInfo, make_model, make_batches):
    """One graph at most (the forward and loss; none for closure forms, whose forward runs inside the
    excluded step), no recompiles over warmup, ckp1 changes and an eval()/train() switch."""
    model, opt = _model_and_optimizer(info, make_model)
    twin_model, twin_opt = _model_and_optimizer(info, make_model)
    batches = make_batches(STEPS)
    counter = CompileCounter()
    compiled_step = torch.compile(train_step, backend=counter)

    def one_step(i: int) -> None:
        loss = compiled_step(info, opt, model, batches[i])
        twin_loss = train_step(info, twin_opt, twin_model, batches[i])
        assert torch.equal(loss, twin_loss), f"step {i}: loss {loss.item()} != {twin_loss.item()}"
        if i == SWITCH_AT:
            to_eval(info, opt)
            to_train(info, opt)
            to_eval(info, twin_opt)
            to_train(info, twin_opt)

    _steps(one_step)
    assert counter.frame_count <= 1, f"{counter.frame_count} graphs compiled for one training step"
    assert_same_run(model, opt, twin_model, twin_opt)


@pytest.mark.parametrize("info", MODAL_INFOS, ids=str)
def test_compiled_evaluation_that_switches_modes_compiles_once_and_matches_eager(info: OptimInfo, make_model,
                                                                                  make_batches):
    """A compiled function that reads points_at_x(), calls eval(), evaluates and calls train() again,
    between eager training steps: one graph, no recompiles, the same values as eager."""
    model, opt = _model_and_optimizer(info, make_model)
    twin_model, twin_opt = _model_and_optimizer(info, make_model)
    batches = make_batches(STEPS)
    counter = CompileCounter()

    def evaluate(opt: Any, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        points = opt.points_at_x()
        opt.eval()
        loss = loss_of(model, batch)
        opt.train()
        return loss, list(points.values())

    compiled_evaluate = torch.compile(evaluate, backend=counter)

    def one_step(i: int) -> None:
        train_step(info, opt, model, batches[i])
        train_step(info, twin_opt, twin_model, batches[i])
        assert_bitwise_equal(compiled_evaluate(opt, model, batches[0]), evaluate(twin_opt, twin_model, batches[0]),
                             f"step {i}: (loss at x, points at x)")

    _steps(one_step)
    assert counter.frame_count <= 1, f"{counter.frame_count} graphs compiled for one evaluation"
    assert_same_run(model, opt, twin_model, twin_opt)


@pytest.mark.parametrize("info", INFOS, ids=str)
def test_compiled_model_compiles_once_under_every_optimizer(info: OptimInfo, make_model, make_batches):
    """The model compiled, the loop eager (closure forms included): one graph for the whole run,
    which the optimizer's in-place writes and mode switches never invalidate."""
    model, opt = _model_and_optimizer(info, make_model)
    twin_model, twin_opt = _model_and_optimizer(info, make_model)
    counter = CompileCounter()
    compiled_model = torch.compile(model, backend=counter)
    batches = make_batches(STEPS)

    def one_step(i: int) -> None:
        run(info, opt, compiled_model, batches[i:i + 1])
        run(info, twin_opt, twin_model, batches[i:i + 1])
        if i == SWITCH_AT:
            for o in (opt, twin_opt):
                to_eval(info, o)
                to_train(info, o)

    _steps(one_step)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled for the model"
    assert_same_run(model, opt, twin_model, twin_opt)
