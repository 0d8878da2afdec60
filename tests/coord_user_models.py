"""Users' model files for the coordinate-check tests: factories ``width -> nn.Module``, batch
functions ``(n_batches, split) -> batches`` and a loss, loaded as ``tests/coord_user_models.py:NAME``."""
from __future__ import annotations

import mup
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coord_checks.data import VOCAB_SIZE

D_IN, D_OUT = 12, 3


class CharNet(nn.Module):
    """Token model: embedding, one hidden layer, readout (``readout`` is a MuReadout or a Linear)."""

    def __init__(self, width: int, readout: type[nn.Module] = mup.MuReadout) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, width)
        self.hidden = nn.Linear(width, width, bias=False)
        self.head = readout(width, VOCAB_SIZE, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.relu(self.hidden(self.embed(tokens))))


def make_model(width: int) -> nn.Module:
    """Base shapes set by the user, from a base and a delta model."""
    return mup.set_base_shapes(CharNet(width), CharNet(32), delta=CharNet(64))


def make_unshaped(width: int) -> nn.Module:
    """No base shapes: the check sets them from --base-width."""
    return CharNet(width)


def ignores_width(width: int) -> nn.Module:
    return mup.set_base_shapes(CharNet(32), CharNet(32), delta=CharNet(64))


def stops_growing(width: int) -> nn.Module:
    return make_model(min(width, 64))


def all_width_mults_one(width: int) -> nn.Module:
    return mup.set_base_shapes(CharNet(width), None)


def plain_linear_readout(width: int) -> nn.Module:
    return CharNet(width, readout=nn.Linear)


class Regressor(nn.Module):
    """A regression MLP whose readout is not called readout."""

    def __init__(self, width: int, bias: bool = True) -> None:
        super().__init__()
        self.first = nn.Linear(D_IN, width, bias=bias)
        self.second = nn.Linear(width, width, bias=bias)
        self.out = mup.MuReadout(width, D_OUT, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


def make_regressor(width: int) -> nn.Module:
    return Regressor(width)


def regression_batches(n_batches: int, split: str) -> list[tuple[Tensor, Tensor]]:
    """Gaussian inputs, targets from a fixed random teacher ``sin(x @ T)``; eval inputs differ."""
    teacher = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(123)) / D_IN**0.5
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    inputs = [torch.randn(64, D_IN, generator=generator) for _ in range(n_batches)]
    return [(x, torch.sin(2 * x @ teacher)) for x in inputs]


def not_batches(n_batches: int, split: str) -> str:
    return "oops"


def half_mse(output: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * F.mse_loss(output, targets)


class ReadoutWithoutMultiplier(mup.MuReadout):
    """A deliberately broken muP readout: it forgets to divide by the width multiplier."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.Linear.forward(self, self.output_mult * x)


def _regressor(width: int, readout: type[nn.Module]) -> nn.Module:
    model = Regressor(width, bias=False)
    model.out = readout(width, D_OUT, bias=False)
    return model


def broken_readout_regressor(width: int) -> nn.Module:
    """The bias-free regressor with the broken readout, base shapes set from width 32."""
    return mup.set_base_shapes(_regressor(width, ReadoutWithoutMultiplier),
                               _regressor(32, ReadoutWithoutMultiplier),
                               delta=_regressor(64, ReadoutWithoutMultiplier))


def shaped_regressor(width: int) -> nn.Module:
    """The bias-free regressor, correct muP, base shapes set from width 32."""
    return mup.set_base_shapes(_regressor(width, mup.MuReadout), _regressor(32, mup.MuReadout),
                               delta=_regressor(64, mup.MuReadout))
