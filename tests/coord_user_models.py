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

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first = nn.Linear(D_IN, width)
        self.second = nn.Linear(width, width)
        self.out = mup.MuReadout(width, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


def make_regressor(width: int) -> nn.Module:
    return Regressor(width)


def regression_batches(n_batches: int, split: str) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    return [(torch.randn(32, D_IN, generator=generator), torch.randn(32, D_OUT, generator=generator))
            for _ in range(n_batches)]


def not_batches(n_batches: int, split: str) -> str:
    return "oops"


def half_mse(output: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * F.mse_loss(output, targets)
