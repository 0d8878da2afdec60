"""Shared fixtures: a tiny deterministic model and batch factory.

The model is Linear(4, 6) - Tanh - Linear(6, 3) (51 parameters in four tensors), small enough that a
few hundred optimizer steps cost milliseconds. Seeds are explicit and the global RNG is left as found.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


class TwoTower(nn.Module):
    """The tiny MLP plus an independent head ``aux``; forward returns both outputs.

    The loss is the sum of one loss per tower, so the MLP's gradients are bitwise those of the MLP
    alone whatever ``aux`` holds, and ``aux`` can be frozen, rewritten or added to an optimizer
    later without changing anything else.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.aux = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp(x), self.aux(x)


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear(4, 6) - Tanh - Linear(6, 3), initialised from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def two_tower(seed: int = 0) -> TwoTower:
    """:class:`TwoTower` initialised from ``seed`` (its MLP equals ``tiny_mlp(seed)``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TwoTower()


def tiny_batches(count: int, seed: int = 1234, dtype: torch.dtype = torch.float32) -> list[Batch]:
    """``count`` regression batches (8 inputs of size 4, targets of size 3) from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype))
            for _ in range(count)]


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (restored after).

    On a 2-core CPU, torch's bfloat16 ``linear`` on these tiny shapes takes ~10 ms per call with two
    threads and ~6 us with one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_model() -> Callable[..., nn.Sequential]:
    """Factory ``make_model(seed=0, dtype=torch.float32)`` of the tiny MLP."""
    return tiny_mlp


@pytest.fixture
def make_two_tower() -> Callable[..., TwoTower]:
    """Factory ``make_two_tower(seed=0)`` of the MLP with an independent ``aux`` head."""
    return two_tower


@pytest.fixture
def make_batches() -> Callable[..., list[Batch]]:
    """Factory ``make_batches(count, seed=1234, dtype=torch.float32)`` of regression batches."""
    return tiny_batches
