"""Depth transfer: the depth rule of scaling.py, the factories' depth arguments, and the model-side helper.

The oracle values are derived by hand from the rule (module docstring of
mup_schedulefree/scaling.py): with depth_mult = L / L_base = 4, parameters inside residual blocks
take, on top of their width scaling,

    rule, alpha     lr x          eps x (scale_eps)   weight decay x
    adam, 1         4^0    = 1    4^-1   = 0.25       1
    adam, 1/2       4^-1/2 = 0.5  4^-1/2 = 0.5        1
    sgd,  1         4^1    = 4    n/a                 1
    sgd,  1/2       4^0    = 1    n/a                 1
    muon, 1         4^0    = 1    n/a                 1
    muon, 1/2       4^-1/2 = 0.5  n/a                 1

and parameters outside the blocks (embeddings, final norm, readout) nothing. The residual branches
are multiplied by 4^-alpha: 0.25 at alpha = 1, 0.5 at alpha = 1/2.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch.nn import functional as F

import mup_schedulefree as msf
from coord_checks.models import build_model
from mup_schedulefree.depth import scale_residual_branches
from mup_schedulefree.factories import FACTORIES
from mup_schedulefree.scaling import mu_param_groups, split_hidden_matrices

BASE_DEPTH = 2
#: (lr, eps, weight decay) multipliers inside blocks at depth_mult = 4, by (rule, alpha): the table above.
EXPECTED = {("adam", 1.0): (1.0, 0.25, 1.0), ("adam", 0.5): (0.5, 0.5, 1.0),
            ("sgd", 1.0): (4.0, None, 1.0), ("sgd", 0.5): (1.0, None, 1.0),
            ("muon", 1.0): (1.0, None, 1.0), ("muon", 0.5): (0.5, None, 1.0)}
BRANCH = {1.0: 0.25, 0.5: 0.5}
SIGNATURE_NEW = ("mup_depth_mult", "mup_depth_alpha")


def gpt(n_layers: int, width: int = 64, seed: int = 0, zero_init: bool = True) -> torch.nn.Module:
    """The example GPT at width 64 (width_mult 2 over base 32), so that width rules are not trivial."""
    torch.manual_seed(seed)
    return build_model("transformer", width, n_layers=n_layers, max_seq_len=8, zero_init=zero_init)


def per_name(groups: list[dict]) -> dict[str, dict]:
    """Each parameter name's group (groups of (name, p) pairs, or an optimizer's, with ``param_names``)."""
    return {name: group for group in groups
            for name in group.get("param_names") or [name for name, _ in group["params"]]}


@pytest.mark.parametrize("rule, alpha", list(EXPECTED))
def test_depth_multiplies_lr_eps_and_decay_inside_blocks_only_by_the_rule_exponents(rule, alpha):
    """Oracle: EXPECTED (derived, rel. 1e-15) for every parameter in blocks.<i>., of every width role
    (hidden and attention matrices, LayerNorm gains and biases); exactly 1 outside the blocks."""
    model = gpt(4 * BASE_DEPTH)
    params = list(model.named_parameters())
    if rule == "muon":
        (matrices,), _ = split_hidden_matrices(params)
        params = matrices["params"]
    scale_eps = rule == "adam"
    kwargs = dict(lr=0.01, decay_keys={"weight_decay": 0.1}, scale_eps=scale_eps, eps=1e-8 if scale_eps else None)
    plain = per_name(mu_param_groups(params, rule, **kwargs))
    deep = per_name(mu_param_groups(params, rule, depth_mult=4.0, depth_alpha=alpha, **kwargs))
    lr_x, eps_x, wd_x = EXPECTED[(rule, alpha)]
    roles = set()
    for name, group in deep.items():
        inside = name.startswith("blocks.")
        if inside:
            roles.add(group["mup_role"])
        assert group["lr"] == pytest.approx(plain[name]["lr"] * (lr_x if inside else 1.0), rel=1e-15), name
        assert group["weight_decay"] == pytest.approx(plain[name]["weight_decay"] * (wd_x if inside else 1.0),
                                                      rel=1e-15), name
        if scale_eps:
            assert group["eps"] == pytest.approx(plain[name]["eps"] * (eps_x if inside else 1.0), rel=1e-15), name
        assert (group["mup_depth_mult"], group["mup_depth_alpha"]) == (4.0, alpha)
    assert roles == ({"matrix-like"} if rule == "muon" else {"matrix-like", "vector-like"})


@pytest.mark.parametrize("factory", [*FACTORIES, msf.MuScheduleFreeWrapper, msf.MuScheduleFreeWrapperReference],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_factory_groups_at_depth_mult_1_are_the_groups_without_depth(factory, alpha):
    """Oracle: the groups built without depth arguments (exact equality of every key and of the
    parameter lists), except the two depth keys, which are None without depth scaling."""
    model = gpt(BASE_DEPTH)
    kwargs = {"lr": 1.0 if factory is msf.MuAdamC_ScheduleFreePlus else 0.01, "weight_decay": 0.1}
    if "scale_eps" in inspect.signature(factory).parameters:
        kwargs["scale_eps"] = True
    plain = factory(model.named_parameters(), **kwargs).param_groups
    same = factory(model.named_parameters(), depth_mult=1.0, depth_alpha=alpha, **kwargs).param_groups
    assert len(plain) == len(same)
    for before, after in zip(plain, same):
        assert [before[key] for key in SIGNATURE_NEW] == [None, None]
        assert [after[key] for key in SIGNATURE_NEW] == [1.0, alpha]
        assert {k: v for k, v in before.items() if k not in SIGNATURE_NEW + ("params",)} == \
            {k: v for k, v in after.items() if k not in SIGNATURE_NEW + ("params",)}
        assert [id(p) for p in before["params"]] == [id(p) for p in after["params"]]


@pytest.mark.parametrize("saved, loaded", [((4.0, 1.0), (4.0, 0.5)), ((4.0, 1.0), (None, None)),
                                           ((None, None), (1.0, 1.0)), ((2.0, 1.0), (4.0, 1.0))])
def test_state_dict_of_another_depth_scaling_is_refused_naming_depth_mult(saved, loaded):
    """Oracle: check_same_grouping's depth comparison; the same depth scaling loads."""
    model = gpt(4 * BASE_DEPTH)

    def build(depth):
        return msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=0.01, depth_mult=depth[0], depth_alpha=depth[1])

    state = build(saved).state_dict()
    build(saved).load_state_dict(state)
    with pytest.raises(ValueError, match=r"depth_mult, depth_alpha"):
        build(loaded).load_state_dict(state)


def test_state_dict_saved_before_depth_keys_existed_loads_without_depth_scaling():
    """Oracle: SIGNATURE_DEFAULTS: a group without the depth keys was saved without depth scaling."""
    model = gpt(BASE_DEPTH)
    state = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=0.01).state_dict()
    for group in state["param_groups"]:
        for key in SIGNATURE_NEW:
            del group[key]
    msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=0.01).load_state_dict(state)
    with pytest.raises(ValueError, match=r"depth_mult"):
        msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=0.01, depth_mult=4.0, depth_alpha=1.0).load_state_dict(
            state)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_helper_at_base_depth_gives_the_plain_model_bit_for_bit(alpha):
    """Oracle: the unhooked model's logits, exact equality (the multiplier is exactly 1); the readout
    is not zero-initialised, so that the logits see the blocks."""
    model = gpt(BASE_DEPTH, zero_init=False)
    tokens = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(1))
    plain = model(tokens)
    scale_residual_branches(model, depth_mult=1.0, depth_alpha=alpha)
    assert torch.equal(model(tokens), plain)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_helper_at_4x_depth_multiplies_each_branch_output_by_4_to_the_minus_alpha(alpha):
    """Oracle: every block recomputed by hand as x + m * attn(ln1(x)), then + m * mlp(ln2(.)),
    with the branches' unhooked forward and m = BRANCH[alpha] (exact equality: the same ops)."""
    model = gpt(4 * BASE_DEPTH)
    handles = scale_residual_branches(model, depth_mult=4.0, depth_alpha=alpha)
    assert len(handles) == 2 * 4 * BASE_DEPTH
    m = BRANCH[alpha]
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn.forward(block.ln1(x))
            mid = x + attn * m
            expected = mid + block.mlp.forward(block.ln2(mid)) * m
            assert torch.equal(block(x), expected)
            assert not torch.allclose(block(x), x + attn + block.mlp.forward(block.ln2(x + attn)))
            x = expected
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        block = model.blocks[0]
        assert torch.equal(block(x), x + block.attn.forward(block.ln1(x)) +
                           block.mlp.forward(block.ln2(x + block.attn.forward(block.ln1(x)))))


@pytest.mark.parametrize("n_layers", [2, 8])
def test_gpt_trains_with_depth_scaling_at_depths_2_and_8(n_layers):
    """Oracle: finite losses, a gradient in every block at the last step, and a lower loss after 5
    steps on one batch."""
    model = gpt(n_layers, width=32)
    depth_mult = n_layers / BASE_DEPTH
    scale_residual_branches(model, depth_mult, depth_alpha=1.0)
    opt = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=0.01, depth_mult=depth_mult, depth_alpha=1.0,
                                   scale_eps=True)
    tokens = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(block.mlp.proj.weight.grad.abs().sum() > 0 for block in model.blocks)  # zero readout: not at step 1
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_muon_factory_takes_the_depth_rule_in_both_parts():
    """Oracle: EXPECTED[("muon", 0.5)] and EXPECTED[("adam", 0.5)]: the Muon part's hidden matrices
    and the AdamW part's LayerNorm gains inside blocks both take lr x 0.5 at depth_mult 4."""
    model = gpt(4 * BASE_DEPTH)
    plain = msf.MuMuon_ScheduleFree(model.named_parameters())
    deep = msf.MuMuon_ScheduleFree(model.named_parameters(), depth_mult=4.0, depth_alpha=0.5)
    for before, after in zip(plain.parts, deep.parts):
        lrs, new = per_name(before.param_groups), per_name(after.param_groups)
        for name in ("blocks.3.attn.key.weight", "blocks.3.ln1.weight", "ln_f.weight"):
            if name in lrs:
                factor = 0.5 if name.startswith("blocks.") else 1.0
                assert new[name]["lr"] == pytest.approx(lrs[name]["lr"] * factor, rel=1e-15)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(depth_alpha=1.0), ValueError, r"Invalid depth_alpha: 1.0 \(needs depth_mult"),
    (dict(depth_mult=4.0), ValueError, r"Invalid depth_alpha: None"),
    (dict(depth_mult=4.0, depth_alpha=0.75), ValueError, r"Invalid depth_alpha: 0.75"),
    (dict(depth_mult=0.0, depth_alpha=1.0), ValueError, r"Invalid depth_mult: 0.0"),
    (dict(depth_mult="4", depth_alpha=1.0), TypeError, r"Invalid depth_mult: '4'"),
    (dict(depth_mult=4.0, depth_alpha=1.0, block_prefix=""), ValueError, r"Invalid block_prefix: ''"),
    (dict(depth_mult=4.0, depth_alpha=1.0, block_prefix=3), TypeError, r"Invalid block_prefix: 3"),
])
def test_bad_depth_arguments_raise_naming_them_before_params_are_read(kwargs, error, match):
    """Oracle: check_depth's messages; params is a generator that fails if it is read."""
    def unread():
        raise AssertionError("params was read")
        yield

    with pytest.raises(error, match=match):
        msf.MuAdamW_ScheduleFree(unread(), lr=0.01, **kwargs)


def test_depth_needs_names_and_a_mapping_covering_every_parameter():
    """Oracle: the errors name what is missing; a complete mapping gives the prefix's groups."""
    model = gpt(4 * BASE_DEPTH)
    with pytest.raises(ValueError, match=r"depth_mult needs parameter names"):
        msf.MuAdamW_ScheduleFree(model.parameters(), lr=0.01, depth_mult=4.0, depth_alpha=0.5)
    with pytest.raises(ValueError, match=r"Invalid block_prefix: parameter 'tok_emb.weight' is missing"):
        msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=0.01, depth_mult=4.0, depth_alpha=0.5, block_prefix={})
    mapping = {name: name.startswith("blocks.") for name, _ in model.named_parameters()}
    by_map = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=0.01, depth_mult=4.0, depth_alpha=0.5,
                                      block_prefix=mapping).param_groups
    by_prefix = msf.MuAdamW_ScheduleFree(model.named_parameters(), lr=0.01, depth_mult=4.0,
                                         depth_alpha=0.5).param_groups
    assert [(g["lr"], g["param_names"]) for g in by_map] == [(g["lr"], g["param_names"]) for g in by_prefix]


def test_a_block_prefix_that_matches_nothing_warns():
    """Oracle: a DDP-style name prefix ("module.") hides the blocks from the default prefix."""
    model = gpt(4 * BASE_DEPTH)
    named = [("module." + name, p) for name, p in model.named_parameters()]
    with pytest.warns(UserWarning, match=r"no parameter lies inside a residual block"):
        msf.MuAdamW_ScheduleFree(named, lr=0.01, depth_mult=4.0, depth_alpha=0.5)


def test_helper_refuses_a_missing_prefix_and_a_second_application():
    """Oracle: the helper's one-line errors."""
    model = gpt(BASE_DEPTH)
    with pytest.raises(ValueError, match=r"Invalid block_prefix: 'layers.'"):
        scale_residual_branches(model, 4.0, 1.0, block_prefix="layers.")
    with pytest.raises(ValueError, match=r"block blocks.0 has no 'ffn'"):
        scale_residual_branches(model, 4.0, 1.0, branches=("attn", "ffn"))
    scale_residual_branches(model, 4.0, 1.0)
    with pytest.raises(ValueError, match=r"blocks.0.attn is already scaled"):
        scale_residual_branches(model, 4.0, 1.0)
