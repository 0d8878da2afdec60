"""Muon under muP and schedule-free: the "muon" rule, MuMuon_ScheduleFree, and the coordinate-check contrast.

The rule's multiplier on top of torch.optim.Muon's own ``adjust_lr_fn`` is
sqrt(m_out / m_in) * adjust(A0, B0) / adjust(A, B) (derivation in ``mup_schedulefree.scaling``);
the expected values below are worked out by hand from it.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from mup.infshape import InfDim, InfShape

import mup_schedulefree as msf
from coord_checks import experiments, verdict
from coord_checks.models import build_model
from mup_schedulefree.scaling import infer_rule, mu_param_groups, muon_lr_mult, parameter_scaling
from optim_infos import assert_bitwise_equal, assert_same_run

RTOL = 1e-12  # the multipliers are a square root and a ratio of square roots


def _infshape(base: tuple[int, int], shape: tuple[int, int]) -> InfShape:
    return InfShape([InfDim(b, d) for b, d in zip(base, shape)])


# (base shape, shape, adjust_lr_fn, multiplier): (A, B) = (fan-out, fan-in)
MULTIPLIERS = [
    # both dims x4 (a square hidden matrix): "original" needs nothing, "match_rms_adamw" 1 / sqrt(4)
    ((64, 64), (256, 256), None, 1.0),
    ((64, 64), (256, 256), "original", 1.0),
    ((64, 64), (256, 256), "match_rms_adamw", 0.5),
    # an MLP up-projection, both dims x4: the same
    ((256, 64), (1024, 256), None, 1.0),
    ((256, 64), (1024, 256), "match_rms_adamw", 0.5),
    # fan-out alone x4: sqrt(4) * sqrt(1 / 4) = 1 and sqrt(4) * sqrt(64 / 256) = 1
    ((64, 64), (256, 64), None, 1.0),
    ((64, 64), (256, 64), "match_rms_adamw", 1.0),
    # fan-in alone x4: sqrt(1 / 4) = 0.5 and sqrt(1 / 4) * sqrt(64 / 256) = 0.25
    ((64, 64), (64, 256), None, 0.5),
    ((64, 64), (64, 256), "match_rms_adamw", 0.25),
    # both x16 (the sweep's 64 -> 1024): 1 and 1 / 4
    ((64, 64), (1024, 1024), None, 1.0),
    ((64, 64), (1024, 1024), "match_rms_adamw", 0.25),
]


@pytest.mark.parametrize("base, shape, adjust, expected", MULTIPLIERS)
def test_muon_rule_multiplier_cancels_adjust_lr_fn_to_meet_the_spectral_condition(base, shape, adjust, expected):
    """muon_lr_mult is the hand-derived value, and lr_mult * adjust(A, B) / (adjust(A0, B0)) equals
    sqrt(m_out / m_in), the spectral condition's growth of ||dW||_op (torch's own adjust)."""
    from torch.optim._muon import _adjust_lr

    infshape = _infshape(base, shape)
    mult = muon_lr_mult(infshape, adjust)
    assert math.isclose(mult, expected, rel_tol=RTOL), mult
    spectral = mult * _adjust_lr(1.0, adjust, shape) / _adjust_lr(1.0, adjust, base)
    assert math.isclose(spectral, math.sqrt((shape[0] / base[0]) / (shape[1] / base[1])), rel_tol=RTOL)


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_muon_rule_is_exactly_one_at_the_base_shape(adjust):
    assert muon_lr_mult(_infshape((48, 96), (48, 96)), adjust) == 1.0


def test_muon_rule_scales_lr_by_the_multiplier_and_weight_decay_by_its_inverse():
    """Muon decays p <- p (1 - lr wd) with the group lr: decay_lr_power 1, so wd / mult keeps lr * wd fixed."""
    p = torch.nn.Parameter(torch.zeros(256, 256))
    p.infshape = _infshape((64, 64), (256, 256))
    (group,) = mu_param_groups([p], "muon", lr=0.4, decay_keys={"weight_decay": 0.1}, adjust_lr_fn="match_rms_adamw")
    assert group["lr"] == 0.4 * 0.5 and group["weight_decay"] == 0.1 / 0.5
    assert group["lr"] * group["weight_decay"] == pytest.approx(0.4 * 0.1, rel=RTOL)
    assert (group["mup_rule"], group["mup_role"], group["mup_lr_mult"]) == ("muon", "matrix-like", 0.5)


def test_torch_muon_follows_the_muon_rule_and_the_adam_factory_refuses_it():
    assert infer_rule(torch.optim.Muon) == "muon"
    with pytest.raises(ValueError, match="impl=Muon follows the 'muon' rule: use MuMuon_ScheduleFree"):
        msf.MuAdamW_ScheduleFree([torch.nn.Parameter(torch.zeros(2, 2))], impl=torch.optim.Muon, lr=0.1)


def test_mu_optimizer_reads_torch_muons_adjust_lr_fn_for_the_rule():
    """mu_optimizer(.., torch.optim.Muon, "muon") cancels the adjust_lr_fn it passes to Muon."""
    p = torch.nn.Parameter(torch.zeros(256, 256))
    p.infshape = _infshape((64, 64), (256, 256))
    original = msf.mu_optimizer([p], torch.optim.Muon, "muon", lr=0.02)
    matched = msf.mu_optimizer([p], torch.optim.Muon, "muon", lr=0.02, adjust_lr_fn="match_rms_adamw")
    assert original.param_groups[0]["lr"] == 0.02 and matched.param_groups[0]["lr"] == 0.01
    assert matched.param_groups[0]["weight_decay"] == pytest.approx(0.2, rel=RTOL)  # Muon's default 0.1 / 0.5


@pytest.mark.parametrize("base, shape, match", [
    ((None, 64), (10, 256), "1 infinite dimensions: the 'muon' rule covers hidden matrices"),
    ((64,), (256,), "1 infinite dimensions: the 'muon' rule covers hidden matrices"),
])
def test_muon_rule_refuses_what_is_not_a_hidden_matrix_naming_it(base, shape, match):
    with pytest.raises(ValueError, match=f"parameter 'readout.weight' has shape .*{match}"):
        parameter_scaling(_infshape(base, shape), "muon", "parameter 'readout.weight'")


@pytest.mark.parametrize("kwargs, name, value", [
    (dict(adjust_lr_fn="spectral"), "adjust_lr_fn", "'spectral'"),
    (dict(adam_lr=-1.0), "adam_lr", "-1.0"),
    (dict(momentum=1.0), "momentum", "1.0"),
    (dict(ns_steps=0), "ns_steps", "0"),
    (dict(scale_eps="yes"), "scale_eps", "'yes'"),
])
def test_mumuon_argument_errors_are_one_line_naming_the_argument(kwargs, name, value):
    def params():
        raise AssertionError("params was read before the arguments were checked")
        yield

    with pytest.raises((TypeError, ValueError)) as caught:
        msf.MuMuon_ScheduleFree(params(), **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"Invalid {name}: {value}")


def _mlp(width: int = 128, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", width, "mup", d_in=8, d_out=4)


def _batches(count: int = 6):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(count)]


def _train(model, opt, batches) -> None:
    for inputs, targets in batches:
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()


def test_mumuon_routes_hidden_matrices_to_muon_and_the_rest_to_adamw_both_mup_scaled():
    """MLP at width 256 (base 64, m = 4): hidden.* under Muon at lr / sqrt(4) (match_rms_adamw) with
    decay at y x sqrt(4); input and readout under AdamW at adam_lr (vector-like: unscaled)."""
    model = _mlp(256)
    opt = msf.MuMuon_ScheduleFree(model.named_parameters(), lr=0.4, adam_lr=0.01, weight_decay=0.1,
                                  adjust_lr_fn="match_rms_adamw")
    adam, muon = opt.parts
    assert isinstance(muon.base, torch.optim.Muon) and isinstance(adam, msf.AdamWScheduleFree)
    assert [g["param_names"] for g in muon.param_groups] == [["hidden.0.weight", "hidden.1.weight"]]
    assert [g["param_names"] for g in adam.param_groups] == [["input.weight", "readout.weight"]]
    (group,) = muon.param_groups
    assert (group["lr"], group["weight_decay_at_y"], group["weight_decay"], group["momentum"]) == (0.2, 0.2, 0.0, 0.0)
    assert adam.param_groups[0]["lr"] == 0.01 and adam.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups == [*adam.param_groups, *muon.param_groups]


def test_mumuon_has_one_mode_for_both_parts():
    """A new optimizer trains; eval()/train() switch both parts; a step in eval mode raises and changes nothing."""
    model = _mlp()
    opt = msf.MuMuon_ScheduleFree(model.named_parameters(), lr=0.1, adam_lr=0.01)
    _train(model, opt, _batches(3))
    assert opt.train_mode and all(part.train_mode for part in opt.parts)
    opt.eval()
    assert not opt.train_mode and not any(part.train_mode for part in opt.parts)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"not in train mode.*optimizer\.train\(\)"):
        _train(model, opt, _batches(1))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.train()
    assert opt.train_mode and all(part.train_mode for part in opt.parts)


def test_mumuon_state_dict_round_trip_through_torch_save_continues_bitwise():
    """Save at step 3 (eval mode), load into a fresh model and optimizer through torch.save/torch.load,
    train 3 more steps; oracle: the uninterrupted run (parameters and state dict bitwise equal)."""
    batches = _batches(6)
    model, fresh = _mlp(), _mlp(seed=9)
    opt = msf.MuMuon_ScheduleFree(model.named_parameters(), lr=0.1, adam_lr=0.01, weight_decay=0.05)
    fresh_opt = msf.MuMuon_ScheduleFree(fresh.named_parameters(), lr=0.1, adam_lr=0.01, weight_decay=0.05)
    _train(model, opt, batches[:3])
    opt.eval()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    assert not fresh_opt.train_mode
    for o in (opt, fresh_opt):
        o.train()
    _train(model, opt, batches[3:])
    _train(fresh, fresh_opt, batches[3:])
    assert_same_run(fresh, fresh_opt, model, opt)


def test_mumuon_refuses_a_state_dict_of_another_muon_scaling_and_keeps_its_own():
    """A state dict saved with adjust_lr_fn="original" has other Muon lr multipliers at width 128:
    the Muon part's grouping guard refuses it, and the AdamW part, loaded first, gets its state back."""
    model = _mlp()
    saved = msf.MuMuon_ScheduleFree(model.named_parameters(), lr=0.1)
    opt = msf.MuMuon_ScheduleFree(model.named_parameters(), lr=0.1, adjust_lr_fn="match_rms_adamw")
    _train(model, saved, _batches(2))
    before = opt.state_dict()
    with pytest.raises(ValueError, match="mup_lr_mult=1.0 but this optimizer's group 0 has 0.7071"):
        opt.load_state_dict(saved.state_dict())
    assert_bitwise_equal(opt.state_dict(), before)


def test_mumuon_works_with_the_checkpoint_helpers(tmp_path):
    """state_dict_at_x equals the weights eval() gives; save_checkpoint/load_checkpoint in train mode
    restore model (at y) and optimizer so that training continues bitwise (oracle: the run without them)."""
    batches = _batches(6)
    model = _mlp()
    opt = msf.MuMuon_ScheduleFree(model.named_parameters(), lr=0.1, adam_lr=0.01)
    _train(model, opt, batches[:3])
    at_x = msf.state_dict_at_x(model, opt)
    msf.save_checkpoint(tmp_path / "ckpt.pt", model, opt, step=3)
    fresh = _mlp(seed=5)
    fresh_opt = msf.MuMuon_ScheduleFree(fresh.named_parameters(), lr=0.1, adam_lr=0.01)
    assert msf.load_checkpoint(tmp_path / "ckpt.pt", fresh, fresh_opt) == {"step": 3}
    assert fresh_opt.train_mode
    evaluated, evaluated_opt = copy.deepcopy((model, opt))
    evaluated_opt.eval()
    assert all(torch.equal(at_x[name], p) for name, p in evaluated.named_parameters())
    _train(model, opt, batches[3:])
    _train(fresh, fresh_opt, batches[3:])
    assert_same_run(fresh, fresh_opt, model, opt)


@pytest.fixture(scope="module")
def contrast():
    """muP coordinate check of the MLP, widths 64 / 256 / 1024, 4 steps, one seed, y and x."""
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return {name: verdict.judge(experiments.run_coord_check(
                    model="mlp", optimizer=name, widths=(64, 256, 1024), seeds=(0,), parametrizations=("mup",)))
                for name in ("muon", "muon-unscaled")}


def test_coord_check_passes_with_the_muon_rule(contrast):
    """Default lr 0.3 (match_rms_adamw): every module's l1 keeps its size across 16x width, at y and x."""
    assert contrast["muon"].passed("mup"), contrast["muon"].format()


def test_coord_check_fails_without_the_muon_rule(contrast):
    """The same with the Muon part at the base lr: its updates grow like sqrt(width), and the second
    hidden layer's output (moved by both hidden matrices) grows with width."""
    judged = contrast["muon-unscaled"]
    assert not judged.passed("mup")
    failing = set(judged.table.loc[judged.table["status"] == "fail", "module"])
    assert "hidden.1" in failing, failing
