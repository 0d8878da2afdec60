"""Generic claims every optimizer in the package must satisfy, run over every record of ``optim_infos``.

Each test is parametrized over :data:`optim_infos.INFOS` and loops over the record's valid configs.
Where a claim does not apply to a class (a flag it does not take), the test is skipped with the
reason. Model: the tiny MLP from ``conftest`` in the three-group layout of ``optim_infos``.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from optim_infos import (
    INFOS,
    OptimInfo,
    assert_bitwise_equal,
    assert_rel_close,
    assert_same_run,
    param_groups,
    run,
    skip_if_global_step_size,
    snapshot,
    take_step,
    to_eval,
    to_train,
    train_step,
)

STEPS = 30            # per run in the state/copy tests: 15 before the checkpoint, 15 after
SWITCH_EVERY = 6      # eval()/train() every 6 steps
PARITY_STEPS = 100
PARITY_RTOL = 1e-6    # max |a - b| / max |b| per tensor

pytestmark = pytest.mark.parametrize("info", INFOS, ids=[info.name for info in INFOS])


def _build(info: OptimInfo, model, config, **flags):
    return info.make(param_groups(info, list(model.parameters()), config), config, **flags)


def _requires_flags(info: OptimInfo, *names: str) -> None:
    missing = sorted(set(names) - info.flags)
    if missing:
        pytest.skip(f"{info.name} does not take the {'/'.join(missing)} flag (see OptimInfo.flags)")


def _requires_native() -> None:
    from mup_schedulefree import native

    if not native.available():
        pytest.skip("mup_schedulefree.native is unavailable (no C compiler could build the fused kernels)")


def _checkpoint_run(info, make_model, batches, config, save_mode: str, transport: str):
    """Train half the batches, checkpoint (model + optimizer, in ``save_mode``), load into a fresh
    model and optimizer, train the other half. Returns (resumed model, resumed optimizer)."""
    half = len(batches) // 2
    model = make_model(0)
    opt = _build(info, model, config)
    run(info, opt, model, batches[:half], SWITCH_EVERY)
    if save_mode == "eval":
        to_eval(info, opt)
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    if transport == "bytes":
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer)
    else:
        checkpoint = copy.deepcopy(checkpoint)
    fresh_model = make_model(seed=99)
    fresh_opt = _build(info, fresh_model, config)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    to_train(info, fresh_opt)
    run(info, fresh_opt, fresh_model, batches[half:], SWITCH_EVERY)
    return fresh_model, fresh_opt


def _uninterrupted_run(info, make_model, batches, config, save_mode: str):
    half = len(batches) // 2
    model = make_model(0)
    opt = _build(info, model, config)
    run(info, opt, model, batches[:half], SWITCH_EVERY)
    if save_mode == "eval":
        to_eval(info, opt)
    to_train(info, opt)
    run(info, opt, model, batches[half:], SWITCH_EVERY)
    return model, opt


@pytest.mark.parametrize("save_mode", ["eval", "train"])
def test_state_dict_resume_is_bit_identical(info, save_mode, make_model, make_batches):
    """Checkpoint at step 15 (in eval or train mode), load into a fresh model and optimizer, train to
    step 30. Oracle: the uninterrupted run with the same eval()/train() calls; parameters and the
    whole optimizer state_dict must be bitwise equal (torch.equal, floats with ==)."""
    batches = make_batches(STEPS)
    for config in info.configs:
        model_a, opt_a = _uninterrupted_run(info, make_model, batches, config, save_mode)
        model_b, opt_b = _checkpoint_run(info, make_model, batches, config, save_mode, "object")
        assert_same_run(model_b, opt_b, model_a, opt_a)


def test_resume_through_torch_save_and_load_is_bit_identical(info, make_model, make_batches):
    """As the state_dict test, with the checkpoint written by torch.save to a BytesIO and read back
    by torch.load with its default (weights_only) unpickler. Oracle: the uninterrupted run."""
    batches = make_batches(STEPS)
    for config in info.configs:
        model_a, opt_a = _uninterrupted_run(info, make_model, batches, config, "eval")
        model_b, opt_b = _checkpoint_run(info, make_model, batches, config, "eval", "bytes")
        assert_same_run(model_b, opt_b, model_a, opt_a)


def test_deepcopy_of_model_and_optimizer_continues_identically(info, make_model, make_batches):
    """copy.deepcopy((model, optimizer)) at step 15 is independent of the original and continues
    bitwise as the original does over 15 more steps (oracle: the original)."""
    batches = make_batches(STEPS)
    for config in info.configs:
        model = make_model(0)
        opt = _build(info, model, config)
        run(info, opt, model, batches[:15], SWITCH_EVERY)
        model_copy, opt_copy = copy.deepcopy((model, opt))
        copied_params = {id(p) for g in opt_copy.param_groups for p in g["params"]}
        assert copied_params == {id(p) for p in model_copy.parameters()}, "the copy steps the original's tensors"
        run(info, opt, model, batches[15:], SWITCH_EVERY)
        run(info, opt_copy, model_copy, batches[15:], SWITCH_EVERY)
        assert_same_run(model_copy, opt_copy, model, opt)


def test_parameter_without_gradient_is_untouched_and_gets_no_state(info, make_model, make_batches):
    """A parameter in a group that never receives a gradient keeps its exact values through 30 steps
    and eval()/train() switches, and has no optimizer state (oracle: its initial values)."""
    batches = make_batches(STEPS)
    for config in info.configs:
        model = make_model(0)
        unused = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(7)))
        groups = param_groups(info, list(model.parameters()), config)
        groups[0]["params"].append(unused)
        opt = info.make(groups, config)
        before = unused.detach().clone()
        for i, batch in enumerate(batches, start=1):
            train_step(info, opt, model, batch)
            if i % SWITCH_EVERY == 0:
                to_eval(info, opt)
                assert torch.equal(unused, before), "eval() moved a parameter that never had a gradient"
                to_train(info, opt)
            assert torch.equal(unused, before), f"step {i} moved a parameter that never had a gradient"
        assert not opt.state.get(unused), f"state created for a parameter without gradient: {list(opt.state[unused])}"


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers (8 significant bits) at each entry of ``t``: 2^(e - 8), t = m 2^e, m in [0.5, 1)."""
    _, exponent = torch.frexp(t.float())
    return torch.ldexp(torch.ones_like(t, dtype=torch.float32), exponent - 8)


@pytest.mark.usefixtures("one_thread")
def test_bfloat16_parameters_move_and_track_float32_run(info, make_model, make_batches):
    """bfloat16 parameters with master_weights=True at lr=1e-4 over 50 steps move, and every entry
    stays within one bfloat16 ulp (of that entry) of the float32 run, at y and at x after eval().
    Oracle: the same optimizer on a float32 copy of the rounded initial weights, fed the same
    (bfloat16-representable) batches. Without master weights the rounding of each update loses it
    (measured 2.6-9 ulp off here); with them the parameter is the float32 point rounded (<= 0.55 ulp)."""
    _requires_flags(info, "master_weights")
    batches = make_batches(50, dtype=torch.bfloat16)
    for config in info.configs:
        config = {**config, "lr": 1e-4}
        model16 = make_model(0, torch.bfloat16)
        model32 = make_model(0, torch.bfloat16).float()
        initial = snapshot(model16.parameters())
        opt16 = _build(info, model16, config, master_weights=True)
        opt32 = _build(info, model32, config)
        for batch in batches:
            train_step(info, opt16, model16, batch)
            train_step(info, opt32, model32, tuple(t.float() for t in batch))
        assert any(not torch.equal(p, p0) for p, p0 in zip(model16.parameters(), initial)), \
            "no bfloat16 parameter changed in 50 steps at lr=1e-4"
        for point in ("y", "x"):
            if point == "x":
                to_eval(info, opt16)
                to_eval(info, opt32)
            for (name, p16), p32 in zip(model16.named_parameters(), model32.parameters()):
                assert p16.dtype == torch.bfloat16
                ulps = ((p16.float() - p32).abs() / _bf16_ulp(p32)).max().item()
                assert ulps <= 1.0, f"{config}: {name} at {point} is {ulps:.2f} bfloat16 ulp from the float32 run"


@pytest.mark.usefixtures("one_thread")
def test_bfloat16_parameter_written_between_steps_keeps_the_write_as_float32_does(info, make_model, make_batches):
    """After 10 steps the user writes p <- 0.5 p (bfloat16-exact) into every parameter, as
    model.load_state_dict, clamping or weight tying do, then training goes on 10 steps. Oracle: the
    float32 run with the same write; the bfloat16 run (master_weights=True) must stay within one
    bfloat16 ulp per entry of it. A master copy that ignores the write reverts the parameter."""
    _requires_flags(info, "master_weights")
    batches = make_batches(20, dtype=torch.bfloat16)
    config = {**info.configs[0], "lr": 1e-4}
    model16 = make_model(0, torch.bfloat16)
    model32 = make_model(0, torch.bfloat16).float()
    opt16 = _build(info, model16, config, master_weights=True)
    opt32 = _build(info, model32, config)
    for i, batch in enumerate(batches):
        if i == 10:
            with torch.no_grad():
                for p in [*model16.parameters(), *model32.parameters()]:
                    p.mul_(0.5)
        train_step(info, opt16, model16, batch)
        train_step(info, opt32, model32, tuple(t.float() for t in batch))
    for (name, p16), p32 in zip(model16.named_parameters(), model32.parameters()):
        ulps = ((p16.float() - p32).abs() / _bf16_ulp(p32)).max().item()
        assert ulps <= 1.0, f"{name} is {ulps:.1f} bfloat16 ulp from the float32 run after the write"


@pytest.mark.usefixtures("one_thread")
def test_bfloat16_master_state_survives_state_dict_round_trip_in_float32(info, make_model, make_batches):
    """Every optimizer state tensor of bfloat16 parameters is float32 (master_weights=True), stays
    float32 and bitwise equal through state_dict/torch.save/torch.load/load_state_dict into a fresh
    bfloat16 model, and the resumed run continues bitwise as the uninterrupted one (oracle)."""
    _requires_flags(info, "master_weights")
    batches = make_batches(20, dtype=torch.bfloat16)
    for config in info.configs:
        config = {**config, "lr": 1e-3}
        model = make_model(0, torch.bfloat16)
        opt = _build(info, model, config, master_weights=True)
        run(info, opt, model, batches[:10], SWITCH_EVERY)
        saved = opt.state_dict()
        tensors = [v for s in saved["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.dtype == torch.float32 for t in tensors), \
            f"state dtypes {sorted({str(t.dtype) for t in tensors})}, expected float32 only"
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": saved}, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer)
        fresh_model = make_model(99, torch.bfloat16)
        fresh_opt = _build(info, fresh_model, config, master_weights=True)
        fresh_model.load_state_dict(checkpoint["model"])
        fresh_opt.load_state_dict(checkpoint["optimizer"])
        assert_bitwise_equal(fresh_opt.state_dict(), opt.state_dict())
        run(info, opt, model, batches[10:], SWITCH_EVERY)
        run(info, fresh_opt, fresh_model, batches[10:], SWITCH_EVERY)
        assert_same_run(fresh_model, fresh_opt, model, opt)


def test_add_param_group_mid_run_matches_optimizer_created_then(info, make_two_tower, make_batches):
    """A group added at step 10 gets the defaults, trains from its values then, and changes nothing
    for the other groups. Oracle: one optimizer over the MLP from step 0 plus a second optimizer of
    the same class over the independent ``aux`` head created at step 10 (bitwise equal)."""
    skip_if_global_step_size(info, "with the head's group and loss added, the MLP's groups step differently "
                                   "than in an optimizer over the MLP alone")
    batches = make_batches(STEPS)
    for config in info.configs:
        model, oracle = make_two_tower(0), make_two_tower(0)
        opt = _build(info, model.mlp, config)
        opt_mlp = _build(info, oracle.mlp, config)
        opt_aux = None
        aux_group = lambda m: {"params": list(m.aux.parameters()), "lr": config["lr"] / 3}  # noqa: E731
        for i, (inputs, target) in enumerate(batches):
            if i == 10:
                earlier = list(opt.param_groups)
                opt.add_param_group(aux_group(model))
                opt_aux = info.make([aux_group(oracle)], config)
                added = [g for g in opt.param_groups if not any(g is e for e in earlier)]
                assert added and all(any(set(g) == set(e) for e in earlier) for g in added), \
                    "new group lacks default keys"
            _step(info, opt, lambda: F.mse_loss(model.mlp(inputs), target) + F.mse_loss(model.aux(inputs), target))
            _step(info, opt_mlp, lambda: F.mse_loss(oracle.mlp(inputs), target))
            if opt_aux is not None:
                _step(info, opt_aux, lambda: F.mse_loss(oracle.aux(inputs), target))
            if (i + 1) % SWITCH_EVERY == 0:
                for o in (opt, opt_mlp, opt_aux):
                    if o is not None:
                        to_eval(info, o)
                        to_train(info, o)
        for (name, a), b in zip(model.named_parameters(), oracle.parameters()):
            assert torch.equal(a, b), f"{name} differs from the two-optimizer oracle"
        assert not torch.equal(model.aux.weight, make_two_tower(0).aux.weight), "the added group never moved"


def _step(info: OptimInfo, opt, loss_fn) -> None:
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    take_step(info, opt, closure)


def test_zero_grad_sets_none_or_zeros(info, make_model, make_batches):
    """zero_grad(set_to_none=True) leaves every grad None; set_to_none=False leaves zero tensors."""
    batch = make_batches(1)[0]
    config = info.configs[0]
    model = make_model(0)
    opt = _build(info, model, config)
    train_step(info, opt, model, batch)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    model(batch[0]).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_step_returns_the_closure_loss(info, make_model, make_batches):
    """step(closure) returns exactly the tensor the closure returned."""
    batch = make_batches(1)[0]
    model = make_model(0)
    opt = _build(info, model, info.configs[0])
    returned = []

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        returned.append(loss)
        return loss

    assert opt.step(closure) is returned[-1]


def _parity_run(info, make_model, batches, config, **flags):
    model = make_model(0)
    opt = _build(info, model, config, **flags)
    run(info, opt, model, batches, switch_every=25)
    params = list(model.parameters())
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    at_y = snapshot(params)
    to_eval(info, opt)
    return at_y, snapshot(params), state


def test_foreach_matches_single_tensor_path_over_100_steps(info, make_model, make_batches):
    """foreach=True and foreach=False (fused=False) agree over 100 steps with eval()/train() every 25:
    parameters at y and x, and all state, within max relative error 1e-6 per tensor."""
    _requires_flags(info, "foreach")
    batches = make_batches(PARITY_STEPS)
    for config in info.configs:
        y_a, x_a, s_a = _parity_run(info, make_model, batches, config, foreach=True, fused=False)
        y_b, x_b, s_b = _parity_run(info, make_model, batches, config, foreach=False, fused=False)
        assert_rel_close(y_a, y_b, PARITY_RTOL, f"y {config}")
        assert_rel_close(x_a, x_b, PARITY_RTOL, f"x {config}")
        assert_rel_close(s_a, s_b, PARITY_RTOL, f"state {config}")


def test_fused_matches_eager_over_100_steps(info, make_model, make_batches):
    """fused=True (native CPU kernels) and fused=False agree over 100 steps with eval()/train() every
    25: parameters at y and x, and all state, within max relative error 1e-6 per tensor."""
    _requires_flags(info, "fused")
    _requires_native()
    batches = make_batches(PARITY_STEPS)
    for config in info.configs:
        y_a, x_a, s_a = _parity_run(info, make_model, batches, config, fused=True, foreach=False)
        y_b, x_b, s_b = _parity_run(info, make_model, batches, config, fused=False, foreach=False)
        assert_rel_close(y_a, y_b, PARITY_RTOL, f"y {config}")
        assert_rel_close(x_a, x_b, PARITY_RTOL, f"x {config}")
        assert_rel_close(s_a, s_b, PARITY_RTOL, f"state {config}")
