"""Example models: base shapes, and how muP and standard parametrization differ."""
from __future__ import annotations

import mup
import pytest
import torch

from coord_checks.models import BASE_WIDTHS, MODEL_NAMES, build_model

KWARGS = {"mlp": {"d_in": 12, "d_out": 5}, "cnn": {}, "transformer": {"max_seq_len": 8}}
INPUTS = {"mlp": lambda: torch.randn(3, 12), "cnn": lambda: torch.randn(3, 3, 8, 8),
          "transformer": lambda: torch.randint(0, 96, (3, 8))}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sp_has_unit_width_mult_and_mup_scales_with_base_width(name):
    width = 4 * BASE_WIDTHS[name]
    sp = build_model(name, width, "sp", **KWARGS[name])
    mu = build_model(name, width, "mup", **KWARGS[name])
    assert all(p.infshape.width_mult() == 1 for p in sp.parameters())
    mults = {p.infshape.width_mult() for p in mu.parameters() if p.infshape.ninf() > 0}
    assert mults == {4.0}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_mup_readout_is_sp_init_times_sqrt_width_mult_and_sp_readout_is_a_plain_linear(name):
    """By default the muP readout keeps PyTorch's init, which mup's ``MuReadout`` rescales by
    sqrt(width_mult) (and its output by 1 / width_mult): from the same seed it is SP's readout
    times sqrt(2) at twice the base width, so muP's logits start 1/sqrt(2) as large."""
    torch.manual_seed(3)
    mu = build_model(name, 2 * BASE_WIDTHS[name], "mup", **KWARGS[name])
    torch.manual_seed(3)
    sp = build_model(name, 2 * BASE_WIDTHS[name], "sp", **KWARGS[name])
    assert isinstance(mu.readout, mup.MuReadout) and type(sp.readout) is torch.nn.Linear
    assert torch.count_nonzero(sp.readout.weight) > 0
    torch.testing.assert_close(mu.readout.weight, sp.readout.weight * 2 ** 0.5, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_zero_init_starts_the_mup_readout_at_zero(name):
    mu = build_model(name, 2 * BASE_WIDTHS[name], "mup", zero_init=True, **KWARGS[name])
    assert isinstance(mu.readout, mup.MuReadout) and torch.count_nonzero(mu.readout.weight) == 0
    assert mu(INPUTS[name]()).abs().max() == 0


def test_transformer_query_is_zero_only_with_zero_init_and_attention_scales_match_at_base_width():
    base = BASE_WIDTHS["transformer"]
    mu = build_model("transformer", base, "mup", **KWARGS["transformer"])
    zeroed = build_model("transformer", base, "mup", zero_init=True, **KWARGS["transformer"])
    sp = build_model("transformer", base, "sp", **KWARGS["transformer"])
    attn_mu, attn_sp = mu.blocks[0].attn, sp.blocks[0].attn
    assert torch.count_nonzero(attn_mu.query.weight) > 0
    assert torch.count_nonzero(zeroed.blocks[0].attn.query.weight) == 0
    assert torch.count_nonzero(attn_sp.query.weight) > 0
    assert attn_mu.scale == pytest.approx(attn_sp.scale, rel=1e-12)
    wide = build_model("transformer", 4 * base, "mup", **KWARGS["transformer"]).blocks[0].attn
    assert wide.scale == pytest.approx(attn_mu.scale / 4, rel=1e-12)  # 1/d, not 1/sqrt(d)


def test_same_seed_gives_same_initialisation_whatever_the_base_shapes():
    torch.manual_seed(5)
    a = build_model("mlp", 128, "mup", **KWARGS["mlp"])
    torch.manual_seed(5)
    b = build_model("mlp", 128, "mup", base_width=32, **KWARGS["mlp"])
    assert torch.equal(a.hidden[0].weight, b.hidden[0].weight)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "resnet", "width": 64}, "name must be one of"),
    ({"name": "mlp", "width": 0}, "width must be a positive int"),
    ({"name": "mlp", "width": 64, "parametrization": "ntk"}, "parametrization must be one of"),
])
def test_build_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


def test_transformer_width_must_divide_into_heads():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        build_model("transformer", 34, "sp")
