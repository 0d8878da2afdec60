"""Small muP models for the factory tests, with base shapes already set.

``MixedNet`` has every kind of parameter muP distinguishes:

    inp.weight (width x d_in)      inf x fin   vector-like
    inp.bias, norm.*, up.bias ...  inf         vector-like
    hidden.weight (width x width)  inf x inf   matrix-like, fan-in mult == fan-out mult
    up.weight (ff x width)         inf x inf   matrix-like, fan-in mult != fan-out mult when ff
    down.weight (width x ff)       inf x inf   grows at a different rate than width
    readout.weight (d_out x width) fin x inf   vector-like (mup.MuReadout)
    readout.bias (d_out)           fin         fixed

Base shapes: width 8 and ff 8, delta 16 and 16, so ``MixedNet(24, 48)`` has width_mult 3 and
ff multiplier 6 (fan-in/fan-out ratios 0.5 and 2), none of them powers of two.
"""
from __future__ import annotations

import mup
import torch
from torch import nn

BASE_WIDTH = 8
D_IN, D_OUT = 5, 3


class MixedNet(nn.Module):
    """Linear -> LayerNorm -> (width x width) -> up (ff x width) -> down (width x ff) -> MuReadout."""

    def __init__(self, width: int, ff: int, d_in: int = D_IN, d_out: int = D_OUT) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.up = nn.Linear(width, ff)
        self.down = nn.Linear(ff, width)
        self.readout = mup.MuReadout(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.inp(x))
        h = torch.tanh(self.hidden(h))
        h = h + self.down(torch.tanh(self.up(h)))
        return self.readout(h)


def mixed_net(width: int = 24, ff: int = 48, seed: int = 0) -> MixedNet:
    """A MixedNet with ``mup.set_base_shapes`` applied (base 8/8, delta 16/16), initialised from
    ``seed`` (the global RNG is left as found)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MixedNet(width, ff)
        mup.set_base_shapes(model, MixedNet(BASE_WIDTH, BASE_WIDTH), delta=MixedNet(2 * BASE_WIDTH, 2 * BASE_WIDTH))
    return model


class MLP(nn.Module):
    """d_in -> width -> width -> MuReadout(1), ReLU activations."""

    def __init__(self, width: int, d_in: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.hidden = nn.Linear(width, width)
        self.readout = mup.MuReadout(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def mlp(width: int, base: int = 16, seed: int = 0) -> MLP:
    """An MLP with base shapes set (base width ``base``, delta 2 * base), initialised from ``seed``
    (the global RNG is left as found)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MLP(width)
        mup.set_base_shapes(model, MLP(base), delta=MLP(2 * base))
    return model
