"""The training helpers keep evaluation, checkpoints and BatchNorm statistics at x, and leave
everything else as they found it.

Every claim is checked against a twin run: the same seeds and batches driven by explicit
``optimizer.eval()``/``optimizer.train()`` calls, or a run that never stopped. Schedule-free
switching is deterministic, so those comparisons are exact (torch.equal).
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mup_models import D_IN, D_OUT, mixed_net
from mup_schedulefree import (
    AdamWScheduleFree,
    AdamWScheduleFreeClosure,
    MuAdamW_ScheduleFree,
    RAdamScheduleFree,
    ScheduleFreeWrapper,
    SGDScheduleFree,
    eval_mode,
    load_checkpoint,
    recalibrate_batchnorm,
    save_checkpoint,
)

SAVE_AT, MORE = 7, 5     # checkpoint after SAVE_AT steps, then MORE steps (RAdam's first 5 steps are silent)

OPTIMIZERS: dict[str, Callable[[nn.Module], Any]] = {
    "AdamWScheduleFree": lambda m: AdamWScheduleFree(m.parameters(), lr=1e-2, weight_decay=0.05, warmup_steps=3),
    "SGDScheduleFree": lambda m: SGDScheduleFree(m.parameters(), lr=0.1, weight_decay=0.05, warmup_steps=3),
    "RAdamScheduleFree": lambda m: RAdamScheduleFree(m.parameters(), lr=1e-2, weight_decay=0.05),
    "ScheduleFreeWrapper": lambda m: ScheduleFreeWrapper(torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.0, 0.999)),
                                                         weight_decay_at_y=0.05),
    "MuAdamW_ScheduleFree": lambda m: MuAdamW_ScheduleFree(m.named_parameters(), lr=1e-2, weight_decay=0.05),
}


def model(seed: int) -> nn.Module:
    """The muP test model (every parameter kind, LayerNorm, MuReadout), global RNG left as found."""
    with torch.random.fork_rng():
        return mixed_net(seed=seed)


def batches(count: int, seed: int = 2024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, D_IN, generator=gen), torch.randn(8, D_OUT, generator=gen)) for _ in range(count)]


def train(net: nn.Module, opt: Any, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()


def trained(name: str, seed: int = 0, steps: int = SAVE_AT) -> tuple[nn.Module, Any]:
    """Model ``seed`` and optimizer ``name`` after ``steps`` steps on the fixed batches (at y)."""
    net = model(seed)
    opt = OPTIMIZERS[name](net)
    train(net, opt, batches(steps))
    return net, opt


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the state dict (parameters and buffers)."""
    return {name: t.detach().clone() for name, t in net.state_dict().items()}


def parameters(net: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters only (BatchNorm statistics excluded)."""
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert list(got) == list(expected), what
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{what}: {name} differs"


def module_modes(net: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in net.named_modules()}


# ----------------------------------------------------------------------------- eval_mode
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_eval_mode_evaluates_at_x_and_restores_training_point(name):
    """Inside: every module in eval, optimizer in eval, parameters at x; after: both back in train.

    Reference: a twin run that calls optimizer.eval() (parameters inside must equal it) and then
    optimizer.train() (parameters after must equal it), compared with torch.equal.
    """
    net, opt = trained(name)
    twin, twin_opt = trained(name)
    net.train()
    at_y = snapshot(net)
    twin_opt.eval()
    at_x = snapshot(twin)
    assert any(not torch.equal(at_x[k], at_y[k]) for k in at_x), "x and y must differ for the test to mean anything"
    with eval_mode(net, opt):
        assert not any(module_modes(net).values())
        assert not opt.train_mode
        assert_equal(snapshot(net), at_x, "inside eval_mode")
    twin_opt.train()
    assert all(module_modes(net).values())
    assert opt.train_mode
    assert_equal(snapshot(net), snapshot(twin), "after eval_mode")


def test_eval_mode_restores_each_module_flag_including_model_already_in_eval():
    """A model in eval stays in eval; in a training model, a submodule set to eval keeps its flag.

    Reference: the flags recorded before entering, compared name by name.
    """
    net, opt = trained("AdamWScheduleFree")
    net.eval()
    with eval_mode(net, opt):
        pass
    assert not any(module_modes(net).values())
    assert opt.train_mode
    net.train()
    net.norm.eval()
    net.up.eval()
    before = module_modes(net)
    assert sorted(k for k, v in before.items() if not v) == ["norm", "up"]
    with eval_mode(net, opt):
        assert not any(module_modes(net).values())
    assert module_modes(net) == before


def test_eval_mode_leaves_optimizer_already_in_eval_untouched():
    """An optimizer in eval stays in eval and the parameters at x are not rewritten.

    Reference: the parameters before entering, compared with torch.equal inside and after.
    """
    net, opt = trained("AdamWScheduleFree")
    opt.eval()
    at_x = snapshot(net)
    with eval_mode(net, opt):
        assert_equal(snapshot(net), at_x, "inside eval_mode")
    assert not opt.train_mode
    assert_equal(snapshot(net), at_x, "after eval_mode")


def test_eval_mode_restores_both_when_the_block_raises():
    """An exception inside the block still restores module flags and the optimizer's train mode.

    Reference: a twin run's parameters after optimizer.eval(); optimizer.train().
    """
    net, opt = trained("SGDScheduleFree")
    twin, twin_opt = trained("SGDScheduleFree")
    twin_opt.eval()
    twin_opt.train()
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(net, opt):
            raise RuntimeError("inside")
    assert all(module_modes(net).values())
    assert opt.train_mode
    assert_equal(snapshot(net), snapshot(twin), "after the exception")


def test_eval_mode_with_closure_form_switches_only_the_model():
    """Closure forms hold x between steps and have no train()/eval(): parameters stay as they are.

    Reference: the parameters before entering (torch.equal).
    """
    net = model(0)
    opt = AdamWScheduleFreeClosure(net.parameters(), lr=1e-2)
    for x, y in batches(3):
        def closure():
            opt.zero_grad()
            loss = F.mse_loss(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    before = snapshot(net)
    with eval_mode(net, opt):
        assert not any(module_modes(net).values())
        assert_equal(snapshot(net), before, "inside eval_mode")
    assert all(module_modes(net).values())
    assert_equal(snapshot(net), before, "after eval_mode")


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_from_checkpoint_is_bit_identical_to_uninterrupted_run(name, tmp_path):
    """Save after 7 steps, load into a fresh model (other init) and optimizer, take 5 more steps.

    Reference: the run that saved and continued; every parameter at y, and at x after
    optimizer.eval(), compared with torch.equal.
    """
    path = tmp_path / "ckpt.pt"
    more = batches(SAVE_AT + MORE)[SAVE_AT:]
    net, opt = trained(name)
    save_checkpoint(path, net, opt, step=SAVE_AT)
    assert opt.train_mode
    train(net, opt, more)
    reference_y = snapshot(net)
    opt.eval()
    reference_x = snapshot(net)

    fresh = model(seed=1)
    fresh_opt = OPTIMIZERS[name](fresh)
    assert load_checkpoint(path, fresh, fresh_opt) == {"step": SAVE_AT}
    assert fresh_opt.train_mode
    train(fresh, fresh_opt, more)
    assert_equal(snapshot(fresh), reference_y, "resumed run at y")
    fresh_opt.eval()
    assert_equal(snapshot(fresh), reference_x, "resumed run at x")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_checkpoint_holds_x_and_loads_without_optimizer_at_x(name, tmp_path):
    """The saved weights are x, and load_checkpoint(path, model) leaves a fresh model at x.

    Reference: a twin run after optimizer.eval() (torch.equal).
    """
    path = tmp_path / "ckpt.pt"
    net, opt = trained(name)
    save_checkpoint(path, net, opt)
    twin, twin_opt = trained(name)
    twin_opt.eval()
    at_x = snapshot(twin)
    assert_equal(torch.load(path, weights_only=False)["model"], at_x, "saved weights")
    fresh = model(seed=2)
    assert load_checkpoint(path, fresh) == {}
    assert_equal(snapshot(fresh), at_x, "model loaded without optimizer")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_checkpoint_saved_in_eval_mode_loads_in_eval_mode(name, tmp_path):
    """An optimizer saved in eval loads in eval (parameters at x); train() then continues exactly.

    Reference: the run that called eval(), saved, train() and continued (torch.equal).
    """
    path = tmp_path / "ckpt.pt"
    more = batches(SAVE_AT + MORE)[SAVE_AT:]
    net, opt = trained(name)
    opt.eval()
    at_x = snapshot(net)
    save_checkpoint(path, net, opt)
    assert not opt.train_mode
    opt.train()
    train(net, opt, more)

    fresh = model(seed=1)
    fresh_opt = OPTIMIZERS[name](fresh)
    load_checkpoint(path, fresh, fresh_opt)
    assert not fresh_opt.train_mode
    assert_equal(snapshot(fresh), at_x, "loaded in eval mode")
    fresh_opt.train()
    train(fresh, fresh_opt, more)
    assert_equal(snapshot(fresh), snapshot(net), "continued after train()")


# ----------------------------------------------------------------------------- BatchNorm
D_BN, CLASSES, WIDTH = 16, 8, 64
OFFSET = 10.0        # input mean: pre-BN means then hinge on the first layer's weights
BN_STEPS = 60


def bn_task(seed: int = 0) -> dict[str, Any]:
    """A BatchNorm MLP trained 60 steps with SGDScheduleFree at lr=1.0 on a fixed random teacher.

    Inputs are N(OFFSET, 1) in 16 dims, labels the argmax of a random linear teacher over 8
    classes; batches of 64, held-out set of 2000.
    """
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(D_BN, CLASSES, generator=gen)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, D_BN, generator=gen) + OFFSET
        return x, ((x - OFFSET) @ teacher).argmax(1)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(D_BN, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(),
                            nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Linear(WIDTH, CLASSES))
    opt = SGDScheduleFree(net.parameters(), lr=1.0)
    data = [sample(64) for _ in range(BN_STEPS)]
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return {"model": net, "opt": opt, "inputs": [x for x, _ in data[-20:]], "held_out": sample(2000)}


def held_out_metrics(task: dict[str, Any]) -> tuple[float, float]:
    """(cross-entropy, accuracy) on the held-out set, evaluated at x."""
    x, y = task["held_out"]
    with eval_mode(task["model"], task["opt"]), torch.no_grad():
        logits = task["model"](x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def bn_buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in net.named_buffers()}


def test_recalibrated_batchnorm_beats_training_statistics_on_held_out_data():
    """At x, statistics re-estimated at x beat the running statistics gathered at y in training.

    Reference: the same model and optimizer evaluated at x before recalibration. Measured
    (seeds 0, 1, 2): cross-entropy 0.68 / 1.42 / 1.27 -> 0.30 / 0.30 / 0.30 and accuracy
    0.745 / 0.622 / 0.659 -> 0.883 / 0.900 / 0.891. Required here (seed 0): accuracy up by at
    least 0.05 and cross-entropy down by at least 25%.
    """
    task = bn_task(seed=0)
    stale_loss, stale_accuracy = held_out_metrics(task)
    assert recalibrate_batchnorm(task["model"], task["opt"], task["inputs"]) == 20
    loss, accuracy = held_out_metrics(task)
    assert accuracy >= stale_accuracy + 0.05, (stale_accuracy, accuracy)
    assert loss <= 0.75 * stale_loss, (stale_loss, loss)


def test_recalibrated_statistics_are_the_exact_average_at_x():
    """The first BatchNorm's new running mean and variance are the plain average over the
    batches of its input's batch mean and unbiased variance, computed at x.

    Reference: those averages computed from the first Linear layer at x (rtol=1e-5, atol=1e-6).
    """
    task = bn_task(seed=0)
    net, opt = task["model"], task["opt"]
    recalibrate_batchnorm(net, opt, task["inputs"])
    opt.eval()
    with torch.no_grad():
        pre_bn = [net[0](x) for x in task["inputs"]]
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, torch.stack([h.mean(0) for h in pre_bn]).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack([h.var(0) for h in pre_bn]).mean(0), rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == len(task["inputs"])
    assert bn.momentum == 0.1


def test_recalibrate_batchnorm_leaves_modes_and_parameters_as_they_were():
    """Optimizer in train, model in train with one submodule in eval: all flags and the train
    mode come back, and every parameter holds its exact previous bits (x is computed out of
    place; an eval()/train() round trip would move some entries by rounding, as the twin shows).
    Optimizer and model in eval: they stay there and the parameters are not rewritten.

    Reference: flags and parameters recorded before the call (torch.equal).
    """
    task, twin = bn_task(seed=0), bn_task(seed=0)
    net, opt = task["model"], task["opt"]
    net.train()
    net[6].eval()
    before, at_y = module_modes(net), parameters(net)
    recalibrate_batchnorm(net, opt, task["inputs"])
    assert module_modes(net) == before
    assert opt.train_mode
    assert_equal(parameters(net), at_y, "parameters after")
    twin["opt"].eval()
    twin["opt"].train()
    assert any(not torch.equal(a, b) for a, b in zip(parameters(twin["model"]).values(), at_y.values())), \
        "precondition: a round trip moves some entry here"

    opt.eval()
    net.eval()
    at_x = parameters(net)
    recalibrate_batchnorm(net, opt, task["inputs"][:5])
    assert not any(module_modes(net).values())
    assert not opt.train_mode
    assert_equal(parameters(net), at_x, "parameters after, optimizer in eval")


@pytest.mark.parametrize("empty", [[], iter(())], ids=["list", "iterator"])
def test_recalibrate_batchnorm_with_no_batches_raises_and_changes_nothing(empty):
    """No batches: ValueError, and running statistics, flags, mode and parameters unchanged.

    Reference: the buffers, flags and parameters recorded before the call (torch.equal).
    """
    task = bn_task(seed=0)
    net, opt = task["model"], task["opt"]
    buffers, modes = bn_buffers(net), module_modes(net)
    params = parameters(net)
    with pytest.raises(ValueError, match="batches is empty"):
        recalibrate_batchnorm(net, opt, empty)
    assert_equal(bn_buffers(net), buffers, "running statistics")
    assert module_modes(net) == modes
    assert opt.train_mode
    assert_equal(parameters(net), params, "parameters")
