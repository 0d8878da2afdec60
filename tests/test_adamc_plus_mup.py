"""ScheduleFree+ under muP: ``MuAdamC_ScheduleFreePlus`` and coord_checks driving steps that need the loss.

ScheduleFree+ multiplies every group's lr by one Polyak step size whose denominator sums each
group's gradient L1 norm times its ``polyak_weight``. Under muP the hidden groups' L1 norms grow
like the width, so with weights of 1 (upstream's rule, ``polyak="global"``) the step size shrinks
like 1/width; ``polyak="mup"`` weights each group by its lr multiplier
(``mup_schedulefree.scaling.polyak_weight``; derivation in ``optimizers/adamc_plus.py``).

Oracles:
  * the multipliers written out for MixedNet(24, 48) (tests/mup_models.py): width_mult 3 for the
    width x width and ff x width matrices, 6 for the width x ff one, 1 for the vector-like group;
  * upstream's step at the base width: ``AdamCScheduleFreePlus`` on the same parameter groups
    without muP keys, compared bit for bit;
  * the coordinate-check verdict with the symmetric bound of tests/test_coord_mup_vs_sp.py (a
    judged module outside the attention query and logits whose statistic shrinks with a width
    slope below -0.25 has vanishing updates, a failure as surely as growth);
  * the Polyak step size itself (logged as ``polyak_lr``): its log2-log2 slope against width;
  * a hand-written loop calling ``step(function_value=loss)``, against coord_checks' loops.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from mup_models import mixed_net
from torch.nn import functional as F

import mup_schedulefree as msf
from coord_checks import gradient_scales
from coord_checks.experiments import cross_entropy, make_task
from coord_checks.optimizers import optimizer_factory
from coord_checks.recording import record_coords
from coord_checks.transfer import train_and_evaluate_sets
from coord_checks.verdict import judge

pytestmark = pytest.mark.usefixtures("one_thread")

FORMS = [msf.AdamCScheduleFreePlus, msf.AdamCScheduleFreePlusPaper]
SYMMETRIC_BOUND = 0.25
# MixedNet(24, 48): its groups in the factory's order, with their lr multipliers.
MULTIPLIERS = {("hidden.weight", "up.weight"): 1 / 3, ("down.weight",): 1 / 6,
               ("inp.weight", "inp.bias", "norm.weight", "norm.bias", "hidden.bias", "up.bias", "down.bias",
                "readout.weight", "readout.bias"): 1.0}


def unread_params():
    """A params argument that fails the test if anything reads it."""
    def generator():
        pytest.fail("params were read before the arguments were checked")
        yield

    return generator()


def run(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` ScheduleFree+ steps on a fixed regression batch of MixedNet's shapes."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step(function_value=loss)


# ---------------------------------------------------------------- the factory's groups


@pytest.mark.parametrize("impl", FORMS)
def test_mup_polyak_weights_are_the_lr_multipliers_and_global_ones_are_one(impl):
    """Oracle: MULTIPLIERS (rel. 1e-15); every group records its choice as mup_polyak; AdamC's
    decay is scaled by 1/lr_mult^2 (decay_lr_power 2)."""
    model = mixed_net(24, 48)
    for polyak in ("mup", "global"):
        optimizer = msf.MuAdamC_ScheduleFreePlus(model.named_parameters(), impl=impl, polyak=polyak, lr=0.5,
                                                 weight_decay=10.0)
        assert type(optimizer) is impl
        got = {tuple(g["param_names"]): g for g in optimizer.param_groups}
        assert list(got) == list(MULTIPLIERS)
        for names, mult in MULTIPLIERS.items():
            group = got[names]
            assert group["mup_polyak"] == polyak
            assert group["polyak_weight"] == pytest.approx(mult if polyak == "mup" else 1.0, rel=1e-15)
            assert group["lr"] == pytest.approx(0.5 * mult, rel=1e-15)
            assert group["weight_decay"] == pytest.approx(10.0 / mult**2, rel=1e-14)


def test_a_groups_own_polyak_weight_is_scaled_like_its_lr():
    """Oracle: under "mup" a user group's weight 2 becomes 2 x its multiplier; "global" keeps it."""
    model = mixed_net(24, 48)
    groups = [{"params": [model.hidden.weight], "polyak_weight": 2.0},
              {"params": [p for n, p in model.named_parameters() if n != "hidden.weight"]}]
    built = {polyak: msf.MuAdamC_ScheduleFreePlus(groups, polyak=polyak, lr=1.0) for polyak in ("mup", "global")}
    weights = {polyak: [g["polyak_weight"] for g in optimizer.param_groups] for polyak, optimizer in built.items()}
    assert weights["mup"] == pytest.approx([2 / 3, 1 / 3, 1 / 6, 1.0], rel=1e-15)
    assert weights["global"] == [2.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("polyak", ["MUP", "", None, 1, "sp"])
def test_an_unknown_polyak_is_refused_in_one_line_naming_it_before_params_are_read(polyak):
    with pytest.raises(ValueError, match=r"^Invalid polyak: .* \(must be one of \('mup', 'global'\)\)$") as error:
        msf.MuAdamC_ScheduleFreePlus(unread_params(), polyak=polyak, lr=1.0)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("impl", FORMS)
@pytest.mark.parametrize("polyak", ["mup", "global"])
def test_at_the_base_width_the_step_is_upstreams_bit_for_bit(impl, polyak):
    """Oracle: at the base width every multiplier is 1, so 25 steps equal ``impl`` on the same
    parameter groups without muP keys (no polyak_weight: upstream's denominator), bit for bit."""
    kwargs = dict(lr=0.7, weight_decay=5.0, c_warmup=3, sf_beta1_anneal_steps=10, polyak_beta=0.5)
    mu_model, plain_model = mixed_net(8, 8), mixed_net(8, 8)
    mu = msf.MuAdamC_ScheduleFreePlus(mu_model.named_parameters(), impl=impl, polyak=polyak, **kwargs)
    assert all(g["polyak_weight"] == 1.0 and g["mup_lr_mult"] == 1.0 for g in mu.param_groups)
    plain_params = dict(plain_model.named_parameters())
    plain = impl([{"params": [plain_params[n] for n in g["param_names"]]} for g in mu.param_groups], **kwargs)
    run(mu_model, mu, 25)
    run(plain_model, plain, 25)
    for (name, p), q in zip(mu_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(p, q), name
    assert [g["polyak_lr"] for g in mu.param_groups] == [g["polyak_lr"] for g in plain.param_groups]


# ---------------------------------------------------------------- the checkpoint guard


def stepped(polyak: str) -> torch.optim.Optimizer:
    """MuAdamC_ScheduleFreePlus on MixedNet(24, 48) after 2 steps."""
    model = mixed_net(24, 48)
    optimizer = msf.MuAdamC_ScheduleFreePlus(model.named_parameters(), polyak=polyak, lr=1.0)
    run(model, optimizer, 2)
    return optimizer


@pytest.mark.parametrize("saved, loading", [("mup", "global"), ("global", "mup")])
def test_a_state_dict_saved_with_the_other_polyak_is_refused_naming_it_and_changes_nothing(saved, loading):
    """Oracle: torch's load would overwrite every group's polyak_weight with the saved one,
    silently switching the rule; the guard refuses first, and the groups stay as they were."""
    target = stepped(loading)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=f"^state_dict was saved with polyak='{saved}' but this muP optimizer "
                                         f"has polyak='{loading}'"):
        target.load_state_dict(stepped(saved).state_dict())
    assert [g["polyak_weight"] for g in target.param_groups] == [g["polyak_weight"] for g in before["param_groups"]]


def test_a_state_dict_of_another_mup_factory_is_refused_naming_polyak():
    """Oracle: MuAdamW_ScheduleFree's groups carry no mup_polyak (saved without a Polyak rule)."""
    model = mixed_net(24, 48)
    other = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="^state_dict was saved with polyak=None but this muP optimizer has "
                                         "polyak='mup'"):
        stepped("mup").load_state_dict(other.state_dict())


@pytest.mark.parametrize("polyak", ["mup", "global"])
def test_a_state_dict_saved_with_the_same_polyak_loads(polyak):
    """Oracle: an identical build loads it and holds the saved groups' Polyak weights."""
    source = stepped(polyak)
    model = mixed_net(24, 48)
    target = msf.MuAdamC_ScheduleFreePlus(model.named_parameters(), polyak=polyak, lr=1.0)
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    assert [g["polyak_weight"] for g in target.param_groups] == [g["polyak_weight"] for g in source.param_groups]


# ---------------------------------------------------------------- evidence: the step size and the coordinate check


def polyak_lrs(polyak: str, widths: tuple[int, ...], step: int) -> list[float]:
    """The Polyak step size at ``step`` on the example Transformer (muP, readout and query at zero, seed 0,
    one fixed batch)."""
    task = make_task("transformer", n_batches=1, zero_init=True)
    x, y = task.train_batches[0]
    values = []
    for width in widths:
        torch.manual_seed(0)
        net = task.build(width, "mup")
        optimizer = msf.MuAdamC_ScheduleFreePlus(net.named_parameters(), polyak=polyak, lr=1.0)
        for _ in range(step):
            optimizer.zero_grad()
            loss = cross_entropy(net(x), y)
            loss.backward()
            optimizer.step(function_value=loss)
        values.append(optimizer.param_groups[0]["polyak_lr"])
    return values


def test_the_polyak_step_size_is_width_independent_with_mup_weights_and_shrinks_like_one_over_width_without():
    """Oracle: slope of log2 polyak_lr against log2 width at step 2 (the first step at which the
    zero-initialised readout lets gradients reach the hidden weights), widths 32 .. 128:
    |slope| < 0.15 with "mup", below -0.7 with "global" (measured: -0.08 and -1.0 over 32 .. 256)."""
    widths = (32, 64, 128)
    slopes = {polyak: np.polyfit(np.log2(widths), np.log2(polyak_lrs(polyak, widths, 2)), 1)[0]
              for polyak in ("mup", "global")}
    assert abs(slopes["mup"]) < 0.15, slopes
    assert slopes["global"] < -0.7, slopes


@pytest.fixture(scope="module")
def transformer_verdicts():
    """The coordinate check of both named optimizers under muP on the Transformer (readout and query at zero,
    so that every output is updates alone), widths 32 .. 128, 4 steps."""
    task = make_task("transformer", n_batches=1, zero_init=True)
    verdicts = {}
    for name in ("adamc-plus", "adamc-plus-naive"):
        frame = record_coords(lambda w: task.build(w, "mup"), optimizer_factory(name, "mup"), widths=[32, 64, 128],
                              batches=task.train_batches, loss_fn=cross_entropy, steps=4, seeds=(0,),
                              parametrization=name)
        verdicts[name] = judge(frame)
    return verdicts


def shrinking_modules(verdict) -> set[str]:
    """Modules that break the symmetric bound (slope below -0.25 outside the attention query and logits)."""
    return set(gradient_scales.shrinking(verdict, bound=SYMMETRIC_BOUND)["module"])


def test_coordinate_check_passes_with_mup_polyak_weights(transformer_verdicts):
    verdict = transformer_verdicts["adamc-plus"]
    for sequence in ("y", "x"):
        assert verdict.passed("adamc-plus", sequence), verdict.format()
    assert not shrinking_modules(verdict), verdict.format()


def test_coordinate_check_fails_with_global_polyak_weights(transformer_verdicts):
    """The readout and the residual-branch outputs shrink with width: muP's updates undone."""
    verdict = transformer_verdicts["adamc-plus-naive"]
    assert {"readout", "blocks.1.mlp.proj"} <= shrinking_modules(verdict), verdict.format()


# ---------------------------------------------------------------- coord_checks gives the step its loss


def manual_run(batches: list, steps: int) -> torch.nn.Module:
    """The hand-written loop: ``steps`` updates of AdamCScheduleFreePlus (lr 0.5) on the example MLP
    at width 32 (SP, seed 0), one per batch, then ``eval()``: the parameters hold x."""
    torch.manual_seed(0)
    model = make_task("mlp", n_batches=1).build(32, "sp")
    optimizer = msf.AdamCScheduleFreePlus(model.parameters(), lr=0.5)
    for inputs, targets in batches[:steps]:
        optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step(function_value=loss)
    optimizer.eval()
    return model


def test_train_and_evaluate_sets_steps_schedulefree_plus_with_the_loss():
    """Oracle: the hand-written loop's parameters at x after 5 steps, bit for bit (without the
    loss the step raises ValueError naming function_value)."""
    task = make_task("mlp", n_batches=5)
    torch.manual_seed(0)
    model = task.build(32, "sp")
    optimizer = msf.AdamCScheduleFreePlus(model.parameters(), lr=0.5)
    train_and_evaluate_sets(model, optimizer, task.train_batches, {"eval": task.eval_batches}, cross_entropy, [5])
    for p, q in zip(model.parameters(), manual_run(task.train_batches, 5).parameters()):
        assert torch.equal(p, q)


def test_record_coords_steps_schedulefree_plus_with_the_loss():
    """Oracle: the readout output recorded at x at step 4 is that of the hand-written loop after
    3 steps on the same batches, its mean |value| to float32 rounding (rel. 1e-6)."""
    task = make_task("mlp", n_batches=4)
    frame = record_coords(lambda w: task.build(w, "sp"), optimizer_factory("adamc-plus", "sp", lr=0.5),
                          widths=[32, 64], batches=task.train_batches, loss_fn=cross_entropy, steps=4,
                          seeds=(0,), sequences=("x",), parametrization="sp")
    recorded = frame.query("width == 32 and step == 4 and module == 'readout'")["value"].item()
    model = manual_run(task.train_batches, 3)
    outputs = {}
    model.readout.register_forward_hook(lambda module, inputs, output: outputs.update(readout=output))
    with torch.no_grad():
        model(task.train_batches[3][0])
    assert recorded == pytest.approx(outputs["readout"].abs().mean().item(), rel=1e-6)


@pytest.mark.parametrize("impl", FORMS)
def test_other_factories_refuse_schedulefree_plus_which_would_lose_its_polyak_weights(impl):
    with pytest.raises(ValueError, match="use MuAdamC_ScheduleFreePlus"):
        msf.MuAdamW_ScheduleFree(mixed_net(24).named_parameters(), impl=impl, lr=1.0)
